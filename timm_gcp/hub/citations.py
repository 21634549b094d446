"""BibTeX entries of the papers behind each meta-layer and architecture, and which ones a model should cite."""
from typing import Dict, List, Optional

__all__ = ['CITATIONS', 'citations_for']

CITATIONS: Dict[str, str] = {
    'mpn_cov': """@inproceedings{li2017second,
  title={Is Second-order Information Helpful for Large-scale Visual Recognition?},
  author={Li, Peihua and Xie, Jiangtao and Wang, Qilong and Zuo, Wangmeng},
  booktitle={IEEE International Conference on Computer Vision (ICCV)},
  year={2017}
}""",
    'isqrt_cov': """@inproceedings{li2018towards,
  title={Towards Faster Training of Global Covariance Pooling Networks by Iterative Matrix Square Root Normalization},
  author={Li, Peihua and Xie, Jiangtao and Wang, Qilong and Gao, Zilin},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2018}
}""",
    'fast_mpn_cov': """@inproceedings{wang2020deep,
  title={What Deep CNNs Benefit from Global Covariance Pooling: An Optimization Perspective},
  author={Wang, Qilong and Zhang, Li and Wu, Banggu and Ren, Dongwei and Li, Peihua and Zuo, Wangmeng and Hu, Qinghua},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2020}
}""",
    'svd_pade': """@inproceedings{song2021approximate,
  title={Why Approximate Matrix Square Root Outperforms Accurate SVD in Global Covariance Pooling?},
  author={Song, Yue and Sebe, Nicu and Wang, Wei},
  booktitle={IEEE International Conference on Computer Vision (ICCV)},
  year={2021}
}""",
    'mpa_lya': """@inproceedings{song2022fast,
  title={Fast Differentiable Matrix Square Root},
  author={Song, Yue and Sebe, Nicu and Wang, Wei},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2022}
}""",
    'dropcov': """@inproceedings{wang2022dropcov,
  title={DropCov: A Simple yet Effective Method for Improving Deep Architectures},
  author={Wang, Qilong and Gao, Mingze and Zhang, Zhaolin and Xie, Jiangtao and Li, Peihua and Hu, Qinghua},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2022}
}""",
    'gsop': """@inproceedings{gao2019global,
  title={Global Second-order Pooling Convolutional Networks},
  author={Gao, Zilin and Xie, Jiangtao and Wang, Qilong and Li, Peihua},
  booktitle={IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2019}
}""",
}

# every GCP network stands on MPN-COV; the meta-layer adds its own paper(s)
_META_LAYER_PAPERS = {
    'isqrt': ('isqrt_cov', 'fast_mpn_cov'),
    'eig': (),
    'svd_pade': ('svd_pade',),
    'svd_taylor': ('svd_pade',),
    'svd_pi': ('svd_pade',),
    'svd_trunc': ('svd_pade',),
    'mpa_lya': ('mpa_lya',),
    'mtp_lya': ('mpa_lya',),
    'cov': ('dropcov',),
}


def citations_for(architecture: str, meta_layer: Optional[str]) -> List[str]:
    """BibTeX entries that apply to `architecture` with `meta_layer` (empty for a non-GCP model)."""
    keys: List[str] = []
    if architecture.startswith('gsop_'):
        keys.append('gsop')
    if meta_layer is not None:
        keys.append('mpn_cov')
        keys.extend(_META_LAYER_PAPERS.get(meta_layer, ()))
    return [CITATIONS[k] for k in dict.fromkeys(keys)]
