"""train.py end to end on real images: outputs, export, exact resume after SIGKILL, SIGTERM, 2 processes, hybrid
switch, unreadable images and the errors raised before any work is done."""
import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

import timm_gcp  # noqa: F401
from timm_gcp.meta_layers import MetaLayer, is_meta_layer, register_meta_layer
from timm_gcp.training.checkpoint import read_train_state
from timm_gcp.training.errors import CheckpointError

from conftest import BUNDLED_DATA, image_subset

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--recipe', 'none', '--model', 'gcp_resnet18', '--model-kwargs', 'gcp_dim=8', '--img-size', '32', '-b', '4',
        '--lr', '0.01', '--smoothing', '0', '--workers', '0', '--no-progress', '--log-with', 'none', '--seed', '0']
SUBPROCESS_ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


@pytest.fixture(scope='module')
def tiny_pets(tmp_path_factory) -> Path:
    """3 classes of the bundled pets sample, 8 training images each, 5 validation images (an odd count)."""
    return image_subset(BUNDLED_DATA, tmp_path_factory.mktemp('pets'), 3, 8, (2, 2, 1))


@pytest.fixture(scope='module')
def train_script():
    spec = importlib.util.spec_from_file_location('train_script', ROOT / 'train.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_process(entry, argv):
    """Call train.py's `entry` (main or cli) in this process; accelerate's singletons are reset afterwards."""
    try:
        return entry([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture
def run_train(train_script):
    """Call train.py's main() in this process (`in_process`)."""
    return lambda *argv: in_process(train_script.main, argv)


def _weights(run_dir: Path):
    return load_file(run_dir / 'model' / 'model.safetensors')


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_end_to_end(run_train, tiny_pets, tmp_path, capsys):
    out = tmp_path / 'run'
    result = run_train(*TINY, '--data-dir', tiny_pets, '--epochs', '3', '--output', out, '--log-with', 'tensorboard',
                       '--flip-test')
    metrics = json.loads((out / 'metrics.json').read_text())
    assert [row['epoch'] for row in metrics['history']] == [0, 1, 2]
    assert all(row['val_images'] == 5 and row['train_images'] == 24 for row in metrics['history'])
    assert metrics['final']['epoch'] == 2 and metrics['final']['top1'] == metrics['history'][-1]['top1']
    assert metrics['best']['top1'] == max(row['top1'] for row in metrics['history'])
    with open(out / 'summary.csv', newline='') as f:                    # timm's update_summary, one row per epoch
        summary = list(csv.DictReader(f))
    assert [int(row['epoch']) for row in summary] == [0, 1, 2]
    assert [float(row['eval_top1']) for row in summary] == pytest.approx([r['top1'] for r in metrics['history']])
    assert list((out / 'logs').rglob('events.out.tfevents.*'))
    assert len(list((out / 'checkpoints').glob('checkpoint-*'))) == 2
    config = json.loads((out / 'model' / 'config.json').read_text())
    assert config['architecture'] == 'gcp_resnet18'
    assert config['label_names'] == sorted(p.name for p in (tiny_pets / 'train').iterdir())
    printed = capsys.readouterr().out
    assert f'Hub-ready model: {out / "model"}' in printed
    assert f'timm-gcp push {out / "model"} --repo-id ORG/NAME' in printed
    # the exported model alone reproduces the reported accuracy
    model = timm.create_model(f'local-dir:{out / "model"}', pretrained=True).eval()
    torch.testing.assert_close(model.state_dict()['fc.weight'], result['model'].state_dict()['fc.weight'])
    loader = torch.utils.data.DataLoader(_val_set(tiny_pets, result['data_config']), batch_size=5)
    x, y, _ = next(iter(loader))
    with torch.no_grad():
        logits = (model(x) + model(x.flip(3))) / 2
    assert 100 * (logits.argmax(1) == y).float().mean().item() == pytest.approx(metrics['final']['top1'])


def _val_set(root: Path, data_config):
    from timm.data import create_transform
    from timm_gcp.training.data import create_datasets
    data = create_datasets(str(root))
    data.val.transform = create_transform(**data_config)
    return data.val


@pytest.mark.slow
def test_end_to_end_with_regularisers(run_train, tmp_path):
    pets = image_subset(BUNDLED_DATA, tmp_path / 'pets', 4, 6, (2, 2, 2, 1))
    out = tmp_path / 'run'
    run_train(*TINY, '--data-dir', pets, '--epochs', '1', '--output', out, '--mixup', '0.2', '--cutmix', '1.0',
              '--smoothing', '0.1', '--model-ema', '--model-ema-decay', '0.5', '--grad-accum-steps', '2',
              '--clip-grad', '1.0', '--channels-last', '--mixed-precision', 'bf16', '--head-lr-mult', '5')
    row = json.loads((out / 'metrics.json').read_text())['history'][0]
    assert row['val_images'] == 7 and row['train_images'] == 24
    assert {'raw_top1', 'raw_top5', 'raw_val_loss'} <= set(row)        # EMA evaluated beside the raw weights
    state = read_train_state(sorted((out / 'checkpoints').glob('checkpoint-*'))[-1])
    assert state.updates == 3                                            # 6 batches, 2 per update
    assert torch.isfinite(torch.tensor(row['train_loss']))


@pytest.mark.slow
def test_unreadable_images_counted(run_train, tiny_pets, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_pets, data)
    train_img = sorted((data / 'train').rglob('*.jpg'))[0]
    train_img.write_bytes(train_img.read_bytes()[:300])                 # truncated
    val_img = sorted((data / 'val').rglob('*.jpg'))[0]
    val_img.write_bytes(b'garbage')
    from PIL import Image
    for path, mode in zip(sorted((data / 'train').rglob('*.jpg'))[1:4], ('L', 'CMYK', 'P')):
        converted = Image.open(path).convert(mode)
        path.unlink()
        converted.save(path.with_suffix('.png' if mode == 'P' else '.jpg'))   # 24 training images still
    out = tmp_path / 'run'
    run_train(*TINY, '--data-dir', data, '--epochs', '1', '--output', out)
    row = json.loads((out / 'metrics.json').read_text())['history'][0]
    assert (row['unreadable_train'], row['unreadable_val'], row['val_images']) == (1, 1, 4)


@pytest.mark.slow
def test_hybrid_switch_survives_resume(run_train, tiny_pets, tmp_path):
    if not is_meta_layer('test_halved_isqrt'):
        @register_meta_layer('test_halved_isqrt')
        class HalvedIsqrt(MetaLayer):  # a meta-layer only this process knows: proves the switch is in effect
            def normalize(self, cov):
                return timm_gcp.create_meta_layer('isqrt')(cov) / 2
    args = [*TINY, '--data-dir', tiny_pets, '--epochs', '2', '--switch-meta-layer', 'test_halved_isqrt@1',
            '--checkpoint-interval', '2', '--checkpoint-hist', '10']
    full = run_train(*args, '--output', tmp_path / 'full')
    assert full['model'].global_pool.meta_layer_name == 'test_halved_isqrt'
    checkpoints = sorted((tmp_path / 'full' / 'checkpoints').glob('checkpoint-*'))
    mid_switched = [c for c in checkpoints if read_train_state(c).epoch == 1 and read_train_state(c).batches_done]
    assert read_train_state(mid_switched[0]).meta_layer == 'test_halved_isqrt'
    resumed_dir = tmp_path / 'resumed'
    shutil.copytree(mid_switched[0], resumed_dir / 'checkpoints' / mid_switched[0].name)
    resumed = run_train(*args, '--resume', resumed_dir)
    assert resumed['model'].global_pool.meta_layer_name == 'test_halved_isqrt'
    _assert_same_weights(_weights(tmp_path / 'full'), _weights(resumed_dir))
    assert json.loads((resumed_dir / 'model' / 'config.json').read_text())['model_args']['meta_layer'] == \
        'test_halved_isqrt'


@pytest.mark.slow
@pytest.mark.parametrize('head', ['meta_layer=isice', 'riemannian=chol_tmlr'])
def test_one_epoch_with_isice_or_a_riemannian_map(run_train, tiny_pets, tmp_path, head):
    out = tmp_path / 'run'
    result = run_train(*TINY, '--model-kwargs', 'gcp_dim=8', head, '--data-dir', tiny_pets, '--epochs', '1',
                       '--output', out)
    key, value = head.split('=')
    assert getattr(result['model'].global_pool, key if key != 'meta_layer' else 'meta_layer_name') == value
    row = json.loads((out / 'metrics.json').read_text())['history'][0]
    assert row['train_images'] == 24 and torch.isfinite(torch.tensor(row['train_loss']))
    assert json.loads((out / 'model' / 'config.json').read_text())['model_args'][key] == value


def test_errors_before_any_work(run_train, tiny_pets, tmp_path):
    base = [*TINY, '--epochs', '1']
    with pytest.raises(FileNotFoundError, match='does not exist'):
        run_train(*base, '--data-dir', tmp_path / 'missing', '--output', tmp_path / 'r0')
    with pytest.raises(ValueError, match="Unknown model 'gcp_resnet_19'"):
        run_train(*base, '--data-dir', tiny_pets, '--model', 'gcp_resnet_19', '--output', tmp_path / 'r1')
    with pytest.raises(ValueError, match='needs a GCP model with set_meta_layer'):
        run_train(*base, '--data-dir', tiny_pets, '--model', 'resnet18', '--model-kwargs', '--switch-meta-layer',
                  'eig@1',
                  '--output', tmp_path / 'r2')
    with pytest.raises(ValueError, match="unknown meta-layer 'nope'"):
        run_train(*base, '--data-dir', tiny_pets, '--switch-meta-layer', 'nope@1', '--output', tmp_path / 'r3')
    with pytest.raises(ValueError, match='even --batch-size'):
        run_train(*base, '--data-dir', tiny_pets, '--mixup', '0.2', '-b', '3', '--output', tmp_path / 'r4')
    with pytest.raises(ValueError, match='fewer than one batch'):
        run_train(*base, '--data-dir', tiny_pets, '-b', '64', '--output', tmp_path / 'r5')
    with pytest.raises(ValueError, match=r'cannot run at input size \(3, 8, 8\) \(--img-size too small\?\)'):
        run_train(*base, '--data-dir', tiny_pets, '--img-size', '8', '--output', tmp_path / 'r6')
    with pytest.raises(CheckpointError, match='no checkpoint found'):
        run_train(*base, '--data-dir', tiny_pets, '--resume', tmp_path / 'r5')
    with pytest.raises(ValueError, match="--switch-meta-layer isice: riemannian='pow_tmlr' .* no matrix power"):
        run_train(*base, '--data-dir', tiny_pets, '--model-kwargs', 'gcp_dim=8', 'riemannian=pow_tmlr',
                  '--switch-meta-layer', 'isice@1', '--output', tmp_path / 'r7')
    assert not any((tmp_path / f'r{i}').exists() for i in range(8))  # failed runs leave no run folder behind


def _start(args, cwd=ROOT, launcher=(sys.executable,)):
    return subprocess.Popen([*launcher, str(ROOT / 'train.py'), *map(str, args)], cwd=cwd, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _updates_logged(lines):
    return [int(line.split(' update ')[1].split()[0]) for line in lines if ' update ' in line]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tiny_pets, tmp_path):
    """Killed mid-epoch: at most one checkpoint interval is lost and the resumed run ends bit-for-bit (1e-6) where
    an uninterrupted run ends (augmentations, dropout, optimizer, scheduler and EMA all restored)."""
    args = [*TINY, '--data-dir', tiny_pets, '--epochs', '2', '--checkpoint-interval', '2', '--log-interval', '1',
            '--drop', '0.2', '--model-ema', '--model-ema-decay', '0.9', '--sched', 'cosine', '--sched-on-updates']
    full = _start([*args, '--output', tmp_path / 'full'])
    killed = _start([*args, '--output', tmp_path / 'killed'])
    lines = []
    for line in killed.stdout:
        lines.append(line)
        if ' update 3 ' in line:  # mid-epoch 0, one update after the checkpoint at update 2
            killed.send_signal(signal.SIGKILL)
            break
    lines += killed.stdout.read().splitlines()
    assert killed.wait() == -signal.SIGKILL
    checkpoint = read_train_state(sorted((tmp_path / 'killed' / 'checkpoints').glob('checkpoint-*'))[-1])
    assert max(_updates_logged(lines)) - checkpoint.updates <= 2       # at most one interval lost
    assert checkpoint.epoch == 0 and 0 < checkpoint.batches_done < 6   # really mid-epoch
    resumed = subprocess.run([sys.executable, str(ROOT / 'train.py'), *map(str, args), '--resume',
                              tmp_path / 'killed'], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f'resumed from {tmp_path / "killed" / "checkpoints"}' in resumed.stdout
    assert full.wait() == 0
    _assert_same_weights(_weights(tmp_path / 'full'), _weights(tmp_path / 'killed'))
    history = [json.loads((tmp_path / run / 'metrics.json').read_text())['history'] for run in ('full', 'killed')]
    for a, b in zip(*history):
        for key in ('train_loss', 'val_loss', 'top1', 'top5', 'lr', 'raw_val_loss'):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_current_update(tiny_pets, tmp_path):
    out = tmp_path / 'run'
    proc = _start([*TINY, '--data-dir', tiny_pets, '--epochs', '3', '--log-interval', '1', '--output', out])
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if ' update 2 ' in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.read().splitlines()
    assert proc.wait() == 128 + signal.SIGTERM
    assert any('interrupted: checkpoint saved' in line and f'--resume {out}' in line for line in lines)
    state = read_train_state(sorted((out / 'checkpoints').glob('checkpoint-*'))[-1])
    assert state.updates == max(_updates_logged(lines))                 # nothing lost


@pytest.mark.slow
def test_two_processes_gloo(tiny_pets, tmp_path):
    """torchrun, 2 CPU processes: replicas identical, every validation image counted once (5, odd), scheduler
    stepped once per update (not once per process)."""
    out = tmp_path / 'run'
    worker = ROOT / 'tests' / 'train_rank_dump.py'
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(worker),
         *TINY, '--data-dir', tiny_pets, '--epochs', '2', '--output', out, '--sched', 'cosine', '--sched-on-updates',
         '--lr', '0.1', '--warmup-epochs', '0'],
        cwd=ROOT, env={**SUBPROCESS_ENV, 'ACCELERATE_USE_CPU': '1'}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_same_weights(load_file(out / 'rank0.safetensors'), load_file(out / 'rank1.safetensors'))
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['command'].startswith('torchrun --nproc_per_node 2 train.py ')  # the launcher it was started with
    assert [row['val_images'] for row in metrics['history']] == [5, 5]
    assert [row['train_images'] for row in metrics['history']] == [24, 24]
    state = read_train_state(sorted((out / 'checkpoints').glob('checkpoint-*'))[-1])
    assert state.updates == 6                                            # 24 images / (2 processes x 4) x 2 epochs
    # cosine over 6 updates, stepped after each: after update 3 (end of epoch 0) lr = 0.1 * (1 + cos(pi/2)) / 2
    assert metrics['history'][0]['lr'] == pytest.approx(0.05)
    _assert_same_weights(load_file(out / 'rank0.safetensors'), _weights(out))


@pytest.mark.slow
def test_backbone_weights_from_plain_resnet_checkpoint(run_train, tiny_pets, tmp_path):
    from safetensors.torch import save_file
    plain = timm.create_model('resnet18', num_classes=1000)
    save_file(plain.state_dict(), str(tmp_path / 'resnet18.safetensors'))
    result = run_train(*TINY, '--data-dir', tiny_pets, '--epochs', '1', '--lr', '0', '--output', tmp_path / 'run',
                       '--backbone-weights', tmp_path / 'resnet18.safetensors')
    trained = result['model'].state_dict()
    for key in ('conv1.weight', 'layer4.1.conv2.weight'):
        torch.testing.assert_close(trained[key], plain.state_dict()[key], rtol=0, atol=0)  # lr 0: still the input
    assert trained['fc.weight'].shape == (3, 36)                       # fresh GCP head: 8 * 9 / 2 features


@pytest.mark.slow
def test_default_run_uses_the_bundled_pets_sample(run_train, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)                          # `python train.py` from the checkout: the demo's data_dir is there
    bundled = ROOT / 'data' / 'pets-mini'
    assert (bundled / 'ATTRIBUTION.md').read_text().count('CC BY-SA 4.0') >= 1
    assert sum(f.stat().st_size for f in bundled.rglob('*')) < 5_000_000            # a few MB
    run_train('--epochs', '1', '--output', tmp_path / 'run', '--no-progress', '--log-with', 'none')
    metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert (metrics['model'], metrics['num_classes'], metrics['train_images']) == ('gcp_resnet18', 37, 296)
    assert metrics['history'][0]['val_images'] == 74


@pytest.mark.slow
@pytest.mark.parametrize('model_name, model_args, cls', [
    ('resnet18', [], 'ResNet'),                                          # any timm model
    ('gcp_resnet18', ['gcp_dim=8'], 'GcpResNet'),                        # the GCP head traced for training
])
def test_torchcompile(run_train, tiny_pets, tmp_path, model_name, model_args, cls):
    out = tmp_path / 'run'
    result = run_train(*TINY, '--data-dir', tiny_pets, '--epochs', '1', '--output', out, '--model', model_name,
                       '--model-kwargs', *model_args, '--torchcompile', 'eager', '--checkpoint-interval', '3',
                       '--model-ema')
    assert type(result['model']).__name__ == cls                        # the EMA copy of the bare model
    state = load_file(sorted((out / 'checkpoints').glob('checkpoint-*'))[-1] / 'model.safetensors')
    assert not any(key.startswith('_orig_mod') for key in state)        # checkpoints hold the plain module's keys
    assert json.loads((out / 'model' / 'config.json').read_text())['architecture'] == model_name
