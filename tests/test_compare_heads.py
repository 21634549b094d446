"""benchmarks/compare_heads.py: arm specs, the study table's arithmetic (mean ± std over seeds, reach epoch, images/s,
mCE against the first arm), and a tiny study end to end (train.py runs, robustness, table, JSON, curves), re-run
(finished runs skipped, an unfinished one resumed) and refused with other settings."""
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from accelerate.state import AcceleratorState, GradientState

import timm_gcp  # noqa: F401
from timm_gcp.hub import export_model
from tiny_images import image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def compare():
    spec = importlib.util.spec_from_file_location('compare_heads', ROOT / 'benchmarks' / 'compare_heads.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_arm_specs(compare):
    assert compare.parse_arm('gap') == ('gap', {'global_pool': 'avg'})
    assert compare.parse_arm('dropcov') == ('dropcov', {'meta_layer': 'cov', 'dropcov': True})
    assert compare.parse_arm('svd_pade') == ('svd_pade', {'meta_layer': 'svd_pade'})
    assert compare.parse_arm("isqrt3:meta_layer=isqrt,meta_layer_kwargs={'num_iter':3},gcp_dim=64") == (
        'isqrt3', {'meta_layer': 'isqrt', 'meta_layer_kwargs': {'num_iter': 3}, 'gcp_dim': 64})
    for bad, message in (('cosine', 'not a preset'), ('a/b', 'the name must be'), ('x:1,2', 'k=v'),
                         ('x:k=os.system(1)', 'Python literal')):
        with pytest.raises(ValueError, match=message):
            compare.parse_arm(bad)


def _fake_run(run_dir: Path, top1, export: Path, train_time=2.0, train_images=12):
    """A finished train.py run folder: metrics.json with `top1` per epoch, and a copy of `export` as its model."""
    history = [{'epoch': e, 'top1': t, 'train_time_s': train_time, 'epoch_time_s': train_time + 1,
                'train_images': train_images} for e, t in enumerate(top1)]
    best = max(history, key=lambda row: row['top1'])
    run_dir.mkdir(parents=True)
    (run_dir / 'metrics.json').write_text(json.dumps({'history': history, 'final': history[-1], 'best': best}))
    shutil.copytree(export, run_dir / 'model')


def test_study_table_arithmetic(compare, tmp_path):
    out = tmp_path / 'study'
    runs = {('gap', 0): [40., 60., 70.], ('gap', 1): [50., 55., 80.], ('isqrt', 0): [60., 75., 90.],
            ('isqrt', 1): [30., 70., 78.]}
    exports = {arm: export_model(timm.create_model('gcp_resnet18', num_classes=2, gcp_dim=4, global_pool=pool),
                                 tmp_path / arm, label_names=['a', 'b']) for arm, pool in (('gap', 'avg'),
                                                                                           ('isqrt', 'gcp'))}
    for (arm, seed), top1 in runs.items():
        _fake_run(out / 'runs' / f'{arm}-s{seed}', top1, exports[arm], train_time=2. + seed)
    errors = {('gap', 0): (10., 40.), ('gap', 1): (20., 60.), ('isqrt', 0): (10., 20.), ('isqrt', 1): (10., 45.)}
    for (arm, seed), (clean, fog) in errors.items():
        (out / 'robustness').mkdir(exist_ok=True)
        (out / 'robustness' / f'{arm}-s{seed}.json').write_text(json.dumps(
            {'errors': {'clean': clean, 'corruptions': {'fog': {'2': fog}}}}))
    args, _ = compare.parse_args(['--data-dir', str(tmp_path), '--output', str(out), '--arms', 'gap', 'isqrt',
                                  '--seeds', '0', '1', '--robustness', '--corruptions', 'fog', '--severities', '2'])
    study = compare.summarize_study(args)
    gap, isqrt = study['arms']
    assert study['reach_top1'] == 75.0                      # the lower mean final top-1: gap (70 + 80) / 2
    assert gap['summary']['final_top1'] == {'mean': 75., 'std': statistics.stdev([70., 80.]), 'n': 2}
    assert isqrt['summary']['best_top1']['mean'] == 84.     # (90 + 78) / 2
    assert gap['seeds'][0]['reach_epoch'] is None and gap['seeds'][1]['reach_epoch'] == 3
    assert isqrt['summary']['reach_epoch'] == {'mean': 2.5, 'std': statistics.stdev([3, 2]), 'n': 2}
    assert isqrt['seeds'][1]['images_per_s'] == pytest.approx(36 / 9)    # 3 epochs x 12 images in 3 x 3 s
    assert gap['head_parameters'] == 512 * 2 + 2 and isqrt['head_parameters'] > gap['head_parameters']
    # mCE against gap of the same seed: seed 0 100*20/40, seed 1 100*45/60; relative: (20-10)/(40-10), (45-10)/(60-20)
    assert [isqrt['seeds'][s]['mce'] for s in (0, 1)] == pytest.approx([50., 75.])
    assert isqrt['summary']['relative_mce']['mean'] == pytest.approx((100 * 10 / 30 + 100 * 35 / 40) / 2)
    assert gap['summary']['mce'] == {'mean': 100., 'std': 0., 'n': 2}
    table = compare.study_markdown(study, 'CMD')
    assert '| isqrt | `{"meta_layer": "isqrt"}` | 2 | 84.00 ± 8.49 | 84.00 ± 8.49 | 2.5 ± 0.7 |' in table
    assert '| gap | `{"global_pool": "avg"}` | 2 | 75.00 ± 7.07 | 75.00 ± 7.07 | 3.0 (1/2) |' in table


def _argv(data, out, *extra):
    return ['--data-dir', str(data), '--output', str(out), '--arms', 'gap', 'isqrt', 'dropcov', '--seeds', '0',
            '--recipe', 'none', '--epochs', '1', '--img-size', '32', '-b', '4', '--lr', '0.01', '--workers', '0',
            '--no-progress', '--log-with', 'none', '--model-kwargs', 'gcp_dim=8', *extra]


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resumable(compare, tmp_path, capsys):
    data, out = image_folder(tmp_path / 'data'), tmp_path / 'study'
    robust = ['--robustness', '--corruptions', 'fog', '--severities', '2']
    assert compare.main(_argv(data, out, *robust)) == 0
    study = json.loads((out / 'study.json').read_text())
    assert [a['arm'] for a in study['arms']] == ['gap', 'isqrt', 'dropcov'] and study['reference_arm'] == 'gap'
    for arm in study['arms']:
        metrics = json.loads((out / 'runs' / f'{arm["arm"]}-s0' / 'metrics.json').read_text())
        row = arm['seeds']['0']
        assert row['final_top1'] == metrics['final']['top1']
        assert row['images_per_s'] == pytest.approx(12 / metrics['history'][0]['train_time_s'])
        assert set(json.loads((out / 'robustness' / f'{arm["arm"]}-s0.json').read_text())['errors']) == {
            'clean', 'corruptions'}
    config = json.loads((out / 'runs' / 'dropcov-s0' / 'model' / 'config.json').read_text())
    assert config['model_args']['dropcov'] is True and config['model_args']['meta_layer'] == 'cov'
    assert config['model_args']['gcp_dim'] == 8
    assert '| dropcov |' in (out / 'study.md').read_text()
    assert (out / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    capsys.readouterr()
    # re-run: finished runs are skipped; an unfinished one (checkpoints, no export) is resumed
    (out / 'runs' / 'isqrt-s0' / 'model' / 'model.safetensors').unlink()
    assert compare.main(_argv(data, out, *robust)) == 0
    printed = capsys.readouterr().out
    assert 'gap seed 0: finished, skipped' in printed and 'dropcov seed 0: finished, skipped' in printed
    assert f'--resume {out / "runs" / "isqrt-s0"}' in printed
    assert (out / 'runs' / 'isqrt-s0' / 'model' / 'model.safetensors').is_file()
    # other settings in the same folder are refused before any run
    assert compare.main(_argv(data, out, '--lr', '0.1')) == 2
    assert 'holds a study with other settings (train_args)' in capsys.readouterr().err


@pytest.mark.slow
def test_study_under_two_processes(tmp_path):
    """torchrun, 2 CPU processes (as `accelerate launch` starts them): every arm trains with DDP in turn, the two
    robustness conditions are shared out and merged, one process writes the table."""
    data, out = image_folder(tmp_path / 'data'), tmp_path / 'study'
    argv = [a for a in _argv(data, out, '--robustness', '--corruptions', 'fog', '--severities', '2')
            if a != 'dropcov']
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         str(ROOT / 'benchmarks' / 'compare_heads.py'), *argv],
        cwd=ROOT, env={**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1'}, capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count('# Head study') == 1
    for arm in ('gap', 'isqrt'):
        metrics = json.loads((out / 'runs' / f'{arm}-s0' / 'metrics.json').read_text())
        assert metrics['history'][0]['val_images'] == 10
        record = json.loads((out / 'robustness' / f'{arm}-s0.json').read_text())
        assert record['images'] == 10 and set(record['errors']['corruptions']['fog']) == {'2'}
    assert [a['arm'] for a in json.loads((out / 'study.json').read_text())['arms']] == ['gap', 'isqrt']
