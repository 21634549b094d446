"""The timm model contract for `gcp_<timm name>` models: one small model per registered family."""
import copy
import json

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import save_for_hf
from timm.optim import create_optimizer_v2
from torch import nn

import timm_gcp
from timm_gcp.layers import GCPPool

GCP_DIM = 8
TRIU = GCP_DIM * (GCP_DIM + 1) // 2
NUM_CLASSES = 5
IMG = 64  # 2x2 final maps at stride 32
FAMILY_MODELS = {  # timm module -> (model, kwargs) small enough for a shared 2-core machine
    'convnext': ('gcp_test_convnext', {}),
    'efficientnet': ('gcp_test_efficientnet', {}),
    'regnet': ('gcp_regnetx_002', {}),
    'resnet': ('gcp_test_resnet', {}),
    'resnetv2': ('gcp_resnetv2_50x1_bit', {}),
    'vision_transformer': ('gcp_test_vit', dict(img_size=IMG)),
    'deit': ('gcp_deit_tiny_patch16_224', dict(img_size=IMG)),
    'swin_transformer': ('gcp_swin_tiny_patch4_window7_224', dict(img_size=IMG, window_size=4)),
}


LAYOUTS = {'swin_transformer': 'NHWC', 'vision_transformer': 'NLC', 'deit': 'NLC'}  # of forward_features; else NCHW
OPTIONS = [pytest.param({}, id='plain'),  # as registered, and with every head option and the invariance at once
           pytest.param(dict(gaussian=True, progressive_widths=[16], compress_dim=4, group_conv=2, invariance='d4'),
                        id='options-d4')]


def test_every_family_has_a_model_here():
    assert set(FAMILY_MODELS) == set(timm_gcp.FAMILIES)


def test_registered_names():
    for module in timm_gcp.FAMILIES:
        missing = [b for b in timm.list_models(module=module) if not timm.is_model(f'gcp_{b}')]
        assert missing == (['deit_base_distilled_patch16_224', 'deit_base_distilled_patch16_384',
                            'deit_small_distilled_patch16_224', 'deit_tiny_distilled_patch16_224']
                           if module == 'deit' else []), module
    assert not timm.list_models('gcp_*distilled*')  # distilled DeiTs build only with their two-token head
    assert timm.models.get_pretrained_cfg('gcp_resnet50d').architecture == 'gcp_resnet50d'  # not GcpResNet's
    assert isinstance(timm.create_model('gcp_resnet50', device='meta'), timm_gcp.GcpResNet)  # the paper's stride 1


@pytest.fixture(scope='module', params=sorted(FAMILY_MODELS))
def case(request) -> dict:
    name, kwargs = FAMILY_MODELS[request.param]
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    model = timm.create_model(name, num_classes=NUM_CLASSES, gcp_dim=GCP_DIM, **kwargs).eval()
    with torch.no_grad():
        feats, intermediates = model.forward_intermediates(images)
        logits = model(images)
    return dict(family=request.param, name=name, kwargs=kwargs, images=images, model=model, feats=feats,
                intermediates=intermediates, logits=logits)


def _as_map(case: dict, feats: torch.Tensor) -> torch.Tensor:
    """The (B, C, H, W) map the head pools, written out per layout."""
    if case['family'] in ('vision_transformer', 'deit'):
        return feats[:, 1:].transpose(1, 2).unsqueeze(-1)  # one class token
    if case['family'] == 'swin_transformer':
        return feats.permute(0, 3, 1, 2)
    return feats


def test_features_head_and_logits(case):
    model, feats = case['model'], case['feats']
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(case['images']), feats, rtol=0, atol=0)
        pre = model.forward_head(feats, pre_logits=True)
        reference = model.global_pool(_as_map(case, feats))  # the GCP head on the map, without the wrapper
    assert model.output_fmt == LAYOUTS.get(case['family'], 'NCHW')  # declared as timm's models do (Swin: NHWC)
    assert feats.shape[get_channel_dim(model.output_fmt)] == model.num_features
    assert isinstance(model.global_pool, GCPPool) and model.head_hidden_size == TRIU == pre.shape[1]
    torch.testing.assert_close(pre, reference, rtol=0, atol=0)
    assert case['logits'].shape == (2, NUM_CLASSES) and torch.isfinite(case['logits']).all()
    assert model.get_classifier() is model.fc
    state = model.state_dict()
    cfg = model.pretrained_cfg
    assert f'{cfg["classifier"]}.weight' in state and f'{cfg["first_conv"]}.weight' in state


@pytest.mark.parametrize('family', sorted(set(FAMILY_MODELS) - {'vision_transformer', 'deit'}))
def test_feature_maps_match_the_default_cfg(family):
    """timm's own default-cfg check: at the default input size, forward_features' spatial axes (found from the
    model's `output_fmt`) are the cfg's pool_size and its channel axis is num_features."""
    model = timm.create_model(FAMILY_MODELS[family][0], num_classes=NUM_CLASSES, gcp_dim=GCP_DIM).eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, *cfg['input_size']))
    assert tuple(feats.shape[i] for i in get_spatial_dim(model.output_fmt)) == tuple(cfg['pool_size'])
    assert feats.shape[get_channel_dim(model.output_fmt)] == model.num_features


def test_tokens_pool_without_class_token():
    model = timm.create_model('gcp_test_vit', img_size=32, num_classes=0, gcp_dim=GCP_DIM).eval()
    tokens = torch.randn(2, 5, 64)  # class token + 2x2 patches
    changed = tokens.clone()
    changed[:, 0] = torch.randn(2, 64) * 100  # another class token
    shuffled = tokens[:, [0, 3, 1, 4, 2]]  # the patch tokens in another order: a covariance does not see order
    with torch.no_grad():
        pooled = model.forward_head(tokens)
        torch.testing.assert_close(model.forward_head(changed), pooled, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(shuffled), pooled, rtol=1e-5, atol=1e-6)


def test_every_parameter_is_trained(case):
    model = copy.deepcopy(case['model']).train()  # DDP fails on parameters without gradients
    model(case['images']).logsumexp(-1).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_intermediates_and_feature_info(case):
    model = case['model']
    assert len(case['intermediates']) == len(model.feature_info)
    for info, x in zip(model.feature_info, case['intermediates']):
        assert x.shape[1] == info['num_chs'] and info['module'].startswith('backbone.')
        assert x.shape[-1] == case['images'].shape[-1] // info['reduction']
        model.get_submodule(info['module'])  # names a real module


@pytest.mark.parametrize('options', OPTIONS)
def test_features_only(case, options):
    features_model = timm.create_model(case['name'], features_only=True, **case['kwargs'], **options).eval()
    with torch.no_grad():
        features = features_model(case['images'])
    channel_dim = -1 if case['family'] == 'swin_transformer' else 1  # timm's Swin features are NHWC
    assert [f.shape[channel_dim] for f in features] == features_model.feature_info.channels()
    model_info = [(i['num_chs'], i['reduction']) for i in case['model'].feature_info]
    assert list(zip(features_model.feature_info.channels(), features_model.feature_info.reduction())) == [
        model_info[i] for i in features_model.feature_info.out_indices]


def test_fx_feature_extraction(case):
    """timm's torch.fx extractor through the backbone (the GCP head's tracing is GCPPool's business)."""
    model = timm.create_model(case['name'], num_classes=0, global_pool='', **case['kwargs']).eval()
    last = model.feature_info[-1]['module']
    extractor = timm.models.create_feature_extractor(model, return_nodes={last: 'last', 'backbone': 'out'})
    x = case['images'].clone().requires_grad_(True)
    out = extractor(x)
    with torch.no_grad():
        torch.testing.assert_close(out['out'], model(case['images']), rtol=0, atol=0)
    out['last'].sum().backward()  # backward through the traced graph
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def check_reset_classifier(model, feats: torch.Tensor, feature_map: torch.Tensor) -> nn.Module:
    """timm's reset_classifier on a copy of `model`: a new classifier keeps the trained GCP reduction, 0 classes gives
    the pre-logits, no pooling the unpooled features, 'avg' the mean of `feature_map`, 'gcp' a fresh GCP head in the
    model's (eval) mode. Returns the copy."""
    m = copy.deepcopy(model)
    pool = m.global_pool
    with torch.no_grad():
        pre = m.forward_head(feats, pre_logits=True)
        m.reset_classifier(3)
        assert m.global_pool is pool and m.forward_head(feats).shape == (2, 3)
        m.reset_classifier(0)
        torch.testing.assert_close(m.forward_head(feats), pre)
        m.reset_classifier(0, '')  # no pooling: unpooled features, as timm's prune_intermediate_layers needs
        assert m.head_hidden_size == m.num_features
        torch.testing.assert_close(m.forward_head(feats), feats)
        m.reset_classifier(4, 'avg')
        assert m.forward_head(feats).shape == (2, 4)
        torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feature_map.mean((2, 3)))
        m.reset_classifier(7, 'gcp')
        assert isinstance(m.global_pool, GCPPool) and not m.global_pool.training
        assert m.forward_head(feats).shape == (2, 7)
    return m


def test_reset_classifier(case):
    check_reset_classifier(case['model'], case['feats'], _as_map(case, case['feats']))
    headless = timm.create_model(case['name'], num_classes=0, global_pool='', **case['kwargs']).eval()
    with torch.no_grad():
        assert headless(case['images']).shape == case['feats'].shape


def test_prune_intermediate_layers(case):
    m = copy.deepcopy(case['model'])
    m.prune_intermediate_layers(indices=[1])
    with torch.no_grad():
        kept = m.forward_intermediates(case['images'], indices=[1], intermediates_only=True)
    assert m.num_classes == 0
    torch.testing.assert_close(kept[0], case['intermediates'][1])


def test_grad_checkpointing(case):
    model = copy.deepcopy(case['model'])
    x = case['images'][:1].clone().requires_grad_(True)
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, case['logits'][:1], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_layer_decay_groups(case):
    model = case['model']
    optimizer = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.75)
    scale = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    params = dict(model.named_parameters())
    assert len(scale) == len(params)
    for name in ('fc.weight', 'global_pool.conv.weight', 'global_pool.bn.weight'):
        assert scale[id(params[name])] == 1.0  # the head learns at the full rate
    first = next(iter(params))  # the stem's first parameter
    assert first.startswith('backbone.') and scale[id(params[first])] == min(scale.values()) < 1.0


@pytest.mark.parametrize('options', OPTIONS)
def test_export_round_trip(case, options, tmp_path):
    model = copy.deepcopy(case['model']) if not options else timm.create_model(
        case['name'], num_classes=NUM_CLASSES, gcp_dim=GCP_DIM, **case['kwargs'], **options).eval()
    model.set_meta_layer('isqrt', num_iter=3)
    save_for_hf(model, tmp_path, safe_serialization=True, model_args=model.gcp_model_args())
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    saved_args = json.loads((tmp_path / 'config.json').read_text())['model_args']  # timm writes img_size as [h, w]
    assert reloaded.gcp_model_args() == saved_args == json.loads(json.dumps(model.gcp_model_args())) | saved_args
    with torch.no_grad():
        assert torch.equal(reloaded(case['images']), model(case['images']))


@pytest.mark.parametrize('family', sorted(FAMILY_MODELS))
def test_device_and_dtype_reach_every_module(family):
    name, kwargs = FAMILY_MODELS[family]
    model = timm.create_model(name, device='meta', dtype=torch.float64, num_classes=3, **kwargs)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {('meta', torch.float64)}
    assert 'device' not in model.gcp_model_args() and 'dtype' not in model.gcp_model_args()


def test_gcp_dim_default_and_limit():
    with torch.device('meta'):
        assert timm.create_model('gcp_test_vit').gcp_dim == 64  # the backbone width, below 256
        assert timm.create_model('gcp_convnext_tiny').gcp_dim == 256
    with pytest.raises(ValueError, match=r'^gcp_test_vit: gcp_dim must be an int from 1 to 64 .*got 65'):
        timm.create_model('gcp_test_vit', gcp_dim=65)


def test_base_options_pass_through():
    with torch.device('meta'):
        model = timm.create_model('gcp_test_vit', img_size=48, drop_path_rate=0.1, meta_layer='cov')
    assert model.backbone.patch_embed.img_size == (48, 48)
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.gcp_model_args()['img_size'] == 48 and model.global_pool.meta_layer_name == 'cov'


@pytest.mark.slow
def test_torch_compile():
    model = timm.create_model('gcp_test_convnext', num_classes=NUM_CLASSES, gcp_dim=GCP_DIM).eval()
    images = torch.randn(2, 3, IMG, IMG)
    compiled = torch.compile(model, backend='aot_eager')
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_every_registered_model_builds_and_pools_on_meta():
    """timm's own check: every gcp_* architecture built on the meta device pools its features to logits."""
    failures = []
    for name in timm.list_models(['gcp_*', 'gsop_*', 'idccp_*']):
        try:
            with torch.device('meta'):
                model = timm.create_model(name, num_classes=3)
                out = model(torch.empty(1, *model.pretrained_cfg['input_size']))
            assert out.shape == (1, 3)
        except Exception as err:  # collected: the assertion names every failing architecture
            failures.append(f'{name}: {type(err).__name__}: {err}')
    assert failures == []
