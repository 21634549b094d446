"""The timm model contract for every registered GCP architecture, plus the GCP-specific structure and errors."""
import copy
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureListNet
from timm.models.resnet import Bottleneck
from timm.optim import create_optimizer_v2
from torch import nn

import timm_gcp
from test_gcp_families import check_reset_classifier
from timm_gcp.layers import GCPPool, GSoPBlock

GCP_NAMES = ['gcp_resnet18', 'gcp_resnet34', 'gcp_resnet50', 'gcp_resnet101', 'gcp_resnet152']
GSOP_NAMES = ['gsop_resnet50', 'gsop_resnet101']
IDCCP_NAMES = ['idccp_resnet18', 'idccp_resnet34', 'idccp_resnet50', 'idccp_resnet101', 'idccp_resnet152']
ALL_NAMES = GCP_NAMES + GSOP_NAMES
SHALLOW_NAMES = ['gcp_resnet18', 'gcp_resnet34', 'gcp_resnet50', 'gsop_resnet50']  # cheap enough to build again
GCP_DIM = 16  # small head: the contract, not the published shape, is what these tests check
TRIU = GCP_DIM * (GCP_DIM + 1) // 2
NUM_CLASSES = 10
IMG = 32  # 32 px -> 2x2 final map (stride 16): small enough for ResNet-152 on a shared 2-core machine
FINAL = IMG // 16


@pytest.fixture(scope='module')
def images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module', params=ALL_NAMES)
def model(request) -> nn.Module:
    return timm.create_model(request.param, num_classes=NUM_CLASSES, gcp_dim=GCP_DIM).eval()


@pytest.fixture(scope='module')
def outputs(model, images) -> dict:
    """One eager pass per model, shared by the contract tests: final features, intermediates and logits."""
    with torch.no_grad():
        feats, intermediates = model.forward_intermediates(images)
        return dict(feats=feats, intermediates=intermediates, logits=model(images))


def test_registered_names():
    assert timm.list_models(module='gcp_resnet') == GCP_NAMES  # the paper's stride-1 GCP ResNets
    assert timm.list_models('gsop_*') == GSOP_NAMES
    assert timm.list_models('idccp_*') == IDCCP_NAMES
    with torch.device('meta'):
        idccp = timm.create_model('idccp_resnet50')
    assert idccp.gcp_model_args()['invariance'] == 'd4' and idccp.head_hidden_size == 666  # 36 x 36: -98 %
    assert idccp.fc.in_features == 666 and isinstance(idccp, timm_gcp.GcpResNet)
    assert {'gcp_resnet50d', 'gcp_convnext_tiny', 'gcp_test_vit'} <= set(timm.list_models('gcp_*'))  # other families


@pytest.mark.parametrize('name', ALL_NAMES + IDCCP_NAMES)
def test_default_cfgs(name):
    """One tag per timm tag of the backbone with weights on the Hub, with its data config; pool sizes at stride 16."""
    base = name.split('_', 1)[1]
    base_tags = [t for t in timm.list_pretrained(f'{base}.*') if timm.models.get_pretrained_cfg(t).hf_hub_id]
    assert sorted(timm.list_pretrained(f'{name}.*')) == sorted(f'{name}.{t.split(".", 1)[1]}' for t in base_tags)
    for base_tag in base_tags:
        base_cfg = timm.models.get_pretrained_cfg(base_tag).to_dict()
        cfg = timm.models.get_pretrained_cfg(f'{name}.{base_tag.split(".", 1)[1]}').to_dict()
        for field in ('hf_hub_id', 'input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'num_classes', 'license'):
            assert cfg.get(field) == base_cfg.get(field), (base_tag, field)
        assert cfg['hf_hub_id'].startswith('timm/') and 'url' not in cfg
        assert cfg['pool_size'] == tuple(s // 16 for s in cfg['input_size'][1:])
        assert cfg['first_conv'] == 'conv1' and cfg['classifier'] == 'fc'
        assert 'arXiv:1712.01034' in cfg['paper_ids']
        assert ('arXiv:1811.12006' in cfg['paper_ids']) == name.startswith('gsop')
        assert ('arXiv:2011.05702' in cfg['paper_ids']) == name.startswith('idccp')
    assert timm.models.get_pretrained_cfg(name).tag == timm.models.get_pretrained_cfg(base).tag  # timm's default


def test_hub_org_env_override():
    code = 'import timm_gcp; print(timm_gcp.HUB_ORG)'
    env = dict(os.environ, TIMM_GCP_HUB_ORG='my-org')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'my-org'
    assert timm_gcp.HUB_ORG == 'timm-gcp'
    assert not any(timm.models.get_pretrained_cfg(n).hf_hub_id.startswith('timm-gcp/')
                   for n in timm.list_pretrained(['gcp_*', 'gsop_*']))  # nothing trained with a GCP head is published


def test_published_parameter_counts():
    with torch.device('meta'):  # counts without allocating
        counts = {name: sum(p.numel() for p in timm.create_model(name).parameters()) for name in ALL_NAMES}
    assert counts['gcp_resnet50'] == 56_929_832  # iSQRT-COV ResNet-50, 1000 classes
    resnet50 = 25_557_032
    assert counts['gcp_resnet50'] - resnet50 == 2048 * 256 + 2 * 256 + 32896 * 1000 + 1000 - (2048 * 1000 + 1000)


@pytest.mark.parametrize('name, kwargs', [('gcp_resnet18', {}), ('gsop_resnet50', {}),
                                          ('gcp_resnet18', {'stem_type': 'deep'})])  # timm ResNet options work
def test_device_and_dtype_reach_every_module(name, kwargs):
    model = timm.create_model(name, device='meta', dtype=torch.float64, num_classes=3, **kwargs)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {('meta', torch.float64)}


def test_architecture_layer4_stride_one_without_dilation():
    model = timm.create_model('gcp_resnet50', num_classes=0, gcp_dim=GCP_DIM)
    for module in model.layer4.modules():
        if isinstance(module, nn.Conv2d):
            assert module.stride == (1, 1) and module.dilation == (1, 1)
    assert model.global_pool.conv.weight.shape == (GCP_DIM, 2048, 1, 1)
    small = timm.create_model('gcp_resnet18', num_classes=0).eval()
    plain = timm.create_model('gcp_resnet18', num_classes=0, layer4_stride=2).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert small.forward_features(x).shape == (1, 512, 14, 14)  # the published 14x14 at 224 px
        assert plain.forward_features(x).shape == (1, 512, 7, 7)
    assert small.global_pool.conv.weight.shape == (256, 512, 1, 1) and small.head_hidden_size == 32896
    assert [f['reduction'] for f in plain.feature_info] == [2, 4, 8, 16, 32]


def test_gcp_dim_choices():
    with torch.device('meta'):
        small = timm.create_model('gcp_resnet50', gcp_dim=128)  # the published 8,256-feature variant
        full = timm.create_model('gcp_resnet18', gcp_dim=512)
    assert small.head_hidden_size == 8256 and small.fc.weight.shape == (1000, 8256)
    assert full.head_hidden_size == 512 * 513 // 2


def test_bf16_autocast_training_step(images):
    model = timm.create_model('gcp_resnet18', num_classes=NUM_CLASSES, gcp_dim=GCP_DIM).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        loss = model.fc(pooled).float().logsumexp(-1).mean()
    loss.backward()
    assert pooled.dtype == torch.float32  # the covariance and meta-layer stay out of bf16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_forward_features_and_head(model, images, outputs):
    feats = outputs['feats']
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), feats, rtol=0, atol=0)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
    assert model.num_features == feats.shape[1] == model.feature_info[-1]['num_chs']
    assert feats.shape[-2:] == (FINAL, FINAL)
    assert model.global_pool.pool_type == 'gcp' and isinstance(model.global_pool, GCPPool)
    assert pre.shape == (2, model.head_hidden_size) and model.head_hidden_size == TRIU
    assert outputs['logits'].shape == (2, NUM_CLASSES) and torch.isfinite(outputs['logits']).all()
    torch.testing.assert_close(logits, outputs['logits'], rtol=0, atol=0)
    assert model.get_classifier() is model.fc and model.fc.in_features == model.head_hidden_size
    state = model.state_dict()
    cfg = model.pretrained_cfg
    assert f'{cfg["classifier"]}.weight' in state and f'{cfg["first_conv"]}.weight' in state


def test_feature_info_and_intermediates(model, images, outputs):
    assert [f['reduction'] for f in model.feature_info] == [2, 4, 8, 16, 16]
    assert [f['module'] for f in model.feature_info] == ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    for info, x in zip(model.feature_info, outputs['intermediates']):
        assert x.shape == (2, info['num_chs'], IMG // info['reduction'], IMG // info['reduction'])
    with torch.no_grad():
        only = model.forward_intermediates(images, indices=[0, 1], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(only[1], outputs['intermediates'][1])


def test_reset_classifier(model, outputs):
    m = check_reset_classifier(model, outputs['feats'], outputs['feats'])
    cfg = m.pretrained_cfg
    assert cfg['pool_size'] == tuple(s // m.feature_info[-1]['reduction'] for s in cfg['input_size'][1:])


def test_prune_intermediate_layers(model, images, outputs):
    m = copy.deepcopy(model)
    m.prune_intermediate_layers(indices=[1, 2])
    with torch.no_grad():
        intermediates = m.forward_intermediates(images, indices=[1, 2], intermediates_only=True)
        pruned_out = m(images)
    assert m.num_classes == 0 and pruned_out.dim() == 4  # the GCP head went with the pruned stages
    for got, expected in zip(intermediates, outputs['intermediates'][1:3]):
        torch.testing.assert_close(got, expected)


def test_grad_checkpointing(model, images, outputs):
    x = images[:1].clone().requires_grad_(True)  # one image: eval-mode BN keeps samples independent
    model.set_grad_checkpointing(True)
    try:
        out = model(x)
        out.sum().backward()
    finally:
        model.set_grad_checkpointing(False)
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(out, outputs['logits'][:1])
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_group_matcher_and_optimizer(model):
    matcher = model.group_matcher()
    assert set(matcher) == {'stem', 'blocks'}
    optimizer = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.75)
    scale = {id(p): group['lr_scale'] for group in optimizer.param_groups for p in group['params']}
    decay = {id(p): group['weight_decay'] for group in optimizer.param_groups for p in group['params']}
    params = dict(model.named_parameters())
    assert len(scale) == len(params)  # every parameter in exactly one group
    for name in ('fc.weight', 'global_pool.conv.weight'):
        assert scale[id(params[name])] == 1.0  # the head learns at the full rate
    assert scale[id(params['conv1.weight'])] == min(scale.values()) < 1.0
    assert decay[id(params['fc.weight'])] == 1e-4
    assert decay[id(params['fc.bias'])] == decay[id(params['global_pool.bn.weight'])] == 0.0  # 1-D: no decay


def test_channels_last(model, images, outputs):
    m = copy.deepcopy(model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = m(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, outputs['logits'], rtol=1e-4, atol=1e-4)


def test_feature_extraction_wrapper(model, images, outputs):
    features_model = FeatureListNet(copy.deepcopy(model)).eval()  # what features_only=True builds, minus a rebuild
    with torch.no_grad():
        features = features_model(images)
    for got, expected in zip(features, outputs['intermediates']):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize('name', SHALLOW_NAMES)
def test_create_features_only_and_headless(name, images):
    features_model = timm.create_model(name, features_only=True).eval()
    assert features_model.feature_info.reduction() == [2, 4, 8, 16, 16]
    headless = timm.create_model(name, num_classes=0, global_pool='').eval()
    with torch.no_grad():
        features = features_model(images)
        unpooled = headless(images)
    assert [f.shape[1] for f in features] == features_model.feature_info.channels()
    assert [f.shape[-1] for f in features] == [IMG // r for r in features_model.feature_info.reduction()]
    assert unpooled.shape == (2, headless.num_features, FINAL, FINAL)


def test_gsop_structure():
    with torch.device('meta'):
        net2 = timm.create_model('gsop_resnet50', num_classes=0)
    blocks = {name: m for name, m in net2.named_modules() if isinstance(m, GSoPBlock)}
    assert sorted(blocks) == ['layer1.2.se', 'layer2.3.se', 'layer3.5.se']
    assert blocks['layer1.2.se'].conv_reduce.stride == (2, 2) and blocks['layer2.3.se'].conv_reduce.stride == (1, 1)
    assert blocks['layer3.5.se'].conv_reduce.weight.shape == (128, 1024, 1, 1)
    assert blocks['layer3.5.se'].row_conv.weight.shape == (512, 1, 128, 1)
    assert blocks['layer3.5.se'].conv_expand.weight.shape == (1024, 512, 1, 1)
    assert net2.global_pool.pool_type == 'gcp' and net2.global_pool.meta_layer.num_iter == 3
    net1 = timm.create_model('gsop_resnet50', gsop_net=1, num_classes=10).eval()
    assert isinstance(net1.layer4[-1].se, GSoPBlock) and net1.global_pool.pool_type == 'avg'
    assert net1.head_hidden_size == 2048 and net1.fc.in_features == 2048
    assert net1.gcp_model_args()['gsop_net'] == 1 and net1.gcp_model_args()['global_pool'] == 'avg'
    with torch.no_grad():
        assert net1(torch.randn(1, 3, IMG, IMG)).shape == (1, 10)


def _reference_gsop(block: GSoPBlock, x: torch.Tensor) -> torch.Tensor:
    """GSoP block written out in float64 from its definition (eval-mode BN)."""
    def bn(t, m):
        shape = (1, -1) + (1,) * (t.dim() - 2)
        return (t - m.running_mean.view(shape)) / (m.running_var.view(shape) + m.eps).sqrt() * m.weight.view(
            shape) + m.bias.view(shape)
    b = block.double()
    x = x.double()
    z = F.relu(bn(F.conv2d(F.relu(x), b.conv_reduce.weight, stride=b.conv_reduce.stride), b.bn_reduce))
    z = z.flatten(2)
    z = z - z.mean(-1, keepdim=True)
    cov = z @ z.transpose(1, 2) / z.shape[-1]  # (B, d, d)
    cov = bn(cov.unsqueeze(-1), b.bn_cov).squeeze(-1)
    expansion = b.row_conv.out_channels // b.dim
    w = b.row_conv.weight.view(b.dim, expansion, b.dim)  # out channel i*e+k sees row i
    rows = torch.einsum('bij,iej->bie', cov, w).reshape(x.shape[0], -1) + b.row_conv.bias
    gate = torch.sigmoid(rows @ b.conv_expand.weight.flatten(1).T + b.conv_expand.bias)
    return x * gate[:, :, None, None]


@pytest.mark.parametrize('stride', [1, 2])
def test_gsop_block_matches_definition(stride):
    block = GSoPBlock(12, dim=6, stride=stride)
    for bn in (block.bn_reduce, block.bn_cov):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    block.eval()
    x = torch.randn(3, 12, 9, 7, dtype=torch.float64)
    expected = _reference_gsop(copy.deepcopy(block), x)
    torch.testing.assert_close(block.double()(x), expected, rtol=1e-10, atol=1e-12)


def test_gsop_block_scales_before_residual_add():
    block = Bottleneck(256, 64).eval()  # a last bottleneck: identity shortcut
    block.se = GSoPBlock(256)
    block.se.attention = lambda t: torch.zeros(t.shape[0], t.shape[1], 1, 1)  # gate closed
    x = torch.randn(1, 256, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(x))  # only the shortcut survives, then the block's ReLU


def test_gsop_block_under_autocast():
    block = GSoPBlock(16, dim=8).train()
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = block(x.to(torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_set_meta_layer_and_model_args():
    model = timm.create_model('gcp_resnet18', num_classes=NUM_CLASSES, gcp_dim=GCP_DIM).eval()
    assert model.gcp_model_args() == dict(
        num_classes=NUM_CLASSES, in_chans=3, global_pool='gcp', gcp_dim=GCP_DIM, meta_layer='isqrt',
        meta_layer_kwargs={}, layer4_stride=1, dropcov=False, riemannian='pow_emlr', gaussian=False, progressive_widths=None,
        compress_dim=None, group_conv=None, invariance=None, invariance_mode='train')
    model.set_meta_layer('isqrt', num_iter=2)
    assert model.global_pool.meta_layer.num_iter == 2 and not model.global_pool.meta_layer.training
    assert model.gcp_model_args()['meta_layer_kwargs'] == {'num_iter': 2}
    with pytest.raises(ValueError, match='Unknown meta-layer .*isqrt'):
        model.set_meta_layer('no_such_layer')
    assert model.gcp_model_args()['meta_layer_kwargs'] == {'num_iter': 2}  # a failed switch changes nothing
    model.global_pool.set_meta_layer('eig', alpha=0.4)  # switched on the head itself: the model reports it too
    args = model.gcp_model_args()
    assert (args['meta_layer'], args['meta_layer_kwargs']) == ('eig', {'alpha': 0.4})
    model.reset_classifier(NUM_CLASSES, 'avg')
    model.reset_classifier(NUM_CLASSES, 'gcp')  # a new GCP head gets the meta-layer the old one had
    assert (model.global_pool.meta_layer_name, model.global_pool.meta_layer.alpha) == ('eig', 0.4)


def test_dropcov_head_drops_channels_in_training_only():
    model = timm.create_model('gcp_resnet18', num_classes=NUM_CLASSES, gcp_dim=GCP_DIM, meta_layer='cov', dropcov=True)
    plain = timm.create_model('gcp_resnet18', num_classes=NUM_CLASSES, gcp_dim=GCP_DIM, meta_layer='cov')
    plain.load_state_dict(model.state_dict(), strict=False)
    assert model.gcp_model_args()['dropcov'] is True
    assert isinstance(model.global_pool.channel_dropout, timm_gcp.layers.AdaptiveChannelDropout)
    feats = torch.rand(4, 512, 3, 3)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model.forward_head(feats), plain.forward_head(feats))  # inference: plain covariance
    model.train()
    logits = model.forward_head(feats)
    logits.sum().backward()
    assert torch.isfinite(logits).all() and model.global_pool.channel_dropout.attention.weight.grad is not None


@pytest.mark.parametrize('meta_layer', timm_gcp.list_meta_layers())
def test_every_meta_layer_as_head(meta_layer):
    model = timm.create_model('gcp_resnet18', num_classes=NUM_CLASSES, gcp_dim=GCP_DIM, meta_layer=meta_layer).eval()
    feats = torch.randn(2, 512, 3, 3)
    with torch.no_grad():
        logits = model.forward_head(feats)
        model.set_meta_layer('isqrt')
        model.set_meta_layer(meta_layer)
        assert torch.equal(model.forward_head(feats), logits)  # switching keeps every parameter
    assert torch.isfinite(logits).all() and model.gcp_model_args()['meta_layer'] == meta_layer


@pytest.mark.parametrize('kwargs, match', [
    (dict(meta_layer='no_such_layer'), 'Unknown meta-layer'),
    (dict(meta_layer='no_such_layer', global_pool='avg'), 'Unknown meta-layer'),  # checked without a GCP head too
    (dict(meta_layer_kwargs={'num_iter': 0}, global_pool='avg'), 'num_iter must be'),
    (dict(gcp_dim=0), r'gcp_dim must be an int from 1 to 512'),
    (dict(gcp_dim=513), r'^gcp_resnet18: gcp_dim must be an int from 1 to 512'),  # names the model
    (dict(gcp_dim=16.0), r'gcp_dim must be an int'),
    (dict(gcp_dim='256'), r'gcp_dim must be an int'),
    (dict(layer4_stride=4), 'layer4_stride must be 1'),
    (dict(output_stride=16), 'layer4_stride'),
])
def test_bad_model_kwargs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('gcp_resnet18', **kwargs)


def test_bad_gsop_kwargs():
    with pytest.raises(ValueError, match='gsop_net must be 1'):
        timm.create_model('gsop_resnet50', gsop_net=3)
    with pytest.raises(ValueError, match='Unknown meta-layer'), torch.device('meta'):
        timm.create_model('gsop_resnet50', gsop_net=1, meta_layer='no_such_layer')  # GSoP-Net1: average pooling head


def test_bad_inputs():
    model = timm.create_model('gcp_resnet18', num_classes=NUM_CLASSES, gcp_dim=GCP_DIM).eval()
    with pytest.raises(ValueError, match=r'expects images of shape \(B, 3, H, W\), got \(2, 1, 32, 32\)'):
        model(torch.randn(2, 1, IMG, IMG))
    with pytest.raises(ValueError, match=r'expects images of shape \(B, 3, H, W\)'):
        model(torch.randn(3, IMG, IMG))
    with pytest.raises(ValueError, match=r'at least 2 positions.*larger than 16x16 px'):
        model(torch.randn(2, 3, 16, 16))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 17, 17)).shape == (2, NUM_CLASSES)


def test_fx_traces_the_input_checks(images):
    model = timm.create_model('gcp_resnet18', num_classes=0, global_pool='').eval()  # the head is GCPPool's business
    traced = torch.fx.symbolic_trace(model)
    extractor = timm.models.create_feature_extractor(model, return_nodes=['layer3'])
    with torch.no_grad():
        torch.testing.assert_close(traced(images), model(images), rtol=0, atol=0)
        assert extractor(images)['layer3'].shape == (2, 256, FINAL, FINAL)
        for graph in (traced, extractor):
            with pytest.raises(ValueError, match=r'expects images of shape \(B, 3, H, W\)'):
                graph(images[:, :1])  # the check runs inside every traced graph


@pytest.mark.slow
def test_torch_compile(images):
    model = timm.create_model('gcp_resnet18', num_classes=NUM_CLASSES, gcp_dim=GCP_DIM).eval()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')  # one graph, no breaks
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-3, atol=1e-3)
    model.train()  # training: forward and backward through the compiled head (the isqrt backward included)
    compiled(images).logsumexp(dim=1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.global_pool.parameters())
