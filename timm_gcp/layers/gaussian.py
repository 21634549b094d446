"""Global Gaussian embedding: first- and second-order statistics of the features as one SPD matrix (G2DeNet, CVPR
2017; MPN-COV journal version, TPAMI 2021)."""
import torch
from torch import nn

from ..ops import flat_features, fp32_island

__all__ = ['GaussianEmbedding', 'gaussian_embedding']


G2DENET_BIBTEX = """@inproceedings{wang2017g2denet,
  title={G2DeNet: Global Gaussian Distribution Embedding Network and Its Application to Visual Recognition},
  author={Wang, Qilong and Li, Peihua and Zhang, Lei},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2017}
}"""
MPN_COV_TPAMI_BIBTEX = """@article{wang2021deep,
  title={Deep CNNs Meet Global Covariance Pooling: Better Representation and Generalization},
  author={Wang, Qilong and Xie, Jiangtao and Zuo, Wangmeng and Zhang, Lei and Li, Peihua},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume={43},
  number={8},
  pages={2582--2597},
  year={2021}
}"""


def gaussian_embedding(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, C, M) features -> (B, C+1, C+1) embedding [[Σ + μμᵀ, μ], [μᵀ, 1]] of their Gaussian
    N(μ, Σ) (biased Σ, 1/M), computed as the second moment of the augmented features [x; 1].

    Computed with autocast disabled, in float32 (float64 if `x` is float64): that is also the output dtype.
    """
    with fp32_island(x):
        x = flat_features(x, 'gaussian_embedding')
        augmented = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        return augmented @ augmented.transpose(-1, -2) / x.shape[-1]


class GaussianEmbedding(nn.Module):
    """(B, C, H, W) features -> (B, C+1, C+1) global Gaussian embedding (`gaussian_embedding`), which the GCP head's
    meta-layer then normalises (G2DeNet's power α = ½ is the `eig` meta-layer's default; `isqrt` is its square root by
    Newton-Schulz)."""
    papers = (G2DENET_BIBTEX, MPN_COV_TPAMI_BIBTEX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_embedding(x)
