"""DropCov's adaptive channel dropout (Wang et al., "DropCov: A Simple yet Effective Method for Improving Deep
Architectures", NeurIPS 2022): the feature layer applied before the covariance, paired with the `cov` meta-layer."""
import math

import torch
from torch import nn

__all__ = ['AdaptiveChannelDropout']


class AdaptiveChannelDropout(nn.Module):
    """DropCov's adaptive channel dropout (Wang et al., NeurIPS 2022): (B, C, H, W) or (B, C, M) features in,
    same shape out; the identity in eval mode.

    In training, features re-weighted by a softmax channel attention w lose whole channels with a rate p set by how
    well w agrees with each channel's total correlation (`scale`: how strongly); kept channels are scaled by
    1/(1 − p). The rule: docs/meta_layers.md.
    """

    def __init__(self, kernel_size: int = 3, scale: float = 10.0):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be a positive odd number, got {kernel_size}')
        self.scale = scale
        self.attention = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, M) -> (B, C) softmax channel attention."""
        pooled = x.mean(dim=-1).unsqueeze(1)
        return self.attention(pooled).squeeze(1).softmax(dim=-1)

    def drop_rate(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Scalar tensor p in [0, 1] from (B, C, M) re-weighted features and (B, C) attention weights."""
        with torch.no_grad():
            x, weights = x.float(), weights.float()
            centred = x - x.mean(dim=-1, keepdim=True)
            row_sums = (centred @ centred.sum(dim=1, keepdim=True).transpose(1, 2)).squeeze(-1) / x.shape[-1]
            agreement = nn.functional.cosine_similarity(weights, row_sums, dim=1).mean()
            return (1 - self.scale / math.log2(max(x.shape[1], 2)) * agreement).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(f'AdaptiveChannelDropout expects (B, C, H, W) or (B, C, M) features, got {tuple(x.shape)}')
        if not self.training:
            return x
        flat = x.flatten(2)
        weights = self.channel_weights(flat)
        flat = flat * (1 + weights.unsqueeze(-1))
        p = self.drop_rate(flat, weights)
        keep = torch.rand(flat.shape[:2] + (1,), device=x.device) >= p
        factor = torch.where(p < 1, 1 / (1 - p).clamp_min(1e-6), torch.zeros_like(p))
        return (flat * (keep * factor).to(flat.dtype)).reshape(x.shape)

    def extra_repr(self) -> str:
        return f'scale={self.scale}'
