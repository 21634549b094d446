"""Write a benchmark result as JSON, a Markdown report and a PNG chart, and judge the issue's targets."""
import json
from pathlib import Path
from typing import Dict, List, Optional

from meta_layer_bench import KEY_CONFIG, is_exact
from network_bench import is_baseline_head


def _fmt(value: Optional[float], digits: int = 2, suffix: str = '') -> str:
    return 'n/a' if value is None else f'{value:,.{digits}f}{suffix}'


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def _head_label(row: Dict[str, object]) -> str:
    """'GAP', the meta-layer name, or the name with its non-default options."""
    if not row['meta_layer']:
        return 'GAP'
    return f'{row["meta_layer"]} ({row["options"]})' if row['options'] else row['meta_layer']


def targets(result: Dict[str, object]) -> List[Dict[str, object]]:
    """The issue's performance targets, judged from this run's own numbers (None: not measured in this run)."""
    network = result.get('network') or {'rows': []}
    rows = network['rows']
    arch = result['settings']['arch']
    isqrt = next((r for r in rows if is_baseline_head(r, 'isqrt')), {})
    key = {r['variant']: r for r in result.get('key_config', [])}
    at_key = all(key.get('isqrt (fused backward)', {}).get(k) == v for k, v in KEY_CONFIG.items())
    out = [{'target': f'{r["model"]} training with {r["meta_layer"]} >= 0.95x the iSQRT head',
            'value': r.get('throughput_vs_isqrt'), 'limit': 0.95, 'higher_is_better': True}
           for r in rows if r['meta_layer'] and is_exact(r['meta_layer']) and is_baseline_head(r, r['meta_layer'])]
    fused = key.get('isqrt (fused backward)', {})
    compiled = {r['variant']: r for r in result.get('compiled', [])}.get('isqrt (compile=True, CUDA graphs)', {})
    out += [
        {'target': 'isqrt fwd+bwd at B=64, d=256, M=196 <= 2.0 ms (eager, default)',
         'value': fused.get('fwd_bwd_ms') if at_key else None, 'limit': 2.0, 'higher_is_better': False},
        {'target': 'isqrt fwd+bwd at B=64, d=256, M=196 <= 2.0 ms (compile=True)',
         'value': compiled.get('fwd_bwd_ms') if at_key else None, 'limit': 2.0, 'higher_is_better': False},
        {'target': f'gcp_{arch} (iSQRT) >= 0.80x {arch} GAP img/s',
         'value': isqrt.get('throughput_vs_gap'), 'limit': 0.80, 'higher_is_better': True},
        {'target': f'gcp_{arch} (iSQRT) peak memory <= 1.3x GAP',
         'value': isqrt.get('memory_vs_gap'), 'limit': 1.3, 'higher_is_better': False},
    ]
    on_gpu = result.get('environment', {}).get('device_type', 'cuda') == 'cuda'  # the targets are H100/H200 ones
    for t in out:
        value = t['value']
        t['met'] = None if value is None or not on_gpu else (
            value >= t['limit'] if t['higher_is_better'] else value <= t['limit'])
    return out


def markdown(result: Dict[str, object]) -> str:
    env = result['environment']
    settings = result['settings']
    parts = [
        f'# timm-gcp benchmarks on {env["device_name"]}',
        f'torch {env["torch"]}, timm {env["timm"]}, CUDA {env["cuda"]}, eigh backend for this device: '
        f'`{env["eigh_backend"]}`. Settings: `{json.dumps(settings)}`.',
        'Meta-layer inputs are covariances of random features `covariance(randn(B, d, M))`, computed outside the '
        'timed region; forward is timed under `no_grad`, forward+backward with a random output gradient. '
        'Medians of CUDA-event (GPU) or wall-clock (CPU) times after warm-up. Ratios are against baselines '
        f'measured in this same run: the fused `isqrt` at the same (B, d, M), and timm `{settings["arch"]}` (GAP).',
        '## Targets',
        _table(['target', 'this run', 'met'], [
            [t['target'], _fmt(t['value'], 3),
             {True: 'yes', False: 'NO', None: 'not measured' if t['value'] is None else 'not judged (GPU target)'}[
                 t['met']]]
            for t in result['targets']]),
    ]
    key = result.get('key_config', [])
    if key:
        k = key[0]
        parts += [f'## Meta-layer baselines at B={k["batch"]}, d={k["dim"]}, M={k["positions"]}', _table(
            ['variant', 'fwd ms', 'fwd+bwd ms', 'fwd / isqrt', 'fwd+bwd / isqrt', 'matmul GFLOP fwd+bwd'],
            [[r['variant'], _fmt(r.get('fwd_ms'), 3), _fmt(r.get('fwd_bwd_ms'), 3), _fmt(r.get('fwd_vs_isqrt')),
              _fmt(r.get('fwd_bwd_vs_isqrt')) + (f' ({r["error"]})' if 'error' in r else ''),
              _fmt(r.get('fwd_bwd_gflop')) if 'fwd_bwd_gflop' in r else ''] for r in key])]
    compiled = result.get('compiled', [])
    if compiled:
        parts += ['## isqrt through torch.compile (CUDA graphs)', _table(
            ['variant', 'fwd ms', 'fwd+bwd ms', 'fwd / eager', 'fwd+bwd / eager'],
            [[r['variant'], _fmt(r.get('fwd_ms'), 3), _fmt(r.get('fwd_bwd_ms'), 3), _fmt(r.get('fwd_vs_isqrt')),
              _fmt(r.get('fwd_bwd_vs_isqrt')) + (f' ({r["error"]})' if 'error' in r else '')] for r in compiled])]
    network = result.get('network')
    if network:
        parts += [f'## Training step, batch {network["batch"]}, {network["image_size"]} px, bf16 autocast, '
                  'channels_last', _table(
                      ['model', 'meta-layer', 'img/s', 'vs GAP', 'vs iSQRT head', 'peak MiB', 'memory vs GAP'],
                      [[r['model'], _head_label(r), _fmt(r.get('img_per_s'), 1),
                        _fmt(r.get('throughput_vs_gap')), _fmt(r.get('throughput_vs_isqrt')),
                        _fmt(r.get('peak_mib'), 0), _fmt(r.get('memory_vs_gap')) +
                        (f' ({r["error"]})' if 'error' in r else '')] for r in network['rows']])]
        if network.get('skipped'):
            parts.append(f'Whole-network GCP rows skipped: {network["skipped"]}.')
    grid = result.get('grid', [])
    if grid:
        parts += ['## Every meta-layer, every (B, d, M)', 'saved MiB: what one forward keeps for its backward '
                  "(autograd's saved tensors, the input excluded).", _table(
            ['meta-layer', 'B', 'd', 'M', 'fwd ms', 'fwd / isqrt', 'fwd+bwd ms', 'fwd+bwd / isqrt', 'saved MiB'],
            [[r['meta_layer'], str(r['batch']), str(r['dim']), str(r['positions']), _fmt(r.get('fwd_ms'), 3),
              _fmt(r.get('fwd_vs_isqrt')), _fmt(r.get('fwd_bwd_ms'), 3), _fmt(r.get('fwd_bwd_vs_isqrt')),
              _fmt(r.get('saved_mib'), 1) + (f' ({r["error"]})' if 'error' in r else '')] for r in grid])]
    maps = result.get('riemannian', [])
    if maps:
        parts += ["## RiemGCP's maps after isqrt, every (B, d, M)", _table(
            ['variant', 'B', 'd', 'M', 'fwd ms', 'fwd+bwd ms', 'fwd+bwd / isqrt alone', 'saved MiB'],
            [[r['variant'], str(r['batch']), str(r['dim']), str(r['positions']), _fmt(r.get('fwd_ms'), 3),
              _fmt(r.get('fwd_bwd_ms'), 3), _fmt(r.get('fwd_bwd_vs_isqrt')),
              _fmt(r.get('saved_mib'), 1) + (f' ({r["error"]})' if 'error' in r else '')] for r in maps])]
    return '\n\n'.join(parts) + '\n'


def _leave_empty(axes, why: str) -> None:
    axes.set_axis_off()
    axes.text(0.5, 0.5, why, ha='center', va='center', color='gray')


def chart(result: Dict[str, object], path: Path) -> None:
    """Left: meta-layer fwd+bwd time / isqrt at the largest common configuration. Right: training img/s and peak
    memory of each model / GAP."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    grid = [r for r in result.get('grid', []) if r.get('fwd_bwd_vs_isqrt')]
    if grid:
        config = max({(r['batch'], r['dim'], r['positions']) for r in grid},
                     key=lambda c: (c == tuple(KEY_CONFIG.values()), c))
        rows = [r for r in grid if (r['batch'], r['dim'], r['positions']) == config]
        left.barh([r['meta_layer'] for r in rows], [r['fwd_bwd_vs_isqrt'] for r in rows], color='tab:blue')
        left.axvline(1.0, color='k', lw=0.8)
        left.set_xscale('log')
        left.set_xlabel('fwd+bwd time / isqrt (log)')
        left.set_title('meta-layers at B={}, d={}, M={}'.format(*config))
    else:
        _leave_empty(left, 'no meta-layer grid in this run')
    network = [r for r in (result.get('network') or {'rows': []})['rows'] if r.get('throughput_vs_gap')]
    if network:
        labels = [_head_label(r) for r in network]
        ys = range(len(network))
        right.barh([y - 0.2 for y in ys], [r['throughput_vs_gap'] for r in network], height=0.4, label='img/s vs GAP')
        right.barh([y + 0.2 for y in ys], [r.get('memory_vs_gap') or 0 for r in network], height=0.4,
                   label='peak memory vs GAP')
        right.set_yticks(list(ys), labels)
        right.axvline(1.0, color='k', lw=0.8)
        right.legend()
        right.set_title(f'training step ({result["settings"]["arch"]} GAP = 1)')
    else:
        _leave_empty(right, 'no training-step section in this run')
    fig.suptitle(f'timm-gcp on {result["environment"]["device_name"]}')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: Dict[str, object], output: Path) -> None:
    """results.json, results.md and results.png under `output`."""
    output.mkdir(parents=True, exist_ok=True)
    result['targets'] = targets(result)
    (output / 'results.json').write_text(json.dumps(result, indent=1))
    (output / 'results.md').write_text(markdown(result))
    chart(result, output / 'results.png')
