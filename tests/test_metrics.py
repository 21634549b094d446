"""Shared classification metrics: top-k flags and flip-averaged logits."""
import torch
from torch import nn

from timm_gcp.metrics import predict, topk_correct


def test_topk_correct_flags_each_sample():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    flags = topk_correct(logits, target, ks=(1, 2))
    assert flags.tolist() == [[1., 1.], [0., 1.], [0., 0.]]
    assert topk_correct(logits, target).tolist() == [[1., 1.], [0., 1.], [0., 1.]]  # k=5 capped at 3 classes


class _LeftHalfSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-1] // 2].sum(dim=(1, 2, 3))[:, None].to(torch.bfloat16)


def test_predict_averages_mirror_logits_in_float32():
    x = torch.arange(8.).reshape(1, 1, 1, 8)
    model = _LeftHalfSum()
    assert predict(model, x).dtype == torch.float32 and predict(model, x).item() == 6.0
    assert predict(model, x, flip_test=True).item() == (6.0 + 22.0) / 2
