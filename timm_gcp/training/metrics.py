"""Top-k accuracy and the run's metrics file (per-epoch history, final and best epochs)."""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

__all__ = ['topk_correct', 'summarize', 'write_json']


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """(B, C) logits, (B,) targets -> (B, len(ks)) float flags: target among the top k (k capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return torch.stack([hits[:, :k].any(dim=1) for k in ks], dim=1).float()


def summarize(history: List[Dict[str, Any]], metric: str = 'top1') -> Dict[str, Dict[str, Any]]:
    """The final epoch and the best epoch by `metric`, reported separately."""
    if not history:
        return {}
    keep = ('epoch', 'top1', 'top5', 'val_loss')
    best = max(history, key=lambda row: row[metric])
    return {'final': {k: history[-1][k] for k in keep}, 'best': {k: best[k] for k in keep}}


def write_json(data: Dict[str, Any], path: Path) -> None:
    """Write `data` as JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
