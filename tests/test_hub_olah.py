"""Read-only round trip against olah, a third-party Hub mirror (PyPI), serving a local git repo offline: downloads,
timm `hf-hub:` loading and hub/verify are proven against a server this project did not write. The weights are
stored as a git-LFS pointer plus object, so verify's LFS sha256 check runs too."""
import hashlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch

import timm_gcp  # noqa: F401  registers the GCP models
from timm_gcp.hub import export_model
from timm_gcp.hub.export import EXPORT_FILES
from timm_gcp.hub.push import MANIFEST_NAME, build_manifest
from timm_gcp.hub.verify import verify_repo
from hub_server import point_client_at

REPO_ID = 'timm-gcp-test/gcp_resnet18.olah'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _git_repo_of_export(export: Path, repo: Path) -> None:
    """The export as a Hub-style git repo: manifest beside the files, weights as an LFS pointer + object."""
    repo.mkdir(parents=True)
    files = {name: export / name for name in EXPORT_FILES}  # push uploads these, with a manifest of its own
    for name, path in files.items():
        shutil.copy(path, repo / name)
    (repo / MANIFEST_NAME).write_bytes(build_manifest(files))
    data = (repo / 'model.safetensors').read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (repo / 'model.safetensors').write_text(
        f'version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n')
    git = ['git', '-C', str(repo), '-c', 'user.name=test', '-c', 'user.email=test@example.com']
    subprocess.run(git + ['init', '-q', '-b', 'main'], check=True)
    objects = repo / '.git' / 'lfs' / 'objects' / sha[:2] / sha[2:4]
    objects.mkdir(parents=True)
    (objects / sha).write_bytes(data)
    subprocess.run(git + ['add', '.'], check=True)
    subprocess.run(git + ['commit', '-q', '-m', 'exported model'], check=True)


@pytest.fixture(scope='module')
def olah(tmp_path_factory):
    root = tmp_path_factory.mktemp('olah')
    model = timm.create_model('gcp_resnet18', num_classes=3, gcp_dim=16).eval()
    export = export_model(model, root / 'export', label_names=['a', 'b', 'c'], metrics={'top1': 40.0, 'top5': 100.0})
    org, name = REPO_ID.split('/')
    _git_repo_of_export(export, root / 'mirrors' / 'models' / org / name)
    port = _free_port()
    config = root / 'olah.toml'
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "cache"}"\n'
        f'mirrors-path = ["{root / "mirrors"}"]\n'
        'hf-scheme = "http"\nhf-netloc = "127.0.0.1:9"\nhf-lfs-netloc = "127.0.0.1:9"\n'  # nowhere, should it try
        '[accessibility]\noffline = true\n')
    log = open(root / 'olah.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'olah.server', '--config', str(config)], cwd=root,
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f'http://127.0.0.1:{port}'
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f'{endpoint}/api/models/{REPO_ID}/revision/main', timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f'olah did not start: {(root / "olah.log").read_text()[-2000:]}')
            time.sleep(0.2)
    yield endpoint, model, export
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def client(olah, monkeypatch, tmp_path):
    point_client_at(monkeypatch, olah[0], tmp_path / 'hf_cache')
    return olah


def test_download_and_hf_hub_load_through_olah(client):
    _, model, export = client
    assert sorted(huggingface_hub.list_repo_files(REPO_ID, revision='main')) == sorted(
        ['README.md', 'config.json', 'model.safetensors', MANIFEST_NAME])
    path = huggingface_hub.hf_hub_download(REPO_ID, 'model.safetensors')
    assert Path(path).read_bytes() == (export / 'model.safetensors').read_bytes()  # LFS object, bit-identical
    loaded = timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_verify_through_olah(client):
    _, _, export = client
    report = verify_repo(REPO_ID)
    assert report.sha256['model.safetensors'] == hashlib.sha256(
        (export / 'model.safetensors').read_bytes()).hexdigest()
    assert report.card == {'top1': 40.0, 'top5': 100.0}
