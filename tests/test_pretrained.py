"""`pretrained=True` on GCP tags: timm's backbone weights served by the project's Hub-protocol server
(tests/hub_server.py) in timm's repo layout, fetched by the real huggingface_hub client through timm."""
import logging

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file
from timm.models import save_for_hf

import timm_gcp
from hub_server import HubServer, point_client_at

GCP_DIM = 8
IMG = 64
SERVED = {  # GCP tag -> the timm repo (under timm/) its backbone comes from
    'gcp_resnet18.a1_in1k': 'resnet18.a1_in1k',
    'gcp_test_convnext.r160_in1k': 'test_convnext.r160_in1k',
    'gcp_test_vit.r160_in1k': 'test_vit.r160_in1k',
}
BASE_HEAD = {'resnet18': ('fc.',), 'test_convnext': ('head.fc.',), 'test_vit': ('head.',)}  # not loaded


def gcp_key(arch: str, key: str) -> str:
    """Where a timm checkpoint key lands in the GCP model, written out per architecture."""
    if arch == 'resnet18':
        return key  # GcpResNet is a timm ResNet
    return 'backbone.' + key.replace('head.norm.', 'norm_pre.')  # ConvNeXt's head norm runs before the GCP head


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    """The server with one randomly initialised timm model per repo; yields (server, repo -> served tensors)."""
    server = HubServer().start()
    api = HfApi(endpoint=server.endpoint, token=False)
    served = {}
    for i, repo in enumerate(SERVED.values()):
        torch.manual_seed(100 + i)
        directory = tmp_path_factory.mktemp(repo)
        save_for_hf(timm.create_model(repo.split('.')[0]), directory, safe_serialization=True)
        api.create_repo(f'timm/{repo}')
        api.upload_folder(repo_id=f'timm/{repo}', folder_path=directory)
        served[repo] = load_file(directory / 'model.safetensors')
    yield server, served
    server.stop()


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    point_client_at(monkeypatch, hub[0].endpoint, tmp_path / 'hf-cache')
    return hub


def go_offline(monkeypatch) -> None:
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)


def images() -> torch.Tensor:
    return torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize('name', list(SERVED))
def test_pretrained_backbone_then_cache_then_export(name, online, monkeypatch, caplog, tmp_path):
    server, served = online
    repo = SERVED[name]
    arch = repo.split('.')[0]
    kwargs = dict(num_classes=7, gcp_dim=GCP_DIM)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO):
        model = timm.create_model(name, pretrained=True, **kwargs)
    torch.manual_seed(0)
    fresh = timm.create_model(name, **kwargs)  # the same initialisation, no download

    state = model.state_dict()
    expected = {gcp_key(arch, k): v for k, v in served[repo].items() if not k.startswith(BASE_HEAD[arch])}
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key  # every backbone tensor, bit for bit
    new_keys = sorted(set(state) - set(expected))
    assert new_keys and all(k.startswith(('global_pool.', 'fc.')) for k in new_keys)
    for key in new_keys:
        assert torch.equal(state[key], fresh.state_dict()[key]), key  # the GCP head is freshly initialised
    logged = [r.getMessage() for r in caplog.records if 'keys are new' in r.getMessage()]
    assert len(logged) == 1 and 'global_pool.conv.weight' in logged[0] and f'timm/{repo}' in logged[0]
    timm_missing = [r.getMessage() for r in caplog.records if 'Missing keys' in r.getMessage()]
    assert not any('global_pool' in m for m in timm_missing)  # the load is complete: timm misses only the new fc
    timm_cfg = timm.models.get_pretrained_cfg(repo)
    for field in ('hf_hub_id', 'mean', 'std', 'interpolation', 'crop_pct', 'license'):
        assert model.pretrained_cfg[field] == getattr(timm_cfg, field), field

    requests = len(server.requests)
    go_offline(monkeypatch)
    cached = timm.create_model(name, pretrained=True, **kwargs)
    assert len(server.requests) == requests  # the second load came from the cache
    assert all(torch.equal(cached.state_dict()[k], v) for k, v in expected.items())

    model.train()  # one fine-tuning step, then the export must reload to the same outputs
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(images()), torch.arange(4)).backward()
    optimizer.step()
    model.eval()
    save_for_hf(model, tmp_path / 'export', safe_serialization=True, model_args=model.gcp_model_args())
    reloaded = timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images()), model(images()))


@pytest.mark.parametrize('name', ['gcp_resnet18.a1_in1k', 'gcp_test_convnext.r160_in1k'])
def test_features_only_pretrained(name, online):
    _, served = online
    repo = SERVED[name]
    features = timm.create_model(name, pretrained=True, features_only=True)
    state = features.state_dict()
    arch = repo.split('.')[0]
    for key, tensor in served[repo].items():
        local = gcp_key(arch, key).removeprefix('backbone.')
        if local in state:
            assert torch.equal(state[local], tensor), key
    assert any(k.startswith(('layer4.', 'stages_3.', 'stages.3.')) for k in state)  # the last stage is there


def test_only_loadable_tags_are_listed():
    tags = timm.list_pretrained('gcp_*') + timm.list_pretrained('gsop_*')
    timm_tags = set(timm.list_pretrained())
    assert len(tags) > 700
    for name in tags:
        arch, tag = name.split('.', 1)
        base = arch.split('_', 1)[1]
        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
        assert f'{base}.{tag}' in timm_tags, name
        assert hub_id.startswith('timm/') and hub_id == timm.models.get_pretrained_cfg(f'{base}.{tag}').hf_hub_id
    assert {'gcp_resnet50.a1_in1k', 'gcp_resnet50.tv2_in1k', 'gsop_resnet101.a1h_in1k', 'gcp_convnext_tiny.fb_in22k',
            'gcp_vit_small_patch16_224.augreg_in21k_ft_in1k', 'gcp_efficientnet_b0.ra_in1k',
            'gcp_swin_tiny_patch4_window7_224.ms_in1k'} <= set(tags)
    for arch in ('gcp_resnet18', 'gcp_resnet50', 'gsop_resnet50'):
        base = arch.split('_', 1)[1]
        assert timm.models.get_pretrained_cfg(arch).tag == timm.models.get_pretrained_cfg(base).tag  # timm's default
        assert len(timm.list_pretrained(f'{arch}.*')) == len(
            [t for t in timm.list_pretrained(f'{base}.*') if timm.models.get_pretrained_cfg(t).hf_hub_id])
    assert timm.models.get_pretrained_cfg('gcp_resnet50.a1_in1k').pool_size == (14, 14)  # layer4 at stride 1


def test_missing_backbone_tensor_is_an_error(online, tmp_path):
    server, _ = online
    directory = tmp_path / 'partial'
    save_for_hf(timm.create_model('test_resnet'), directory, safe_serialization=True)
    state = load_file(directory / 'model.safetensors')
    del state['layer2.0.conv1.weight']
    from safetensors.torch import save_file
    save_file(state, directory / 'model.safetensors')
    api = HfApi(endpoint=server.endpoint, token=False)
    api.create_repo('timm/test_resnet.r160_in1k', exist_ok=True)
    api.upload_folder(repo_id='timm/test_resnet.r160_in1k', folder_path=directory)
    with pytest.raises(ValueError, match=r'timm/test_resnet.r160_in1k is not a backbone checkpoint .*gcp_test_resnet'
                                         r'.*1 missing \(e\.g\. backbone\.layer2\.0\.conv1\.weight\)'):
        timm.create_model('gcp_test_resnet.r160_in1k', pretrained=True)


def test_unknown_tag():
    with pytest.raises(ValueError, match=r"gcp_resnet18 has no pretrained tag 'in1k'; .*a1_in1k, a2_in1k"):
        timm.create_model('gcp_resnet18.in1k')
    with pytest.raises(ValueError, match=r"gcp_test_vit has no pretrained tag 'nope'.*r160_in1k"):
        timm.create_model('gcp_test_vit.nope', features_only=True)


def test_offline_without_cache(monkeypatch, tmp_path):
    point_client_at(monkeypatch, 'http://127.0.0.1:9', tmp_path / 'empty-cache')
    go_offline(monkeypatch)
    with pytest.raises(RuntimeError, match=r'gcp_resnet18.a1_in1k: cannot load the weights of Hub repo '
                                           r'timm/resnet18.a1_in1k \(HF_HUB_OFFLINE is set'):
        timm.create_model('gcp_resnet18', pretrained=True)


def test_unreachable_hub_fails_at_once(monkeypatch, tmp_path, caplog):
    point_client_at(monkeypatch, 'http://127.0.0.1:9', tmp_path / 'empty-cache')  # nothing listens on port 9
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError) as info:
        timm.create_model('gcp_test_convnext.r160_in1k', pretrained=True)
    message = str(info.value)
    assert 'gcp_test_convnext.r160_in1k' in message and 'timm/test_convnext.r160_in1k' in message
    assert 'http://127.0.0.1:9 cannot deliver them' in message and 'pretrained_cfg_overlay' in message
    assert 'Retrying' not in caplog.text  # one attempt, not huggingface_hub's minute of back-off


def test_load_backbone_weights_from_an_unreachable_hub(monkeypatch, tmp_path):
    point_client_at(monkeypatch, 'http://127.0.0.1:9', tmp_path / 'empty-cache')
    model = timm.create_model('gcp_test_resnet', num_classes=3, gcp_dim=GCP_DIM)
    with pytest.raises(RuntimeError, match=r'^test_resnet.r160_in1k: cannot load .* Hub repo timm/test_resnet.r160'):
        timm_gcp.load_backbone_weights(model, 'test_resnet.r160_in1k')
    go_offline(monkeypatch)
    with pytest.raises(RuntimeError, match=r'timm/test_resnet.r160_in1k \(HF_HUB_OFFLINE is set'):
        timm_gcp.load_backbone_weights(model, 'test_resnet.r160_in1k')


def test_load_backbone_weights_of_any_family(online):
    _, served = online
    model = timm.create_model('gcp_test_vit', num_classes=3, gcp_dim=GCP_DIM)
    new_keys = timm_gcp.load_backbone_weights(model, 'test_vit.r160_in1k')  # the same loading as pretrained=True
    assert new_keys and all(k.startswith(('global_pool.', 'fc.')) for k in new_keys)
    assert torch.equal(model.backbone.blocks[2].mlp.fc1.weight, served['test_vit.r160_in1k']['blocks.2.mlp.fc1.weight'])


@pytest.mark.parametrize('head', [{'meta_layer': 'isice'}, {'riemannian': 'chol_tmlr'}], ids=['isice', 'chol_tmlr'])
def test_pretrained_backbone_with_a_new_head_method(head, online):
    """`timm.create_model('gcp_resnet50.a1_in1k', pretrained=True, num_classes=200, meta_layer='isice')`, on the
    served ResNet-18: timm's backbone weights, the chosen head, 200 classes."""
    _, served = online
    model = timm.create_model('gcp_resnet18.a1_in1k', pretrained=True, num_classes=200, gcp_dim=GCP_DIM, **head)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in served['resnet18.a1_in1k'].items() if not k.startswith('fc.'))
    assert model.fc.out_features == 200 and all(model.gcp_model_args()[k] == v for k, v in head.items())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(images())).all()


def test_the_published_tag_builds_with_a_new_head_method():
    model = timm.create_model('gcp_resnet50.a1_in1k', pretrained=False, num_classes=200, meta_layer='isice',
                              gcp_dim=GCP_DIM)
    assert model.pretrained_cfg['hf_hub_id'] == 'timm/resnet50.a1_in1k' and model.global_pool.meta_layer_name == 'isice'
