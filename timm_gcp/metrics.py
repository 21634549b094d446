"""Classification metrics shared by training and Hub verification: (flip-averaged) logits and top-k hits."""
from typing import Sequence

import torch
from torch import nn

__all__ = ['predict', 'topk_correct']


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
