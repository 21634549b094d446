"""Size and cost of GCP heads: representation dimension, head parameters and forward FLOPs of the head (GCPPool and the
classifier) on a model's final feature map, counted by torch's FlopCounterMode, for the compact and IDCCP variants.

    python benchmarks/head_cost.py [--model gcp_resnet50] [--img-size 224] [--num-classes 1000]

Prints a Markdown table (docs/models.md holds the gcp_resnet50 one).
"""
import argparse
from typing import Dict, List, Sequence, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import timm_gcp  # noqa: F401  (registers the GCP models)
from flops import IN_PLACE_PRODUCTS

VARIANTS: Tuple[Tuple[str, Dict[str, object]], ...] = (
    ('full head (iSQRT-COV, d = 256)', {}),
    ('Gaussian embedding', dict(gaussian=True)),
    ('d = 128 (one 1x1 reduction)', dict(gcp_dim=128)),
    ('progressive 1x1 to d = 128: 2048 -> 512 -> 128', dict(progressive_widths=[512], gcp_dim=128)),
    ('progressive 1x1 to d = 256: 2048 -> 1024 -> 512 -> 256', dict(progressive_widths=[1024, 512])),
    ('row-wise group conv, 4 filters per row', dict(group_conv=4)),
    ('IDCCP compression, k = 36', dict(compress_dim=36)),
    ('Gaussian embedding + IDCCP compression, k = 36', dict(gaussian=True, compress_dim=36)),
    ('IDCCP: D4 invariance + compression, k = 36 (head on 8 maps)', dict(invariance='d4', compress_dim=36)),
    ('GAP (global_pool=avg)', dict(global_pool='avg')),
)


def head_cost(model_name: str, img_size: int, num_classes: int, **kwargs) -> Dict[str, float]:
    """{'dim', 'params', 'gflops'} of the head of `model_name` built with `kwargs`: pooled features, parameters of
    `global_pool` and `fc`, forward GFLOPs of `forward_head` on one image's final feature map (with `invariance`, the
    maps of its |G| transforms)."""
    model = timm.create_model(model_name, num_classes=num_classes, **kwargs).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.zeros(1, 3, img_size, img_size))
        feats = torch.randn_like(feats).abs()  # a generic (full-rank) map: the head's cost does not depend on it
        with FlopCounterMode(display=False, custom_mapping=IN_PLACE_PRODUCTS) as counter:
            model.forward_head(feats)
    params = sum(p.numel() for m in (model.global_pool, model.fc) for p in m.parameters())
    return {'dim': model.head_hidden_size, 'params': params, 'gflops': counter.get_total_flops() / 1e9}


def backbone_gflops(model_name: str, img_size: int) -> float:
    """Forward GFLOPs of `forward_features` on one image (what each group transform costs with `invariance`)."""
    model = timm.create_model(model_name, num_classes=0).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_features(torch.zeros(1, 3, img_size, img_size))
    return counter.get_total_flops() / 1e9


def markdown(rows: Sequence[Tuple[str, Dict[str, float]]], reference: Dict[str, float]) -> List[str]:
    lines = ['| head | representation dim | head params | head GFLOPs |', '|---|---:|---:|---:|']
    for name, row in rows:
        change = f' ({100 * (row["dim"] / reference["dim"] - 1):+.0f} %)' if row is not reference else ''
        lines.append(f'| {name} | {row["dim"]:,}{change} | {row["params"] / 1e6:.2f} M | {row["gflops"]:.3f} |')
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='gcp_resnet50')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--num-classes', type=int, default=1000)
    args = parser.parse_args()
    rows = [(name, head_cost(args.model, args.img_size, args.num_classes, **options)) for name, options in VARIANTS]
    print('\n'.join(markdown(rows, rows[0][1])))
    print(f'\nbackbone forward: {backbone_gflops(args.model, args.img_size):.2f} GFLOPs per image and transform')


if __name__ == '__main__':
    main()
