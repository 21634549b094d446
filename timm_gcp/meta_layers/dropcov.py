"""DropCov (Wang et al., "DropCov: A Simple yet Effective Method for Improving Deep Architectures", NeurIPS 2022).

DropCov replaces the covariance post-normalisation by a training-time adaptive channel dropout on the features
right before the covariance (`timm_gcp.layers.AdaptiveChannelDropout`). At inference the dropout is the identity and
the covariance goes unnormalised to the classifier: the `cov` meta-layer.
"""
import torch

from .registry import MetaLayer, register_meta_layer

__all__ = ['Covariance']


DROPCOV_BIBTEX = """@inproceedings{wang2022dropcov,
  title={DropCov: A Simple yet Effective Method for Improving Deep Architectures},
  author={Wang, Qilong and Gao, Mingze and Zhang, Zhaolin and Xie, Jiangtao and Li, Peihua and Hu, Qinghua},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2022}
}"""

@register_meta_layer('cov')
class Covariance(MetaLayer):
    """No normalisation: the covariance itself (DropCov's inference path, Wang et al., NeurIPS 2022).

    Output dtype: float32, or float64 for float64 input."""
    papers = (DROPCOV_BIBTEX,)
    power = 1.0  # Σ itself

    def normalize(self, cov: torch.Tensor) -> torch.Tensor:
        return cov
