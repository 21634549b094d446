"""timm's model contract as timm's own tests exercise it, for every registered GCP model and the GCP layers: the meta
device, pure bf16/fp16 inference, torch.fx feature extraction (forward and backward), TorchScript refused clearly."""
from collections import OrderedDict

import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names
from torch import nn

import timm_gcp
from timm_gcp.layers import GCPPool, GSoPBlock
from timm_gcp.meta_layers import MetaLayer

MODELS = [n for n in ('gcp_resnet18', 'gsop_resnet50', 'gcp_test_resnet', 'gcp_test_convnext', 'gcp_test_efficientnet',
                      'gcp_test_vit') if timm.is_model(n)]
NUM_CLASSES = 5
GCP_DIM = 8
HEAD_OPTIONS = dict(gaussian=True, progressive_widths=[16], compress_dim=4, group_conv=2)  # all at once
INVARIANT = dict(HEAD_OPTIONS, invariance='d4')
CASES = [pytest.param(n, {}, id=n) for n in MODELS] + [  # every model as registered, then with the options
    pytest.param('gcp_resnet18', INVARIANT, id='gcp_resnet18-options-d4'),
    pytest.param('gcp_test_vit', INVARIANT, id='gcp_test_vit-options-d4'),
    pytest.param('idccp_resnet18', dict(compress_dim=4), id='idccp_resnet18'),
]


def gcp_head(in_chs: int, num_classes: int, dim: int, **kwargs) -> nn.Sequential:
    """GCPPool then a linear classifier: the head the GCP models build."""
    pool = GCPPool(in_chs, dim, **kwargs)
    return nn.Sequential(OrderedDict(global_pool=pool, fc=nn.Linear(pool.out_features, num_classes)))


def create(name: str, options: dict, **kwargs) -> nn.Module:
    return timm.create_model(name, num_classes=NUM_CLASSES, gcp_dim=GCP_DIM, **options, **kwargs)


def images(model: nn.Module, batch: int = 2, **kwargs) -> torch.Tensor:
    """A small batch: 64 px where the model takes any size, else its configured input size."""
    size = model.pretrained_cfg.get('input_size', (3, 224, 224))
    if getattr(model, 'dynamic_img_size', True) and not hasattr(model, 'patch_embed'):
        size = (size[0], 64, 64)
    return torch.randn(batch, *size, **kwargs)


def pool_of(model: nn.Module) -> str:
    """Qualified name of the model's GCP head."""
    return next(name for name, module in model.named_modules() if isinstance(module, GCPPool))


def backbone_with_head() -> nn.Module:
    """A timm backbone, a GSoP block and a GCP head: only timm_gcp.layers code between timm modules."""
    backbone = timm.create_model('resnet18', num_classes=0, global_pool='')
    return nn.Sequential(backbone, GSoPBlock(512, dim=8), gcp_head(512, NUM_CLASSES, dim=GCP_DIM))


# ---------------------------------------------------------------- meta device

@pytest.mark.parametrize('name, options', CASES)
def test_builds_and_runs_on_the_meta_device(name, options):
    model = create(name, options, device='meta').eval()
    x = images(model, device='meta')
    assert {p.device.type for p in model.parameters()} == {'meta'}
    assert model(x).shape == (2, NUM_CLASSES)
    with torch.device('meta'):
        assert create(name, options).eval()(images(model)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize('method', timm_gcp.list_meta_layers())
def test_every_meta_layer_runs_on_the_meta_device(method):
    head = gcp_head(16, NUM_CLASSES, dim=GCP_DIM, meta_layer=method, meta_layer_kwargs=None).to('meta')
    out = head(torch.zeros(3, 16, 4, 4, device='meta'))
    assert out.shape == (3, NUM_CLASSES) and out.device.type == 'meta'


# ---------------------------------------------------------------- pure bf16 / fp16

def float32_meta_layers(model: nn.Module) -> list:
    """Records the dtype of every meta-layer output during the next forward."""
    seen = []
    for module in model.modules():
        if isinstance(module, MetaLayer):
            module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('name, options', CASES)
def test_pure_low_precision_inference(name, options, dtype):
    model = create(name, options).eval()
    x = images(model)
    with torch.no_grad():
        reference = model(x)
        model.to(dtype)
        seen = float32_meta_layers(model)
        out = model(x.to(dtype))
    assert out.dtype == dtype and out.shape == (2, NUM_CLASSES)
    assert seen and set(seen) == {torch.float32}  # the covariance and meta-layer compute in float32 inside
    assert torch.isfinite(out).all()
    # the low-precision model computes the float32 model's logits up to its rounding
    assert (out.float() - reference).abs().max() <= 0.1 * reference.abs().max()


@pytest.mark.parametrize('method', timm_gcp.list_meta_layers())
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_gcp_head_returns_its_input_dtype_and_float32_under_autocast(method, dtype):
    head = gcp_head(16, NUM_CLASSES, dim=GCP_DIM, meta_layer=method).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        reference = head.global_pool(x)
        pooled = head.to(dtype).global_pool(x.to(dtype))
        assert head(x.to(dtype)).dtype == dtype
        with torch.autocast('cpu', dtype=dtype):
            assert head.global_pool(x.to(dtype)).dtype == torch.float32
    assert pooled.dtype == dtype
    torch.testing.assert_close(pooled.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


# ---------------------------------------------------------------- torch.fx

def check_traced(model: nn.Module, x: torch.Tensor) -> None:
    """The fx graph returns what eager returns (pooled features and output), and a backward through it gives the
    GCP head's parameters eager's (non-zero) gradients."""
    pool = pool_of(model)
    last = get_graph_node_names(model)[1][-1]
    extractor = create_feature_extractor(model, return_nodes={pool: 'pooled', last: 'out'}).eval()
    model.eval()
    captured = []
    model.get_submodule(pool).register_forward_hook(lambda m, args, out: captured.append(out))
    expected = model(x)
    expected.logsumexp(dim=1).sum().backward()
    params = list(model.get_submodule(pool).parameters())
    eager_grads = [p.grad.clone() for p in params]
    model.zero_grad()
    traced = extractor(x)
    torch.testing.assert_close(traced['out'], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(traced['pooled'], captured[0], rtol=1e-4, atol=1e-5)
    traced['out'].logsumexp(dim=1).sum().backward()
    for param, eager in zip(params, eager_grads):
        torch.testing.assert_close(param.grad, eager, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in eager_grads)


@pytest.mark.parametrize('name, options', CASES)
def test_fx_feature_extraction_forward_and_backward(name, options):
    model = create(name, options)
    check_traced(model, images(model))


@pytest.mark.parametrize('name, options', CASES)
def test_fx_features_only(name, options):
    model = timm.create_model(name, features_only=True, feature_cls='fx', **options)
    x = images(model)
    features = model(x)
    for feature, channels in zip(features, model.feature_info.channels(), strict=True):
        assert channels in (feature.shape[1], feature.shape[-1])  # NCHW, or NHWC / NLC tokens
    sum(f.mean() for f in features).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('method', timm_gcp.list_meta_layers())
def test_fx_through_gcp_layers_keeps_their_checks(method):
    model = backbone_with_head()
    model[2].global_pool.set_meta_layer(method)
    check_traced(model, torch.randn(2, 3, 128, 128))  # 4x4 maps: full-rank 8x8 covariances
    extractor = create_feature_extractor(model, return_nodes=['2.global_pool'])
    bad = torch.randn(2, 3, 64, 64)
    bad[1] = float('nan')  # NaN features reach the head: its check runs inside the traced graph
    with pytest.raises(timm_gcp.ops.NonFiniteCovarianceError, match='GCPPool'):
        extractor(bad)


def test_fx_treats_gcp_pool_meta_layers_and_covariance_as_leaves():
    nodes = get_graph_node_names(backbone_with_head())[1]
    assert '2.global_pool' in nodes and not any(n.startswith('2.global_pool.') for n in nodes)
    assert '1.covariance' in nodes  # GSoP's covariance is one call, its input checks inside
    assert timm.layers.is_notrace_module(MetaLayer) and timm.layers.is_notrace_function(timm_gcp.triu_vec)


# ---------------------------------------------------------------- TorchScript

@pytest.mark.parametrize('name', MODELS)
def test_torchscript_raises_one_clear_error(name):
    model = create(name, {}).eval()
    with pytest.raises(RuntimeError, match=r'does not support TorchScript.*Use torch\.compile'):
        torch.jit.script(model)


@pytest.mark.parametrize('module', [
    lambda: gcp_head(16, NUM_CLASSES, dim=GCP_DIM), lambda: GSoPBlock(16, dim=4),
    lambda: timm_gcp.create_meta_layer('svd_pade')])
def test_torchscript_of_any_gcp_layer_raises_one_clear_error(module):
    with pytest.raises(RuntimeError, match=r'does not support TorchScript.*Use torch\.compile'):
        torch.jit.script(nn.Sequential(nn.Identity(), module()))
