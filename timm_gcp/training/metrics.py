"""The run's metrics file (per-epoch history, final and best epochs) and the model card's metrics."""
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List

__all__ = ['finite_or_none', 'summarize', 'write_json', 'write_run_metrics', 'metrics_for_card']


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN/Inf float (in nested dicts and lists too) replaced by None, as strict JSON needs."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def summarize(history: List[Dict[str, Any]], metric: str = 'top1') -> Dict[str, Dict[str, Any]]:
    """The final epoch and the best epoch by `metric`, reported separately."""
    if not history:
        return {}
    keep = ('epoch', 'top1', 'top5', 'val_loss')
    best = max(history, key=lambda row: -math.inf if row[metric] is None else row[metric])
    return {'final': {k: history[-1][k] for k in keep}, 'best': {k: best[k] for k in keep}}


def write_json(data: Dict[str, Any], path: Path) -> None:
    """Write `data` as strict JSON (NaN/Inf as null) atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(finite_or_none(data), indent=2, allow_nan=False))
    os.replace(tmp, path)


def write_run_metrics(accelerator: Any, run_dir: Path, run_info: Dict[str, Any],
                      history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """`run_info` (model, command, data, ...) with the final and best epochs and the `history`; the main process
    writes it to `run_dir/metrics.json`."""
    metrics = {**run_info, **summarize(history), 'history': history}
    if accelerator.is_main_process:
        write_json(metrics, Path(run_dir) / 'metrics.json')
    return metrics


def metrics_for_card(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The final and best results as the model card reports them."""
    final, best = metrics['final'], metrics['best']
    return {'top1': final['top1'], 'top5': final['top5'], 'epochs': final['epoch'] + 1,
            'best_top1': best['top1'], 'best_top5': best['top5'], 'best_epoch': best['epoch']}
