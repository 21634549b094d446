"""The run's metrics file (per-epoch history, final and best epochs) and the model card's metrics."""
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN/Inf float (in nested dicts and lists too) replaced by None, as strict JSON needs."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_run_metrics(accelerator: Any, run_dir: Path, run_info: Dict[str, Any],
                      history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """`run_info` (model, command, data, ...) with the final and best (top-1) epochs and the `history`; the main
    process writes it to `run_dir/metrics.json` as strict JSON, atomically (temporary file, then rename)."""
    keep = ('epoch', 'top1', 'top5', 'val_loss')
    best = max(history, key=lambda row: -math.inf if row['top1'] is None else row['top1'], default=None)
    summary = {'final': {k: history[-1][k] for k in keep}, 'best': {k: best[k] for k in keep}} if history else {}
    metrics = {**run_info, **summary, 'history': history}
    if accelerator.is_main_process:
        path, tmp = Path(run_dir) / 'metrics.json', Path(run_dir) / '.metrics.json.tmp'
        tmp.write_text(json.dumps(finite_or_none(metrics), indent=2, allow_nan=False))
        os.replace(tmp, path)
    return metrics


def metrics_for_card(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """The final and best results as the model card reports them."""
    final, best = metrics['final'], metrics['best']
    return {'top1': final['top1'], 'top5': final['top5'], 'epochs': final['epoch'] + 1,
            'best_top1': best['top1'], 'best_top5': best['top5'], 'best_epoch': best['epoch']}
