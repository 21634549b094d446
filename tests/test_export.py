"""Deployment: ONNX (TorchScript-based and dynamo exporters, checked with onnxruntime) and torch.export with a dynamic
batch for one model per family, the export paths of the meta-layers ONNX cannot express (their error bounded on
adversarial spectra, on trained features, and refused where it cannot be), and `timm-gcp onnx`."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import timm_gcp
from timm_gcp.hub.cli import main as cli_main
from timm_gcp.layers import GCPPool
from timm_gcp.meta_layers import ExportAccuracyError, MetaLayer, create_meta_layer
from timm_gcp.meta_layers.lyapunov import MPA_DENOMINATOR, MPA_DENOMINATOR_MIN
from timm_gcp.ops import covariance, newton_inverse, newton_power

onnx = pytest.importorskip('onnx', reason='the onnx extra (pip install timm-gcp[onnx]) is not installed')
ort = pytest.importorskip('onnxruntime', reason='the onnx extra (pip install timm-gcp[onnx]) is not installed')

ROOT = Path(__file__).resolve().parents[1]
U32 = torch.finfo(torch.float32).eps
IMG = 64
EXPORT_PATH_LAYERS = ('eig', 'svd_pade', 'svd_taylor', 'svd_pi', 'svd_trunc', 'mpa_lya')
# timm module -> (model, kwargs): the smallest of each family, plus the two GCP ResNet families
FAMILY_MODELS = {
    'gcp_resnet': ('gcp_resnet18', dict(gcp_dim=16)),
    'gsop_resnet': ('gsop_resnet50', dict(gcp_dim=16, gsop_dim=8)),
    'convnext': ('gcp_test_convnext', dict(gcp_dim=16)),
    'efficientnet': ('gcp_test_efficientnet', dict(gcp_dim=16)),
    'regnet': ('gcp_regnetx_002', dict(gcp_dim=16)),
    'resnet': ('gcp_test_resnet', dict(gcp_dim=16)),
    'resnetv2': ('gcp_resnetv2_50x1_bit', dict(gcp_dim=16)),
    'vision_transformer': ('gcp_test_vit', dict(gcp_dim=16, img_size=IMG)),
    'deit': ('gcp_deit_tiny_patch16_224', dict(gcp_dim=16, img_size=IMG)),
    'swin_transformer': ('gcp_swin_tiny_patch4_window7_224', dict(gcp_dim=16, img_size=IMG, window_size=4)),
}


def test_every_family_is_exported_here():
    assert set(FAMILY_MODELS) - {'gcp_resnet', 'gsop_resnet'} == set(timm_gcp.FAMILIES)


def _model(name: str, meta_layer: str = 'isqrt', **kwargs) -> torch.nn.Module:
    return timm.create_model(name, num_classes=5, meta_layer=meta_layer, exportable=True, **kwargs).eval()


def _onnx_difference(model: torch.nn.Module, path: Path, dynamo: bool) -> float:
    """Export with timm's onnx_export at batch 2, run onnxruntime at batch 3: max |onnxruntime − PyTorch| relative
    to the largest |output| (at least 1)."""
    timm.utils.onnx.onnx_export(model, str(path), example_input=torch.randn(2, 3, IMG, IMG), use_dynamo=dynamo)
    x = torch.randn(3, 3, IMG, IMG)
    session = ort.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    difference, scale = float(np.abs(out - expected).max()), float(np.abs(expected).max())
    print(f'{model.default_cfg["architecture"]} {model.meta_layer_name} {"dynamo" if dynamo else "torchscript"}: '
          f'max |onnxruntime - PyTorch| {difference:.1e} (largest output {scale:.2g})')
    return difference / max(scale, 1.0)


# --- the export paths, against float64 eigendecompositions


def _spd(eigenvalues: torch.Tensor) -> torch.Tensor:
    """(B, d) eigenvalues -> (B, d, d) matrices with random orthonormal eigenvectors, float64."""
    basis = torch.linalg.qr(torch.randn(*eigenvalues.shape, eigenvalues.shape[-1], dtype=torch.float64))[0]
    return (basis * eigenvalues.unsqueeze(-2)) @ basis.mT


def _clamped_power(cov: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """The exact layers' forward in float64: V max(λ, eps·λ_max)^alpha Vᵀ."""
    evals, evecs = torch.linalg.eigh(cov)
    evals = torch.maximum(evals, eps * evals.amax(-1, keepdim=True))
    return (evecs * evals.pow(alpha).unsqueeze(-2)) @ evecs.mT


ADVERSARIAL_SPECTRA = {
    'full rank': lambda d: torch.rand(2, d) + 0.1,
    'rank-deficient (M < d)': lambda d: torch.cat([torch.rand(2, d // 4) + 0.1, torch.zeros(2, d - d // 4)], -1),
    'repeated': lambda d: torch.ones(2, d),
    'condition 1e12': lambda d: torch.logspace(0, -12, d).expand(2, d),
    'rounding noise around 0': lambda d: torch.cat([torch.ones(2, 1), (torch.rand(2, d - 1) - 0.5) * 1e-7], -1),
}


@pytest.mark.parametrize('spectrum', sorted(ADVERSARIAL_SPECTRA))
@pytest.mark.parametrize('alpha', [0.5, 0.25, 1.5])
def test_newton_power_is_the_smoothly_floored_power(spectrum, alpha):
    """Per eigenvalue (λ² + ε²λ̂²)^(α/2), λ̂ <= 1.09·max|λ| (6 squarings, rank <= 256): within
    ((1.09·√2)^α − 1)·(ε·λ_max)^α of the clamp max(λ, ε·λ_max)^α, and to float64 precision above it."""
    d, eps = 32, U32
    evals = ADVERSARIAL_SPECTRA[spectrum](d).double()
    cov = _spd(evals)
    out = newton_power(cov, alpha, eps)
    exact = _clamped_power(cov, alpha, eps)
    top = evals.abs().amax(-1)
    bound = ((1.09 * 2 ** 0.5) ** alpha - 1) * (eps * top) ** alpha + 1e-9 * top ** alpha
    assert torch.isfinite(out).all()
    assert (torch.linalg.matrix_norm(out - exact, 2) <= bound).all()


def test_newton_power_refuses_powers_it_cannot_compute():
    with pytest.raises(ValueError, match=r'alpha/2 = q/p, p <= 32, got alpha=0\.123'):
        newton_power(torch.eye(3).expand(1, 3, 3).double(), 0.123, U32)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_newton_inverse_of_the_mpa_denominator(dtype):
    """Q(Z) for Z with spectrum in [0, 1] (MPA-Lya's denominator) has its spectrum in [Q(1), 1]; its Newton–Schulz
    inverse matches the float64 inverse to the dtype's precision times Q's condition number."""
    a = _spd(torch.cat([torch.rand(4, 8), torch.zeros(4, 8)], -1).double())
    z = torch.eye(16, dtype=torch.float64) - a / torch.linalg.matrix_norm(a)[:, None, None]
    q = sum(c * torch.linalg.matrix_power(z, k) for k, c in enumerate(MPA_DENOMINATOR))
    assert torch.linalg.eigvalsh(q).min() >= MPA_DENOMINATOR_MIN - 1e-12
    inverse = newton_inverse(q.to(dtype), MPA_DENOMINATOR_MIN).double()
    error = torch.linalg.matrix_norm(inverse @ q - torch.eye(16, dtype=torch.float64), 2).max()
    assert error <= 100 * torch.finfo(dtype).eps / MPA_DENOMINATOR_MIN


@pytest.mark.parametrize('name', [
    'eig', 'mpa_lya', *(pytest.param(name, marks=pytest.mark.slow) for name in EXPORT_PATH_LAYERS[1:-1])])
def test_export_path_matches_the_exact_layer(name):
    """Covariances of 24 positions in 32 channels (rank-deficient, as in a GCP head): export mode within the layer's
    tolerance of its exact forward, and the eager check passes."""
    layer = create_meta_layer(name)
    cov = covariance(torch.randn(3, 32, 24) * torch.rand(3, 32, 1))
    exact = layer(cov)
    layer.set_exportable(True)
    out = layer(cov)
    relative = (out - exact).abs().amax((-2, -1)) / exact.abs().amax((-2, -1))
    assert relative.max() <= layer.export_tolerance
    assert torch.allclose(out, layer.export_normalize(cov))


def test_export_refuses_covariances_its_approximation_cannot_follow():
    """Eigenvalues of -1e-4·λ_max (accepted by the input check, clamped by the exact layer) become |λ|^½ on the
    export path: one ExportAccuracyError naming the layer, the error and the batch element, in eager mode only."""
    evals = torch.cat([torch.ones(2, 1), torch.zeros(2, 31)], -1)
    evals[1, 1:9] = -1e-4
    cov = _spd(evals).float()
    layer = create_meta_layer('eig')
    layer.set_exportable(True)
    with pytest.raises(ExportAccuracyError, match=r'^eig export path: differs from the exact layer by up to .* in '
                                                  r'1 of 2 matrices, batch elements \[1\]'):
        layer(cov)
    exported = torch.export.export(torch.nn.Sequential(layer), (cov,))  # tracing does not check
    assert torch.isfinite(exported.module()(cov)).all()


# --- the switch


def test_exportable_follows_timm_config_and_the_model_switch():
    model = timm.create_model('gcp_resnet18', meta_layer='eig', gcp_dim=8, exportable=True)
    assert model.global_pool.meta_layer.exportable
    assert not timm.create_model('gcp_resnet18', meta_layer='eig', gcp_dim=8).global_pool.meta_layer.exportable
    model.set_meta_layer('svd_pade')  # the hybrid switch keeps export mode
    assert model.global_pool.meta_layer.exportable
    model.set_exportable(False)
    assert not model.global_pool.meta_layer.exportable
    gsop = timm.create_model('gsop_resnet50', gcp_dim=8, gsop_dim=8, exportable=True)
    assert all(m.exportable for m in gsop.modules() if isinstance(m, MetaLayer))


def test_power_without_export_path_is_named():
    layer = create_meta_layer('eig', alpha=0.37)
    with pytest.raises(ValueError, match=r'^eig option alpha=0\.37 has no export path'):
        layer.set_exportable(True)
    assert not layer.exportable


@pytest.mark.parametrize('kwargs, needs', [
    (dict(meta_layer='isice'), 'meta-layer isice .* Cholesky'),
    (dict(riemannian='chol_tmlr'), "riemannian='chol_tmlr' .* Cholesky"),
    (dict(riemannian='log_emlr'), "riemannian='log_emlr' .* eigendecomposition"),
])
def test_heads_without_an_onnx_path_refuse_export_mode_and_keep_torch_export(kwargs, needs):
    """ONNX has no Cholesky or eigendecomposition: export mode is refused, at construction under timm's
    exportable=True and by the switch, which then changes nothing; torch.export keeps them exact."""
    with pytest.raises(ValueError, match=f'{needs}.*torch.export'):
        timm.create_model('gcp_resnet18', num_classes=5, gcp_dim=8, exportable=True, **kwargs)
    model = timm.create_model('gcp_resnet18', num_classes=5, gcp_dim=8, **kwargs).eval()
    with pytest.raises(ValueError, match=needs):
        model.set_exportable(True)
    assert not model.global_pool.meta_layer.exportable
    assert _torch_export_difference(model) < 1e-5


def test_triu_index_is_a_buffer_outside_checkpoints():
    pool = GCPPool(8, dim=4)
    assert 'triu_index' in dict(pool.named_buffers()) and 'triu_index' not in pool.state_dict()
    pool.triu_index.zero_()
    pool.init_non_persistent_buffers()  # timm's hook after to_empty()
    assert torch.equal(pool.triu_index, timm_gcp.ops.triu_flat_index(4))


# --- ONNX, both exporters


@pytest.mark.parametrize('meta_layer', [
    'isqrt', 'eig',
    *(pytest.param(name, marks=pytest.mark.slow) for name in ('cov', 'mtp_lya', 'svd_pade', 'mpa_lya'))])
def test_torchscript_onnx_export_per_meta_layer(meta_layer, tmp_path):
    model = _model('gcp_resnet18', meta_layer, gcp_dim=16)
    assert _onnx_difference(model, tmp_path / 'model.onnx', dynamo=False) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('meta_layer', ['isqrt', 'cov', 'mtp_lya', 'eig', 'svd_pade', 'svd_taylor', 'svd_pi',
                                        'svd_trunc', 'mpa_lya'])
def test_dynamo_onnx_export_per_meta_layer(meta_layer, tmp_path):
    model = _model('gcp_resnet18', meta_layer, gcp_dim=16)
    assert _onnx_difference(model, tmp_path / 'model.onnx', dynamo=True) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('dynamo', [False, True], ids=['torchscript', 'dynamo'])
@pytest.mark.parametrize('family', sorted(FAMILY_MODELS))
def test_onnx_export_per_family(family, dynamo, tmp_path):
    name, kwargs = FAMILY_MODELS[family]
    model = _model(name, 'isqrt', **kwargs)
    assert _onnx_difference(model, tmp_path / 'model.onnx', dynamo) < 1e-4


# --- torch.export


def _torch_export_difference(model: torch.nn.Module) -> float:
    batch = torch.export.Dim('batch', min=1)
    program = torch.export.export(model, (torch.randn(2, 3, IMG, IMG),), dynamic_shapes=({0: batch},))
    worst = 0.
    for size in (1, 5):
        x = torch.randn(size, 3, IMG, IMG)
        with torch.no_grad():
            worst = max(worst, (program.module()(x) - model(x)).abs().max().item())
    return worst


@pytest.mark.parametrize('meta_layer', ['eig', pytest.param('svd_pade', marks=pytest.mark.slow)])
def test_torch_export_keeps_the_exact_layers(meta_layer):
    """torch.export has linalg.eigh: exact layers export without export mode."""
    model = timm.create_model('gcp_resnet18', num_classes=5, meta_layer=meta_layer, gcp_dim=16).eval()
    assert _torch_export_difference(model) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(FAMILY_MODELS))
def test_torch_export_per_family_with_dynamic_batch(family):
    name, kwargs = FAMILY_MODELS[family]
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    assert _torch_export_difference(model) < 1e-5


# --- trained weights, and the CLI


def _train(data_dir: Path, out: Path, epochs: int) -> Path:
    """A tiny train.py run (GCP ResNet-18, 64 px, gcp_dim 32); its Hub-ready model folder."""
    subprocess.run([sys.executable, str(ROOT / 'train.py'), '--recipe', 'none', '--data-dir', str(data_dir),
                    '--model', 'gcp_resnet18', '--model-kwargs', 'gcp_dim=32', '--img-size', str(IMG), '-b', '32',
                    '--epochs', str(epochs), '--lr', '0.05', '--workers', '0', '--no-progress', '--log-with', 'none',
                    '--output', str(out)], check=True, cwd=ROOT, capture_output=True)
    return out / 'model'


LOGIT_BOUND = {'eig': 1e-3, 'svd_pade': 1e-2, 'mpa_lya': 1e-3}  # of the largest |logit|; measured: docs/models.md


@pytest.fixture(scope='module', params=['pets-mini', 'flowers'])
def trained(request, tmp_path_factory):
    """(model folder, its validation images) of a model trained on the bundled pets sample or ../shared flowers."""
    if request.param == 'pets-mini':
        data_dir = ROOT / 'data' / 'pets-mini'
    else:
        data_dir = ROOT.parent / 'shared' / 'data' / 'flowers'
        if not data_dir.is_dir():
            pytest.skip(f'{data_dir} (../shared/data/flowers beside the checkout) is missing')
    return _train(data_dir, tmp_path_factory.mktemp('run'), epochs=3), data_dir


@pytest.mark.slow
@pytest.mark.parametrize('meta_layer', sorted(LOGIT_BOUND))
def test_export_path_error_on_trained_features(trained, meta_layer):
    folder, data_dir = trained
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    model.set_meta_layer(meta_layer)  # the hybrid protocol: same weights, the exact layer's function
    config = timm.data.resolve_data_config({}, model=model)
    dataset = timm.data.ImageDataset(str(data_dir / 'val'), transform=timm.data.create_transform(**config))
    images = torch.stack([dataset[i][0] for i in range(0, len(dataset), max(1, len(dataset) // 48))])
    with torch.no_grad():
        exact = model(images)
        model.set_exportable(True)
        exported = model(images)  # raises ExportAccuracyError where a covariance is off the layer's tolerance
    difference = (exported - exact).abs().max().item()
    print(f'{data_dir.name} {meta_layer}: max |logit difference| {difference:.1e} of {exact.abs().max():.1f}')
    assert difference <= LOGIT_BOUND[meta_layer] * exact.abs().max()
    assert torch.equal(exported.argmax(1), exact.argmax(1))


@pytest.mark.slow
def test_cli_exports_a_trained_model(trained, tmp_path, capsys):
    folder, data_dir = trained
    out = tmp_path / 'model.onnx'
    assert cli_main(['onnx', f'local-dir:{folder}', str(out), '--data-dir', str(data_dir), '-b', '4']) == 0
    printed = capsys.readouterr().out
    assert f'wrote {out}' in printed and 'on 4 images of' in printed and 'onnxruntime vs PyTorch' in printed
    onnx.checker.check_model(str(out))


def test_cli_refuses_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / 'model.onnx'
    assert cli_main(['onnx', 'test_resnet', str(out), '--no-pretrained', '--img-size', '32', '-b', '2',
                     '--tolerance', '0']) == 1
    assert 'OnnxCheckError' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
