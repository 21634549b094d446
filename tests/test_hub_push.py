"""push / verify against the project's Hub-protocol server (tests/hub_server.py), driven by the real
huggingface_hub client and timm. In-process tests patch the client's endpoint; CLI tests run as subprocesses."""
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from safetensors.torch import load_file, save_file

import timm_gcp  # noqa: F401  registers the GCP models
from timm_gcp.hub import export_model
from timm_gcp.hub.export import record_manifest
from timm_gcp.hub.cli import redact_token
from timm_gcp.hub.manifest import build_manifest
from timm_gcp.hub.push import file_digest, push_model, with_retries
from timm_gcp.hub.verify import VerificationError, verify_folder, verify_repo
from hub_server import HubServer, point_client_at, serve_patched

REPO = Path(__file__).resolve().parents[1]
TOKEN = 'hf_test_Zx81secretTOKEN'
LABELS = ['cat', 'dog', 'owl']


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = serve_patched(monkeypatch, tmp_path / 'hf_cache', TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope='module')
def model():
    return timm.create_model('gcp_resnet18', num_classes=3, gcp_dim=16).eval()


@pytest.fixture
def exported(model, tmp_path):
    return export_model(model, tmp_path / 'run' / 'model', label_names=LABELS, metrics={'top1': 50.0, 'top5': 100.0},
                        dataset='toy', data_config={'input_size': (3, 64, 64), 'crop_pct': 1.0})


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """A tiny val/<class>/*.png folder the model sees at its 64 px data config."""
    root = tmp_path_factory.mktemp('images')
    gen = torch.Generator().manual_seed(5)
    for label in LABELS:
        (root / 'val' / label).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / 'val' / label / f'{i}.png')
    return root


def _accuracy(model_dir: Path, folder: Path) -> float:
    """top-1 in % of an exported model with its own data config, computed independently of timm_gcp.hub."""
    model = timm.create_model(f'local-dir:{model_dir}', pretrained=True).eval()
    cfg = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    hits = total = 0
    with torch.no_grad():
        for index, label in enumerate(LABELS):
            for path in sorted((folder / 'val' / label).iterdir()):
                logits = model(transform(Image.open(path).convert('RGB')).unsqueeze(0))
                hits += int(logits.argmax(1).item() == index)
                total += 1
    return 100.0 * hits / total


def test_push_one_commit_list_download_and_load(hub, model, exported):
    result = push_model(exported, 'org/gcp18', retry_delay=0.01)
    history = hub.history('org/gcp18')
    assert len(history) == 2 and result.commit_oid == history[-1]  # creation + exactly one upload commit
    files = hub.files('org/gcp18')
    assert sorted(files) == ['.gitattributes', 'README.md', 'config.json', 'model.safetensors',
                             'timm_gcp_manifest.json']
    assert files['model.safetensors'] == (exported / 'model.safetensors').read_bytes()
    assert b'hf-hub:org/gcp18' in files['README.md'] and b'<repo-id>' not in files['README.md']
    manifest = json.loads(files['timm_gcp_manifest.json'])
    assert manifest['files']['config.json']['sha256'] == result.sha256['config.json']

    assert sorted(huggingface_hub.list_repo_files('org/gcp18')) == sorted(files)
    path = huggingface_hub.hf_hub_download('org/gcp18', 'config.json')
    assert Path(path).read_bytes() == files['config.json']
    loaded = timm.create_model('hf-hub:org/gcp18', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    again = push_model(exported, 'org/gcp18', retry_delay=0.01)  # unchanged files: no new commit
    assert again.commit_oid == result.commit_oid and hub.history('org/gcp18') == history

    branch = push_model(exported, 'org/gcp18', revision='v1', private=True, retry_delay=0.01)
    assert hub.repos[('model', 'org/gcp18')].refs['v1'] == branch.commit_oid
    assert hub.history('org/gcp18') == history  # the branch starts at main: nothing changed, nothing committed


def test_transient_errors_are_retried(hub, exported, caplog):
    hub.fail_next_commits = 2
    with caplog.at_level(logging.WARNING, logger='timm_gcp.hub.push'):
        result = push_model(exported, 'org/retry', private=True, retry_delay=0.01)
    assert hub.repos[('model', 'org/retry')].private
    assert hub.commit_requests == 3 and hub.history('org/retry')[-1] == result.commit_oid
    assert len(hub.history('org/retry')) == 2
    assert caplog.text.count('transient error') == 2


def test_a_client_error_is_not_retried(hub, exported):
    hub.fail_next_commits, hub.fail_status = 2, 422
    with pytest.raises(HfHubHTTPError, match='422'):
        push_model(exported, 'org/refused', retry_delay=0.01)
    assert hub.commit_requests == 1 and hub.fail_next_commits == 1


def test_with_retries_only_retries_transient_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError('connection reset')
        return 'done'

    assert with_retries(flaky, 'flaky', max_retries=3, delay=0.001) == 'done' and len(calls) == 3
    calls.clear()

    def broken():
        calls.append(1)
        raise ValueError('not transient')

    with pytest.raises(ValueError):
        with_retries(broken, 'broken', max_retries=3, delay=0.001)
    assert len(calls) == 1


def test_redact_token_masks_the_active_token(monkeypatch):
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    assert redact_token(f'401 for Authorization: Bearer {TOKEN}') == '401 for Authorization: Bearer ***'


def test_failed_upload_leaves_repo_unchanged(hub, model, exported):
    push_model(exported, 'org/atomic', retry_delay=0.01)
    before, history = hub.files('org/atomic'), hub.history('org/atomic')
    changed = timm.create_model('gcp_resnet18', num_classes=3, gcp_dim=16)
    export_model(changed, exported, label_names=LABELS, metrics={'top1': 75.0, 'top5': 100.0})
    hub.fail_paths = {'config.json'}  # the server rejects any commit touching config.json
    with pytest.raises(HfHubHTTPError, match='500'):
        push_model(exported, 'org/atomic', max_retries=1, retry_delay=0.01)
    assert hub.files('org/atomic') == before and hub.history('org/atomic') == history  # weights did not land alone


def test_invalid_folder_fails_before_any_request(hub, exported, tmp_path):
    with pytest.raises(ValueError, match='ORG/NAME'):
        push_model(exported, 'no-slash')
    config_text = (exported / 'config.json').read_text()
    (exported / 'config.json').write_text('{"architecture": "gcp_resnet18"')
    with pytest.raises(ValueError, match='not valid JSON'):
        push_model(exported, 'org/x')
    config = json.loads(config_text)
    (exported / 'config.json').write_text(json.dumps({**config, 'num_classes': 4, 'label_names': list('abcd')}))
    with pytest.raises(ValueError, match='fc.weight has 3 rows but config.json says num_classes=4'):
        push_model(exported, 'org/x')
    (exported / 'config.json').write_text(json.dumps({'architecture': 'nonexistent_net', 'num_classes': 3,
                                                      'pretrained_cfg': {}}))
    with pytest.raises(ValueError, match='not registered with timm'):
        push_model(exported, 'org/x')
    (exported / 'config.json').unlink()
    with pytest.raises(ValueError, match=r"lacks \['config.json'\]"):
        push_model(exported, 'org/x')
    with pytest.raises(ValueError, match='not a directory'):
        push_model(tmp_path / 'nowhere', 'org/x')
    assert hub.requests == []


def test_token_from_hf_auth_login_file(hub, exported, tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.delenv('HF_TOKEN')
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'token'))
    with pytest.raises(ValueError, match='no Hugging Face token'):
        push_model(exported, 'org/login')
    assert hub.requests == []
    (tmp_path / 'token').write_text(TOKEN)  # what `hf auth login` stores
    assert push_model(exported, 'org/login').commit_oid == hub.history('org/login')[-1]


def test_verify_checks_bytes_load_and_accuracy(hub, model, exported, image_folder):
    accuracy = _accuracy(exported, image_folder)
    export_model(model, exported, label_names=LABELS, metrics={'top1': accuracy, 'top5': 100.0}, dataset='toy',
                 data_config={'input_size': (3, 64, 64), 'crop_pct': 1.0})
    pushed = push_model(exported, 'org/verified', retry_delay=0.01)
    report = verify_repo('org/verified', data_dir=image_folder, tolerance=0.01)
    assert report.commit == pushed.commit_oid and report.sha256 == pushed.sha256
    assert report.measured['top1'] == pytest.approx(accuracy) and report.measured['count'] == 9

    export_model(model, exported, label_names=LABELS, metrics={'top1': accuracy + 20, 'top5': 100.0},
                 data_config={'input_size': (3, 64, 64), 'crop_pct': 1.0})
    push_model(exported, 'org/verified', retry_delay=0.01)
    with pytest.raises(VerificationError, match='top1: re-evaluated'):
        verify_repo('org/verified', data_dir=image_folder)
    assert verify_repo('org/verified', revision=pushed.commit_oid, expected_sha256=pushed.sha256).commit == \
        pushed.commit_oid
    with pytest.raises(VerificationError, match='differs from the expected'):
        verify_repo('org/verified', revision=pushed.commit_oid, expected_sha256={'config.json': '0' * 64})


def test_verify_detects_tampering(hub, exported):
    push_model(exported, 'org/tampered', retry_delay=0.01)
    repo = hub.repos[('model', 'org/tampered')]
    files = dict(repo.commits[repo.refs['main']])
    weights = bytearray(files['model.safetensors'])
    weights[-1] ^= 1
    repo.commit('main', {**files, 'model.safetensors': bytes(weights)}, 'flip one bit')
    with pytest.raises(VerificationError, match='model.safetensors: downloaded sha256'):
        verify_repo('org/tampered')
    repo.commit('main', {**files, 'extra.bin': b'x'}, 'add a file outside the manifest')
    with pytest.raises(VerificationError, match=r"does not cover: \['extra.bin'\]"):
        verify_repo('org/tampered')
    repo.commit('main', {**files, 'timm_gcp_manifest.json': b'{}'}, 'a manifest that is none')
    with pytest.raises(VerificationError, match='is not a timm-gcp manifest'):
        verify_repo('org/tampered')
    del files['timm_gcp_manifest.json']
    repo.commit('main', files, 'no manifest')
    with pytest.raises(VerificationError, match='not published with timm-gcp push'):
        verify_repo('org/tampered')


def test_verify_checks_every_download_against_the_hub(hub, exported):
    """Bytes that differ in transit from what the Hub stores: a data file fails its manifest sha256, the manifest
    itself its Hub object id (flipping its last byte keeps it valid JSON, so nothing else would notice)."""
    push_model(exported, 'org/transit', retry_delay=0.01)
    hub.corrupt_downloads = {'config.json'}
    with pytest.raises(VerificationError, match='config.json: downloaded sha256'):
        verify_repo('org/transit')
    hub.corrupt_downloads = {'timm_gcp_manifest.json'}
    with pytest.raises(VerificationError, match='timm_gcp_manifest.json: Hub git oid'):
        verify_repo('org/transit')


def test_cli_push_and_verify_never_print_the_token(exported, tmp_path, image_folder):
    """The CLIs as a user runs them: HF_ENDPOINT/HF_HOME/HF_TOKEN in the environment of fresh processes."""
    server = HubServer(token=TOKEN).start()
    try:
        env = {**os.environ, 'HF_ENDPOINT': server.endpoint, 'HF_HOME': str(tmp_path / 'hf_home'),
               'HF_TOKEN': TOKEN, 'HF_HUB_VERBOSITY': 'debug', 'HF_HUB_DISABLE_TELEMETRY': '1'}
        env.pop('HF_HUB_OFFLINE', None)
        push = subprocess.run([sys.executable, 'hub/push.py', str(exported), '--repo-id', 'org/cli',
                               '--commit-message', 'first upload', '--retry-delay', '0.01'],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert push.returncode == 0, push.stderr
        assert server.history('org/cli')[-1] in push.stdout and 'sha256' in push.stdout
        verify = subprocess.run([sys.executable, 'hub/verify.py', 'org/cli', '--data-dir', str(image_folder),
                                 '--tolerance', '0'], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        # the card says 50% top-1 on a toy set where the random model scores something else: a clear mismatch
        assert verify.returncode == 1 and 'top1: re-evaluated' in verify.stderr
        for output in (push.stdout, push.stderr, verify.stdout, verify.stderr):
            assert TOKEN not in output
    finally:
        server.stop()


def test_push_refuses_non_finite_or_local_content_before_any_request(hub, exported, tmp_path):
    """NaN weights, a NaN metric in the card's model-index or in config.json, and a local path in a published text
    are each refused with a message naming the file; nothing reaches the server."""
    original = {p.name: p.read_bytes() for p in exported.iterdir()}
    weights = load_file(str(exported / 'model.safetensors'))
    weights['fc.weight'][0, 0] = float('nan')
    save_file(weights, str(exported / 'model.safetensors'))
    with pytest.raises(ValueError,
                       match=r"model.safetensors has 1 non-finite tensors \(NaN/Inf\): fc.weight; the run"):
        push_model(exported, 'org/x')
    (exported / 'model.safetensors').write_bytes(original['model.safetensors'])

    card = original['README.md'].decode()
    assert card.count('value: 50.0') == 1
    (exported / 'README.md').write_text(card.replace('value: 50.0', 'value: .nan'))
    with pytest.raises(ValueError, match="model-index metrics of .*README.md must be finite numbers"):
        push_model(exported, 'org/x')
    (exported / 'README.md').write_text(card + f'\ntrained with --data-dir {tmp_path}/data\n')
    with pytest.raises(ValueError, match=rf"README.md would publish '{re.escape(str(tmp_path))}/data'"):
        push_model(exported, 'org/x')
    (exported / 'README.md').write_text(card)

    config = json.loads(original['config.json'])
    (exported / 'config.json').write_text(json.dumps({**config, 'best_top1': float('nan')}))
    with pytest.raises(ValueError, match='config.json is not valid JSON .*Out of range float'):
        push_model(exported, 'org/x')
    assert hub.requests == []


def test_file_digest_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 4099  # several of sha_fileobj's 1 MiB chunks
    (tmp_path / 'blob').write_bytes(data)
    expected = (hashlib.sha256(data).hexdigest(), len(data))
    assert file_digest(data) == expected and file_digest(tmp_path / 'blob') == expected
    assert file_digest(b'') == (hashlib.sha256(b'').hexdigest(), 0)


def test_verify_a_local_export_folder(model, exported, image_folder):
    accuracy = _accuracy(exported, image_folder)
    export_model(model, exported, label_names=LABELS, metrics={'top1': accuracy, 'top5': 100.0}, dataset='toy',
                 data_config={'input_size': (3, 64, 64), 'crop_pct': 1.0})
    report = verify_folder(exported, data_dir=image_folder, tolerance=0.01)
    assert report.commit is None and report.measured['top1'] == pytest.approx(accuracy)
    assert report.sha256 == {name: hashlib.sha256((exported / name).read_bytes()).hexdigest() for name in EXPORTED}

    export_model(model, exported, label_names=LABELS, metrics={'top1': accuracy + 20, 'top5': 100.0},
                 data_config={'input_size': (3, 64, 64), 'crop_pct': 1.0})
    with pytest.raises(VerificationError, match='top1: re-evaluated'):
        verify_folder(exported, data_dir=image_folder)
    weights = load_file(str(exported / 'model.safetensors'))
    save_file({**weights, 'extra.weight': torch.zeros(2)}, str(exported / 'model.safetensors'))
    _record_manifest(exported)  # past the sha256 check: the checks behind it still hold
    with pytest.raises(VerificationError, match=r'local-dir:.* does not load with timm: .*extra\.weight'):
        verify_folder(exported)
    weights['conv1.weight'][0] = float('inf')
    save_file(weights, str(exported / 'model.safetensors'))
    _record_manifest(exported)
    with pytest.raises(VerificationError, match='1 non-finite tensors'):
        verify_folder(exported)


EXPORTED = ('model.safetensors', 'config.json', 'README.md')


def _record_manifest(folder: Path) -> None:
    """Record the folder's files in its manifest again, as whoever changed them could (without timm_gcp)."""
    (folder / 'timm_gcp_manifest.json').write_bytes(build_manifest({name: folder / name for name in EXPORTED}))


def test_verify_names_a_file_changed_since_the_export(exported, tmp_path):
    """Issue 21, fault 7: one flipped byte inside model.safetensors passed `timm-gcp verify DIR` ("fit to
    publish"): nothing recorded at export time to check it against."""
    verify_folder(exported)
    weights = bytearray((exported / 'model.safetensors').read_bytes())
    weights[-1] ^= 1  # inside the last tensor's data: still a valid file, and loading it reproduces it exactly
    (exported / 'model.safetensors').write_bytes(bytes(weights))
    changed = rf'{re.escape(str(exported / "model.safetensors"))} differs from the export: sha256 [0-9a-f]{{64}} ' \
              rf'\({len(weights)} B\), recorded [0-9a-f]{{64}} \({len(weights)} B\) in timm_gcp_manifest.json'
    with pytest.raises(VerificationError, match=changed):
        verify_folder(exported)
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf_home')}
    proc = subprocess.run([sys.executable, 'hub/verify.py', str(exported)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ''
    assert re.fullmatch(f'timm-gcp verify: VerificationError: {changed}\n', proc.stderr), proc.stderr
    (exported / 'model.safetensors').unlink()
    with pytest.raises(VerificationError, match=r'model.safetensors differs from the export: missing, recorded'):
        verify_folder(exported)
    (exported / 'README.md').write_text((exported / 'README.md').read_text() + '\nedited\n')  # a card edited after
    with pytest.raises(VerificationError, match=r'README.md differs from the export: sha256'):   # export is named too
        verify_folder(exported)
    (exported / 'timm_gcp_manifest.json').unlink()
    with pytest.raises(VerificationError, match=r'has no timm_gcp_manifest.json: .* export the model again'):
        verify_folder(exported)


def test_a_card_changed_on_purpose_is_recorded_again(exported):
    (exported / 'README.md').write_text((exported / 'README.md').read_text() + '\n## Robustness\n\nmeasured later\n')
    with pytest.raises(VerificationError, match='README.md differs from the export'):
        verify_folder(exported)
    record_manifest(exported)  # what a tool that edits the card (e.g. adding measured results) does after
    assert verify_folder(exported).sha256['README.md'] == file_digest(exported / 'README.md')[0]


def test_verify_refuses_label_names_that_are_not_utf8(exported):
    """Issue 21, fault 10: config.json with the label 'dais\\udcff' (JSON's escape of a lone surrogate) passed."""
    config = json.loads((exported / 'config.json').read_text())
    (exported / 'config.json').write_text(json.dumps({**config, 'label_names': ['cat', 'dog', 'dais\udcff']}))
    _record_manifest(exported)
    with pytest.raises(VerificationError, match=r"label_names holds 'dais\\udcff', which is not valid UTF-8 text"):
        verify_folder(exported)


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]  # closed again: connections to it are refused


def test_an_unreachable_endpoint_is_named_with_the_time_spent(exported, tmp_path, monkeypatch, caplog):
    """Issue 21, fault 11: `timm-gcp push` to an unreachable endpoint retried for 36.6 s and its error did not name
    the endpoint. Now the first retry says how long retrying may take and the error names the endpoint."""
    endpoint = f'http://127.0.0.1:{_unused_port()}'
    point_client_at(monkeypatch, endpoint, tmp_path / 'hf_cache')
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    with caplog.at_level(logging.WARNING, logger='timm_gcp.hub.push'):
        with pytest.raises(ConnectionError, match=rf'^create_repo at {endpoint}: no connection after 3 attempt\(s\) '
                                                  rf'over [\d.]+ s \(ConnectError: .*\); check the network and '
                                                  rf'HF_ENDPOINT \(--max-retries, --retry-delay set the retries\)$'):
            push_model(exported, 'org/x', max_retries=2, retry_delay=0.01)
    assert [r.getMessage() for r in caplog.records] == [
        f'create_repo at {endpoint}: transient error (ConnectError); retry 1/2 in 0.0s (at most 0.03 s of retries '
        'in all)', f'create_repo at {endpoint}: transient error (ConnectError); retry 2/2 in 0.0s']
    env = {**os.environ, 'HF_ENDPOINT': endpoint, 'HF_TOKEN': TOKEN, 'HF_HOME': str(tmp_path / 'hf_home')}
    env.pop('HF_HUB_OFFLINE', None)
    proc = subprocess.run([str(Path(sys.executable).parent / 'timm-gcp'), 'push', str(exported), '--repo-id', 'org/x',
                           '--max-retries', '0'], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ''
    assert proc.stderr.startswith(f'timm-gcp push: ConnectionError: create_repo at {endpoint}: no connection after '
                                  f'1 attempt(s) over ') and proc.stderr.count('\n') == 1, proc.stderr


def test_cli_verifies_a_folder(model, exported, tmp_path, image_folder):
    """The installed `timm-gcp` console command and the `python hub/verify.py` script, in fresh processes."""
    export_model(model, exported, label_names=LABELS, metrics={'top1': 200 / 3, 'top5': 100.0}, dataset='toy',
                 data_config={'input_size': (3, 64, 64), 'crop_pct': 1.0})
    assert '| top1 | 66.67 |' in (exported / 'README.md').read_text()  # the card rounds as the training log does
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf_home')}
    console = Path(sys.executable).parent / 'timm-gcp'  # written by `pip install -e .` from [project.scripts]
    ok = subprocess.run([str(console), 'verify', str(exported), '--data-dir', str(image_folder), '--tolerance', '100'],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert 'local-dir: load reproduces model.safetensors exactly' in ok.stdout
    assert re.search(r'^re-evaluated on 9 images: top-1 \d+\.\d\d% top-5 \d+\.\d\d% \(card: top-1 66\.67% '
                     r'top-5 100\.00%\)$', ok.stdout, re.M), ok.stdout
    sha = hashlib.sha256((exported / 'model.safetensors').read_bytes()).hexdigest()
    assert f'sha256 {sha}  model.safetensors' in ok.stdout
    wrong = subprocess.run([sys.executable, 'hub/verify.py', str(exported), '--revision', 'main'], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines() == [f'timm-gcp verify: ValueError: {exported} is a local folder: '
                                                 '--revision and --catalogue apply to a repo id only']


def test_console_command_lists_its_subcommands_and_fails_in_one_line(tmp_path):
    console = Path(sys.executable).parent / 'timm-gcp'
    helped = subprocess.run([str(console), '--help'], capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0
    assert all(f'    {name}' in helped.stdout for name in ('push', 'verify', 'convert', 'model-table'))
    env = {**os.environ, 'HF_TOKEN': TOKEN}
    failed = subprocess.run([str(console), 'push', str(tmp_path / 'missing'), '--repo-id', 'org/x'], env=env,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and failed.stdout == ''
    assert failed.stderr.strip().splitlines() == [
        f'timm-gcp push: ValueError: {tmp_path / "missing"} is not a directory: expected an exported model folder '
        '(e.g. RUN_DIR/model)']
