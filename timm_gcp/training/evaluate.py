"""Classification evaluation shared by train.py and Hub verification, over `(image, target, unreadable)` samples."""
from contextlib import nullcontext
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, accelerator: Optional[Any] = None, flip_test: bool = False,
             channels_last: bool = False, progress: bool = False) -> Dict[str, float]:
    """Loss and top-1/top-5 (%) of the float32 logits (`flip_test`: averaged with the mirror image's) over the readable
    images of `loader`, unreadable ones counted apart. With an `accelerator` (a prepared loader) each image counts
    once across processes (`gather_for_metrics`) under its autocast; without one, batches go to the model's device."""
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    show = progress and (accelerator is None or accelerator.is_main_process)
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, readable, unreadable
    for x, y, unreadable in tqdm(loader, disable=not show, desc='eval', leave=False, dynamic_ncols=True):
        x, y, unreadable = x.to(device), y.to(device).clamp_min(0), unreadable.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast() if accelerator is not None else nullcontext():
            logits = model(x).float()
            if flip_test:
                logits = (logits + model(x.flip(3)).float()) / 2
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        per_image = torch.stack([F.cross_entropy(logits, y, reduction='none'), hits[:, 0], hits.any(1)], 1)
        if accelerator is not None:
            per_image, unreadable = accelerator.gather_for_metrics((per_image, unreadable))
        readable = unreadable == 0
        totals += torch.cat([per_image[readable].double().sum(0), torch.stack([readable.sum(), (~readable).sum()])])
    loss_sum, top1, top5, count, skipped = totals.tolist()
    denom = max(count, 1.)
    return {'val_loss': loss_sum / denom, 'top1': 100. * top1 / denom, 'top5': 100. * top5 / denom,
            'val_images': int(count), 'unreadable_val': int(skipped)}
