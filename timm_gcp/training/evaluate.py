"""Classification evaluation shared by train.py and Hub verification: (flip-averaged) logits, top-k hits, and the
loss and top-1/top-5 over a loader of `(image, target, unreadable)` samples (timm_gcp.training.data)."""
from contextlib import nullcontext
from typing import Any, Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ['predict', 'topk_correct', 'evaluate']


def predict(model: nn.Module, x: torch.Tensor, flip_test: bool = False) -> torch.Tensor:
    """float32 logits of `x`, or with `flip_test` the mean of the logits of `x` and of its mirror image."""
    logits = model(x).float()
    if flip_test:
        logits = (logits + model(x.flip(3)).float()) / 2
    return logits


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """(B, C) logits, (B,) targets -> (B, len(ks)) float flags: target among the top k (k capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return torch.stack([hits[:, :k].any(dim=1) for k in ks], dim=1).float()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, accelerator: Optional[Any] = None, flip_test: bool = False,
             channels_last: bool = False, progress: bool = False) -> Dict[str, float]:
    """Loss and top-1/top-5 (%) over every readable image of `loader`, unreadable ones counted apart.

    With an `accelerator` (a prepared loader) each image counts once across processes (`gather_for_metrics` drops
    the padding of the last batches) under its autocast; without one, batches go to the model's device.
    """
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    main = accelerator is None or accelerator.is_main_process
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, readable, unreadable
    for x, y, unreadable in tqdm(loader, disable=not (progress and main), desc='eval', leave=False,
                                 dynamic_ncols=True):
        x, y, unreadable = x.to(device), y.to(device), unreadable.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast() if accelerator is not None else nullcontext():
            logits = predict(model, x, flip_test)
        target = y.clamp_min(0)
        loss = F.cross_entropy(logits, target, reduction='none')
        hits = topk_correct(logits, target)
        if accelerator is not None:
            loss, hits, unreadable = accelerator.gather_for_metrics((loss, hits, unreadable))
        readable = (unreadable == 0).double()
        totals += torch.stack([(loss.double() * readable).sum(), (hits[:, 0].double() * readable).sum(),
                               (hits[:, 1].double() * readable).sum(), readable.sum(), (1 - readable).sum()])
    loss_sum, top1, top5, count, skipped = totals.tolist()
    denom = max(count, 1.)
    return {'val_loss': loss_sum / denom, 'top1': 100. * top1 / denom, 'top5': 100. * top5 / denom,
            'val_images': int(count), 'unreadable_val': int(skipped)}
