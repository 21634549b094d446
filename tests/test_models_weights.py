"""Weights in and out of GCP models: Hub-format export and reload (local-dir:, offline hf-hub:), head replacement,
and backbone initialisation from plain timm ResNets."""
import json
import logging
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from timm.models import save_for_hf

import timm_gcp
from timm_gcp.layers import head_option_defaults

GCP_DIM = 16
IMG = 32
FAKE_COMMIT = 'a' * 40


@pytest.fixture(scope='module')
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache with HF_HUB_OFFLINE=1 in effect (the Hub is never contacted)."""
    cache = tmp_path / 'hf-cache'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    return cache


def add_to_hf_cache(cache: Path, repo_id: str, files: Path) -> None:
    """Lay out `files`' contents as the main revision of model repo `repo_id` in a Hugging Face cache."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    shutil.copytree(files, repo / 'snapshots' / FAKE_COMMIT)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(FAKE_COMMIT)


def export(model: torch.nn.Module, directory: Path) -> Path:
    save_for_hf(model, directory, safe_serialization=True, model_args=model.gcp_model_args())
    return directory


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        if not k.startswith(skip):
            assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope='module')
def trained_gcp_resnet18() -> torch.nn.Module:
    """A gcp_resnet18 with non-default kwargs, a switched meta-layer and perturbed BN statistics."""
    model = timm.create_model('gcp_resnet18', num_classes=10, gcp_dim=GCP_DIM, drop_rate=0.1)
    model.set_meta_layer('isqrt', num_iter=3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.9, 1.1)
    return model.eval()


def test_local_dir_round_trip(trained_gcp_resnet18, images, tmp_path):
    directory = export(trained_gcp_resnet18, tmp_path / 'export')
    assert sorted(p.name for p in directory.iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((directory / 'config.json').read_text())
    assert config['architecture'] == 'gcp_resnet18'
    assert config['model_args'] == dict(
        num_classes=10, in_chans=3, global_pool='gcp', gcp_dim=GCP_DIM, meta_layer='isqrt',
        meta_layer_kwargs={'num_iter': 3}, layer4_stride=1, **head_option_defaults(), invariance=None,
        invariance_mode='train')
    reloaded = timm.create_model(f'local-dir:{directory}', pretrained=True).eval()
    assert reloaded.global_pool.meta_layer.num_iter == 3 and reloaded.gcp_model_args() == config['model_args']
    assert_same_weights(reloaded, trained_gcp_resnet18)
    with torch.no_grad():
        assert torch.equal(reloaded(images), trained_gcp_resnet18(images))  # bit-identical


@pytest.mark.parametrize('head', [
    {'meta_layer': 'isice', 'meta_layer_kwargs': {'lam': 0.05, 'steps': 3}},
    {'riemannian': 'chol_tmlr'},
    {'meta_layer': 'eig', 'meta_layer_kwargs': {'alpha': 0.4}, 'riemannian': 'log_emlr'},
], ids=['isice', 'chol_tmlr', 'eig-log_emlr'])
def test_head_options_round_trip(head, images, tmp_path):
    """config.json carries the meta-layer's and the head's options: the reload computes the same function."""
    model = timm.create_model('gcp_resnet18', num_classes=4, gcp_dim=GCP_DIM, **head).eval()
    directory = export(model, tmp_path / 'export')
    config = json.loads((directory / 'config.json').read_text())['model_args']
    assert {k: config[k] for k in head} == head
    reloaded = timm.create_model(f'local-dir:{directory}', pretrained=True).eval()
    assert reloaded.gcp_model_args() == model.gcp_model_args()
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))


def test_gsop_net1_round_trip(images, tmp_path):
    model = timm.create_model('gsop_resnet50', gsop_net=1, num_classes=5).eval()
    directory = export(model, tmp_path / 'gsop')
    reloaded = timm.create_model(f'local-dir:{directory}', pretrained=True).eval()
    assert reloaded.gcp_model_args() == model.gcp_model_args()
    assert reloaded.global_pool.pool_type == 'avg' and reloaded.gsop_net == 1
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))


def test_gap_pooled_gcp_resnet_round_trip(images, tmp_path, caplog):
    """With global_pool='avg' the checkpoint has a plain ResNet's keys: loaded from its folder it is still the
    model's own, classifier included (not a backbone with a fresh fc)."""
    model = timm.create_model('gcp_resnet18', num_classes=3, global_pool='avg').eval()
    with caplog.at_level(logging.WARNING):
        reloaded = timm.create_model(f'local-dir:{export(model, tmp_path / "gap")}', pretrained=True).eval()
    assert not caplog.records
    assert_same_weights(reloaded, model)
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))


def test_hf_hub_offline_round_trip(trained_gcp_resnet18, images, tmp_path, offline_hub):
    repo_id = f'{timm_gcp.HUB_ORG}/gcp_resnet18.in1k'
    add_to_hf_cache(offline_hub, repo_id, export(trained_gcp_resnet18, tmp_path / 'export'))
    reloaded = timm.create_model(f'hf-hub:{repo_id}', pretrained=True).eval()
    assert reloaded.gcp_model_args() == trained_gcp_resnet18.gcp_model_args()
    assert_same_weights(reloaded, trained_gcp_resnet18)
    with torch.no_grad():
        assert torch.equal(reloaded(images), trained_gcp_resnet18(images))


def test_gcp_checkpoint_file_loads_whole_and_replaces_only_fc(tmp_path):
    source = timm.create_model('gcp_resnet50', gcp_dim=GCP_DIM).eval()  # 1000 classes, like an ImageNet tag
    file = export(source, tmp_path / 'export') / 'model.safetensors'
    same = timm.create_model('gcp_resnet50', pretrained=True, gcp_dim=GCP_DIM, pretrained_cfg_overlay=dict(file=file))
    assert_same_weights(same, source)
    transfer = timm.create_model('gcp_resnet50', pretrained=True, num_classes=200, gcp_dim=GCP_DIM,
                                 pretrained_cfg_overlay=dict(file=file))
    assert transfer.fc.weight.shape == (200, GCP_DIM * (GCP_DIM + 1) // 2)
    assert_same_weights(transfer, source, skip=('fc.',))  # the GCP reduction and backbone come from the checkpoint
    partial = {k: v for k, v in source.state_dict().items() if k != 'global_pool.bn.weight'}
    safetensors.torch.save_file(partial, tmp_path / 'partial.safetensors')
    with pytest.raises(ValueError, match=r'gcp_resnet50.* 1 missing \(e\.g\. global_pool\.bn\.weight\)'):
        timm.create_model('gcp_resnet50', pretrained=True, gcp_dim=GCP_DIM,
                          pretrained_cfg_overlay=dict(file=tmp_path / 'partial.safetensors'))


@pytest.fixture(scope='module')
def resnet18_checkpoint(tmp_path_factory) -> tuple:
    """A plain timm resnet18 and its weights saved as .safetensors and as a {'state_dict': ...} .pth."""
    resnet = timm.create_model('resnet18')
    directory = tmp_path_factory.mktemp('resnet18')
    state = resnet.state_dict()
    safetensors.torch.save_file(state, directory / 'resnet18.safetensors')
    torch.save({'state_dict': state, 'epoch': 3}, directory / 'resnet18.pth')
    return resnet, directory


def _head_keys(model: torch.nn.Module) -> list:
    return sorted(k for k in model.state_dict() if k.startswith(('global_pool.', 'fc.')))


@pytest.mark.parametrize('filename', ['resnet18.safetensors', 'resnet18.pth'])
def test_load_backbone_weights_from_file(resnet18_checkpoint, filename, caplog):
    resnet, directory = resnet18_checkpoint
    model = timm.create_model('gcp_resnet18', num_classes=10, gcp_dim=GCP_DIM)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(('global_pool.', 'fc.'))}
    with caplog.at_level(logging.WARNING):
        new_keys = timm_gcp.load_backbone_weights(model, directory / filename)
    assert new_keys == _head_keys(model)
    assert 'global_pool.conv.weight' in caplog.text and 'fc.weight' in caplog.text
    plain = resnet.state_dict()
    for k, v in model.state_dict().items():
        if k in head_before:
            assert torch.equal(v, head_before[k]), k  # the head keeps its fresh initialisation
        else:
            assert torch.equal(v, plain[k]), k


def test_load_backbone_weights_gsop_from_resnet50(tmp_path):
    resnet = timm.create_model('resnet50')
    path = tmp_path / 'resnet50.safetensors'
    safetensors.torch.save_file(resnet.state_dict(), path)
    model = timm.create_model('gsop_resnet50', num_classes=10, gcp_dim=GCP_DIM)
    new_keys = timm_gcp.load_backbone_weights(model, path)
    assert {k.split('.se.')[0] for k in new_keys if '.se.' in k} == {'layer1.2', 'layer2.3', 'layer3.5'}
    assert all('.se.' in k or k.startswith(('global_pool.', 'fc.')) for k in new_keys)
    assert torch.equal(model.layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)


def test_load_backbone_weights_from_timm_name(resnet18_checkpoint, tmp_path, offline_hub):
    resnet, directory = resnet18_checkpoint
    files = tmp_path / 'hub-files'
    files.mkdir()
    shutil.copy(directory / 'resnet18.safetensors', files / 'model.safetensors')
    add_to_hf_cache(offline_hub, 'timm/resnet18.a1_in1k', files)  # where timm resolves 'resnet18.a1_in1k'
    model = timm.create_model('gcp_resnet18', num_classes=10, gcp_dim=GCP_DIM)
    assert timm_gcp.load_backbone_weights(model, 'resnet18.a1_in1k') == _head_keys(model)
    assert torch.equal(model.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)


def test_load_backbone_weights_rejects_other_architectures(resnet18_checkpoint, tmp_path):
    _, directory = resnet18_checkpoint
    model = timm.create_model('gcp_resnet34', num_classes=10, gcp_dim=GCP_DIM)
    with pytest.raises(ValueError, match=r'missing \(e\.g\. layer1\.2\.'):
        timm_gcp.load_backbone_weights(model, directory / 'resnet18.safetensors')
    state = safetensors.torch.load_file(directory / 'resnet18.safetensors')
    state['layer4.0.conv1.weight'] = torch.zeros(512, 256, 1, 1)
    state['extra.weight'] = torch.zeros(1)
    safetensors.torch.save_file(state, tmp_path / 'odd.safetensors')
    model = timm.create_model('gcp_resnet18', num_classes=10, gcp_dim=GCP_DIM)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r'1 unexpected \(e\.g\. extra\.weight\); 1 mismatched .*layer4\.0\.conv1'):
        timm_gcp.load_backbone_weights(model, tmp_path / 'odd.safetensors')
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was loaded
    with pytest.raises(FileNotFoundError, match='no_such.pth'):
        timm_gcp.load_backbone_weights(model, tmp_path / 'no_such.pth')
    with pytest.raises(ValueError, match='neither a checkpoint file nor a timm model name'):
        timm_gcp.load_backbone_weights(model, 'not_a_model.tag')
