"""Smoke test of the benchmark suite on the CPU: it runs end to end and writes JSON, Markdown and a PNG chart."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / 'benchmarks' / 'run.py'


@pytest.mark.slow
def test_quick_cpu_suite_writes_results(tmp_path):
    subprocess.run([sys.executable, str(RUN), '--device', 'cpu', '--quick', '--meta-layers', 'isqrt',
                    '--output', str(tmp_path)], check=True, timeout=600)
    result = json.loads((tmp_path / 'results.json').read_text())
    key = {r['variant']: r for r in result['key_config']}
    assert key['isqrt (fused backward)']['fwd_bwd_vs_isqrt'] == 1.0
    assert key['isqrt (plain autograd reference)']['fwd_bwd_ms'] > 0
    assert [r['meta_layer'] for r in result['grid']] == ['isqrt'] and result['grid'][0]['fwd_bwd_ms'] > 0
    network = {r['model']: r for r in result['network']['rows']}
    assert set(network) == {'resnet18', 'gcp_resnet18'}
    assert network['resnet18']['throughput_vs_gap'] == 1.0 and network['gcp_resnet18']['img_per_s'] > 0
    assert {t['target'] for t in result['targets']} >= {'gcp_resnet18 (iSQRT) >= 0.80x resnet18 GAP img/s'}
    assert '## Targets' in (tmp_path / 'results.md').read_text()
    assert (tmp_path / 'results.png').read_bytes()[:4] == b'\x89PNG'


def test_rejects_unknown_meta_layer(tmp_path):
    done = subprocess.run([sys.executable, str(RUN), '--device', 'cpu', '--meta-layers', 'nope', '--output',
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown meta-layers ['nope']" in done.stderr
