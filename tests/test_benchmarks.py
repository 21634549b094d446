"""The benchmark suite: a quick CPU run end to end (JSON, Markdown, PNG; ratios against the run's own baselines) and
the judging of the issue's targets."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from timm_gcp.layers import RIEMANNIAN_MAPS

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
RUN = BENCHMARKS / 'run.py'


@pytest.mark.slow
def test_quick_cpu_suite_writes_results(tmp_path):
    subprocess.run([sys.executable, str(RUN), '--device', 'cpu', '--quick', '--meta-layers', 'isqrt',
                    '--output', str(tmp_path)], check=True, timeout=600)
    result = json.loads((tmp_path / 'results.json').read_text())
    key = {r['variant']: r for r in result['key_config']}
    fused, plain = key['isqrt (fused backward)'], key['isqrt (plain autograd reference)']
    assert fused['fwd_bwd_vs_isqrt'] == 1.0
    assert plain['fwd_bwd_vs_isqrt'] == pytest.approx(plain['fwd_bwd_ms'] / fused['fwd_bwd_ms'])
    assert fused['fwd_bwd_gflop'] == pytest.approx(plain['fwd_bwd_gflop'] * 32 / 36)  # 5 iterations, B=4, d=32
    assert [r['meta_layer'] for r in result['grid']] == ['isqrt'] and result['grid'][0]['fwd_bwd_ms'] > 0
    assert result['grid'][0]['saved_mib'] > 0  # what the forward keeps for the backward
    maps = {r['variant']: r for r in result['riemannian']}
    assert set(maps) == {f'isqrt + {name}' for name in RIEMANNIAN_MAPS}
    assert maps['isqrt + pow_emlr']['fwd_bwd_vs_isqrt'] == 1.0 and maps['isqrt + log_emlr']['fwd_bwd_ms'] > 0
    network = {r['model']: r for r in result['network']['rows']}
    assert set(network) == {'resnet18', 'gcp_resnet18'}
    gap, gcp = network['resnet18'], network['gcp_resnet18']
    assert gap['throughput_vs_gap'] == 1.0 and gcp['throughput_vs_isqrt'] == 1.0
    assert gcp['throughput_vs_gap'] == pytest.approx(gcp['img_per_s'] / gap['img_per_s'])
    assert {t['target'] for t in result['targets']} >= {'gcp_resnet18 (iSQRT) >= 0.80x resnet18 GAP img/s'}
    assert '## Targets' in (tmp_path / 'results.md').read_text()
    assert (tmp_path / 'results.png').read_bytes()[:4] == b'\x89PNG'


def test_targets_are_judged_from_in_run_ratios(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import report

    def result(key_batch: int) -> dict:
        return {'settings': {'arch': 'resnet50'},
                'key_config': [{'variant': 'isqrt (fused backward)', 'batch': key_batch, 'dim': 256, 'positions': 196,
                                'fwd_bwd_ms': 1.9}],
                'network': {'rows': [
                    {'model': 'resnet50', 'meta_layer': None, 'options': '', 'throughput_vs_gap': 1.0},
                    {'model': 'gcp_resnet50', 'meta_layer': 'isqrt', 'options': '', 'throughput_vs_gap': 0.79,
                     'memory_vs_gap': 1.2, 'throughput_vs_isqrt': 1.0},
                    {'model': 'gcp_resnet50', 'meta_layer': 'eig', 'options': '', 'throughput_vs_isqrt': 0.97},
                    {'model': 'gcp_resnet50', 'meta_layer': 'eig', 'options': 'eigh_backend=torch',
                     'throughput_vs_isqrt': 0.05}]}}

    eager = 'isqrt fwd+bwd at B=64, d=256, M=196 <= 2.0 ms (eager, default)'
    judged = {t['target']: t['met'] for t in report.targets(result(key_batch=64))}
    assert judged == {  # only default-option exact heads are judged; what this run did not measure is None
        'gcp_resnet50 training with eig >= 0.95x the iSQRT head': True,
        eager: True,
        'isqrt fwd+bwd at B=64, d=256, M=196 <= 2.0 ms (compile=True)': None,
        'gcp_resnet50 (iSQRT) >= 0.80x resnet50 GAP img/s': False,
        'gcp_resnet50 (iSQRT) peak memory <= 1.3x GAP': True,
    }
    other_size = {t['target']: t['met'] for t in report.targets(result(key_batch=32))}
    assert other_size[eager] is None  # a time at another (B, d, M) says nothing about this target
    on_cpu = report.targets({**result(key_batch=64), 'environment': {'device_type': 'cpu'}})
    assert all(t['met'] is None for t in on_cpu) and any(t['value'] for t in on_cpu)  # H100/H200 targets


@pytest.mark.parametrize('option, message', [('--meta-layers', "unknown meta-layers ['nope']"),
                                             ('--sections', "unknown sections ['nope']")])
def test_rejects_unknown_names(tmp_path, option, message):
    done = subprocess.run([sys.executable, str(RUN), '--device', 'cpu', option, 'nope', '--output', str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and not tmp_path.joinpath('results.json').exists()


def test_runs_only_the_requested_sections(tmp_path):
    subprocess.run([sys.executable, str(RUN), '--device', 'cpu', '--quick', '--meta-layers', 'isqrt',
                    '--sections', 'key_config', '--output', str(tmp_path)], check=True, timeout=300)
    result = json.loads((tmp_path / 'results.json').read_text())
    assert result['key_config'] and 'grid' not in result and 'network' not in result


@pytest.mark.slow
def test_interleaved_network_rounds(tmp_path):
    out = tmp_path / 'network_repeat.json'
    subprocess.run([sys.executable, str(BENCHMARKS / 'network_rounds.py'), '--device', 'cpu', '--arch', 'resnet18',
                    '--meta-layers', 'isqrt,cov', '--rounds', '2', '--batch', '2', '--image-size', '64',
                    '--warmup', '1', '--reps', '1', '--output', str(out)], check=True, timeout=600)
    rows = json.loads(out.read_text())
    assert [(r['round'], r['model'], r.get('meta_layer')) for r in rows] == [
        (i, m, l) for i in range(2) for m, l in
        [('resnet18', None), ('gcp_resnet18', 'isqrt'), ('gcp_resnet18', 'cov')]]
    assert all(r['img_per_s'] > 0 for r in rows)


def test_default_output_is_an_untracked_folder(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run

    output = run.parse_args(['--device', 'cpu']).output
    assert output == BENCHMARKS / 'results' / 'local' / 'cpu'
    ignored = subprocess.run(['git', 'check-ignore', '-q', str(output / 'results.json')], cwd=BENCHMARKS.parent)
    assert ignored.returncode == 0  # never the committed results


def test_head_cost_counts_parameters_and_flops(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from head_cost import head_cost
    full = head_cost('gcp_resnet18', 64, 10)
    reduction = 512 * 256 + 2 * 256  # 1x1 conv and BN
    assert full['dim'] == 32896 and full['params'] == reduction + 32896 * 10 + 10
    compressed = head_cost('gcp_resnet18', 64, 10, compress_dim=36)
    assert compressed['dim'] == 666 and compressed['params'] == reduction + 256 * 36 + 666 * 10 + 10
    gap = head_cost('gcp_resnet18', 64, 10, global_pool='avg')
    assert gap['params'] == 512 * 10 + 10 and gap['gflops'] * 1e9 == 2 * 512 * 10  # the classifier's products
    # beyond the 1x1 conv on the 4x4 map, the covariance and the classifier: iSQRT's 256 x 256 (or 36 x 36) products
    assert full['gflops'] * 1e9 > 2 * 16 * (512 * 256 + 256 * 256) + 2 * 32896 * 10
    assert compressed['gflops'] < full['gflops']
