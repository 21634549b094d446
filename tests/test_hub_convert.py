"""Official checkpoint conversion: synthetic checkpoints with the official layouts, checked tensor by tensor and
against an independently written float64 forward of the official architecture."""
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from torch import nn

import timm_gcp  # noqa: F401  registers the GCP models
from timm_gcp.hub.cli import main
from timm_gcp.hub.convert import convert_checkpoint

# state-dict names and shapes of the two official iSQRT-COV checkpoints used here (from the project's reference notes)
LAYOUTS = Path(__file__).with_name('official_checkpoint_layouts.json')
NEWMODEL = 'main.py Newmodel(resnet50 + MPNCOV)'


def _random_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    if name.endswith('num_batches_tracked'):
        return torch.tensor(7)
    if name.endswith('running_var'):
        return torch.rand(shape, generator=gen) + 0.5
    if len(shape) == 1:  # BN affine, running means, classifier bias
        return torch.randn(shape, generator=gen) * 0.1 + (1.0 if name.endswith('.weight') else 0.0)
    fan_in = torch.Size(shape)[1:].numel()
    return torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5


def _official_state_dict(layout: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    entries = json.loads(LAYOUTS.read_text())[layout]
    return {name: _random_tensor(name, shape, gen) for name, shape in entries}


@pytest.fixture(scope='module')
def mpncov_r50(tmp_path_factory):
    sd = _official_state_dict('mpncovresnet50', seed=1)
    path = tmp_path_factory.mktemp('official') / 'mpncovresnet50-synthetic.pth'
    torch.save(sd, path)  # model-zoo style: a bare state dict
    return sd, path


@pytest.fixture(scope='module')
def newmodel_r50(tmp_path_factory):
    sd = _official_state_dict(NEWMODEL, seed=2)
    path = tmp_path_factory.mktemp('official') / 'model_best.pth.tar'
    # the training script's checkpoint: DataParallel features inside {'state_dict': ...} with training metadata
    wrapped = {k.replace('features.', 'features.module.', 1): v for k, v in sd.items()}
    torch.save({'epoch': 65, 'arch': 'mpncovresnet50', 'best_prec1': 77.9, 'state_dict': wrapped}, path)
    return sd, path


# ---- independent reference of the official forward (torchvision ResNet-50 + the GCP_FACTS head), float64

def _torchvision_resnet50(layer4_stride: int) -> nn.Module:
    net = torchvision.models.resnet50()
    if layer4_stride == 1:  # mpncovresnet: the first layer4 block's 3x3 conv and its shortcut at stride 1
        net.layer4[0].conv2.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
    return net.double().eval()


def _features(net: nn.Module) -> nn.Sequential:
    """The training script's `features`: a torchvision ResNet's children up to layer4 (indices 0..7)."""
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def _newton_schulz_sqrt(cov: torch.Tensor, iters: int = 5) -> torch.Tensor:
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov)
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    y, z = cov / trace, eye
    for _ in range(iters - 1):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    return y @ (0.5 * (3 * eye - z @ y)) * trace.sqrt()


def _eig_sqrt(cov: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(torch.finfo(cov.dtype).eps * evals.amax(-1, keepdim=True))
    return evecs @ torch.diag_embed(evals.sqrt()) @ evecs.transpose(-1, -2)


def _official_logits(x, features, reduce_w, bn: dict, fc_w, fc_b, sqrt) -> torch.Tensor:
    x = features(x)
    x = F.relu(F.batch_norm(F.conv2d(x, reduce_w), bn['running_mean'], bn['running_var'], bn['weight'], bn['bias'],
                            training=False, eps=1e-5))
    b, d = x.shape[:2]
    feats = x.reshape(b, d, -1)
    feats = feats - feats.mean(-1, keepdim=True)
    cov = feats @ feats.transpose(1, 2) / feats.shape[-1]
    index = torch.ones(d, d).triu().reshape(d * d).nonzero().squeeze(1)  # the official triu vectorisation
    return sqrt(cov).reshape(b, d * d)[:, index] @ fc_w.T + fc_b


def _under(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v.double() for k, v in sd.items() if k.startswith(prefix)}


def _check_logits(model: nn.Module, reference, rtol: float = 1e-6) -> None:
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = model.double().eval()
    with torch.no_grad():
        expected, got = reference(x), model(x)
    scale = expected.abs().max()
    assert torch.allclose(got, expected, rtol=rtol, atol=rtol * scale), float((got - expected).abs().max() / scale)


def test_mpncovresnet50_every_tensor_and_logits(mpncov_r50, tmp_path):
    sd, path = mpncov_r50
    out, model = convert_checkpoint(path, 'gcp_resnet50', tmp_path / 'converted')
    converted = load_file(str(out / 'model.safetensors'))
    assert len(converted) == len(sd)  # nothing dropped, nothing invented
    head = {'layer_reduce_bn.': 'global_pool.bn.', 'layer_reduce.': 'global_pool.conv.'}
    for name, tensor in sd.items():
        target = next((new + name[len(old):] for old, new in head.items() if name.startswith(old)), name)
        assert torch.equal(converted[target], tensor), name
    assert (model.layer4_stride, model.meta_layer_name) == (1, 'isqrt')

    net = _torchvision_resnet50(layer4_stride=1)
    backbone = {k: v for k, v in _under(sd, '').items() if not k.startswith(('layer_reduce', 'fc.'))}
    missing, unexpected = net.load_state_dict(backbone, strict=False)  # torchvision's GAP classifier stays unused
    assert (sorted(missing), unexpected) == (['fc.bias', 'fc.weight'], [])
    _check_logits(model, lambda x: _official_logits(
        x, _features(net), sd['layer_reduce.weight'].double(), _under(sd, 'layer_reduce_bn.'),
        sd['fc.weight'].double(), sd['fc.bias'].double(), _newton_schulz_sqrt))


@pytest.mark.parametrize('source, stride, meta_layer, sqrt', [
    ('fast-mpn-cov', 1, 'isqrt', _newton_schulz_sqrt),
    ('svd-pade', 2, 'svd_pade', _eig_sqrt),
])
def test_training_script_layout(newmodel_r50, tmp_path, source, stride, meta_layer, sqrt):
    sd, path = newmodel_r50
    out, model = convert_checkpoint(path, 'gcp_resnet50', tmp_path / 'converted', source=source)
    converted = load_file(str(out / 'model.safetensors'))
    assert len(converted) == len(sd)
    stages = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3', '7': 'layer4'}
    for name, tensor in sd.items():
        if name.startswith('features.'):
            index, rest = name[len('features.'):].split('.', 1)
            target = f'{stages[index]}.{rest}'
        else:
            target = name.replace('representation.conv_dr_block.0.', 'global_pool.conv.').replace(
                'representation.conv_dr_block.1.', 'global_pool.bn.').replace('classifier.', 'fc.')
        assert torch.equal(converted[target], tensor), name
    assert (model.layer4_stride, model.meta_layer_name) == (stride, meta_layer)

    features = _features(_torchvision_resnet50(stride))
    features.load_state_dict(_under(sd, 'features.'), strict=True)  # the official module structure, as is
    _check_logits(model, lambda x: _official_logits(
        x, features, sd['representation.conv_dr_block.0.weight'].double(),
        _under(sd, 'representation.conv_dr_block.1.'), sd['classifier.weight'].double(),
        sd['classifier.bias'].double(), sqrt))

    if source == 'svd-pade':  # config.json restores the non-default stride and meta-layer
        reloaded = timm.create_model(f'local-dir:{out}', pretrained=True)
        assert (reloaded.layer4_stride, reloaded.meta_layer_name) == (stride, meta_layer)
        assert all(torch.equal(v, converted[k]) for k, v in reloaded.state_dict().items())


def test_timm_loads_an_official_file_like_convert(mpncov_r50, tmp_path):
    """pretrained_cfg_overlay=dict(file=...) reads an official file through gcp_resnet.checkpoint_filter_fn: the very
    weights convert exports."""
    sd, path = mpncov_r50
    out, _ = convert_checkpoint(path, 'gcp_resnet50', tmp_path / 'converted')
    converted = load_file(str(out / 'model.safetensors'))
    model = timm.create_model('gcp_resnet50', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.state_dict().keys() == converted.keys()
    assert all(torch.equal(v, converted[k]) for k, v in model.state_dict().items())


_TO_NEWMODEL = {'conv1.': 'features.0.', 'bn1.': 'features.1.', 'layer1.': 'features.4.', 'layer2.': 'features.5.',
                'layer3.': 'features.6.', 'layer4.': 'features.7.', 'fc.': 'classifier.',
                'global_pool.conv.': 'representation.conv_dr_block.0.',
                'global_pool.bn.': 'representation.conv_dr_block.1.'}


@pytest.mark.parametrize('wrap', ['bare', 'state_dict', 'ddp', 'dataparallel_features'])
def test_checkpoint_wrappers(tmp_path, wrap):
    """The training script's file, bare, inside {'state_dict': ...}, DDP- or DataParallel-wrapped, loads in full."""
    ours = timm.create_model('gcp_resnet18', num_classes=3, gcp_dim=8).state_dict()
    sd = {next(new + k[len(old):] for old, new in _TO_NEWMODEL.items() if k.startswith(old)): v
          for k, v in ours.items()}
    stored = {
        'bare': sd,
        'state_dict': {'epoch': 3, 'best_prec1': 1.5, 'state_dict': sd},
        'ddp': {'module.' + k: v for k, v in sd.items()},
        'dataparallel_features': {k.replace('features.', 'features.module.'): v for k, v in sd.items()},
    }[wrap]
    torch.save(stored, tmp_path / 'ckpt.pth.tar')
    model = timm.create_model('gcp_resnet18', num_classes=3, gcp_dim=8, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'ckpt.pth.tar'), num_classes=3))
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())


class _Arbitrary:
    pass


def test_bad_checkpoints(tmp_path, mpncov_r50):
    torch.save({'model': _Arbitrary()}, tmp_path / 'pickle.pth')
    torch.save([torch.zeros(1)], tmp_path / 'list.pth')
    for name in ('pickle.pth', 'list.pth'):  # a foreign pickle, a file that is no state dict
        with pytest.raises(ValueError, match='weights_only=True'):
            convert_checkpoint(tmp_path / name, 'gcp_resnet50', tmp_path / 'out')
    torch.save({'conv.weight': torch.zeros(1)}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='unknown checkpoint layout'):
        convert_checkpoint(tmp_path / 'other.pth', 'gcp_resnet50', tmp_path / 'out')
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / 'missing.pth', 'gcp_resnet50', tmp_path / 'out')
    with pytest.raises(ValueError, match=r'for gcp_resnet101 with these layers: \d+ missing'):
        convert_checkpoint(mpncov_r50[1], 'gcp_resnet101', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_cli_converts_a_small_mpncovresnet(tmp_path, capsys):
    """timm-gcp convert end to end on an mpncovresnet-layout ResNet-18 (timm resnet18 names + layer_reduce + fc)."""
    backbone = timm.create_model('resnet18', num_classes=0).state_dict()
    gen = torch.Generator().manual_seed(4)
    sd = {k: _random_tensor(k, v.shape, gen) for k, v in backbone.items()}
    sd.update({'layer_reduce.weight': torch.randn(16, 512, 1, 1, generator=gen) * 0.06,
               'layer_reduce_bn.weight': torch.ones(16), 'layer_reduce_bn.bias': torch.zeros(16),
               'layer_reduce_bn.running_mean': torch.zeros(16), 'layer_reduce_bn.running_var': torch.ones(16),
               'layer_reduce_bn.num_batches_tracked': torch.tensor(0),
               'fc.weight': torch.randn(5, 136, generator=gen) * 0.1, 'fc.bias': torch.zeros(5)})
    torch.save(sd, tmp_path / 'mpncovresnet18.pth')
    (tmp_path / 'labels.txt').write_text('\n'.join('abcde') + '\n')
    assert main(['convert', str(tmp_path / 'mpncovresnet18.pth'), '--model', 'gcp_resnet18', '--output',
                 str(tmp_path / 'out'), '--label-names', str(tmp_path / 'labels.txt')]) == 0
    model = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert (model.gcp_dim, model.num_classes, model.pretrained_cfg['label_names']) == (16, 5, list('abcde'))
    assert torch.equal(model.global_pool.conv.weight, sd['layer_reduce.weight'])
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert ('timm-gcp convert mpncovresnet18.pth --model gcp_resnet18 --source fast-mpn-cov '
            '--label-names labels.txt') in card and str(tmp_path) not in card  # files by name, no output folder

    assert main(['convert', str(tmp_path / 'nope.pth'), '--model', 'gcp_resnet18', '--output',
                 str(tmp_path / 'o2')]) == 1
    assert 'does not exist' in capsys.readouterr().err
