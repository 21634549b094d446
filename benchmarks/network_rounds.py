"""Interleaved rounds of the training-step benchmark: timm ARCH (GAP), then gcp_ARCH with each meta-layer, repeated,
so slow drifts of the machine (clocks, temperature) show as spread between rounds instead of biasing one model.

    python benchmarks/network_rounds.py --rounds 3 --meta-layers isqrt,eig,cov --output results/DEVICE/network_repeat.json
"""
import argparse
import json
from pathlib import Path

import torch

import timm_gcp  # noqa: F401  (registers gcp_ARCH)

from network_bench import measure_training


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--arch', default='resnet50')
    parser.add_argument('--meta-layers', default='isqrt,eig,cov', help='comma-separated meta-layers of gcp_ARCH')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--reps', type=int, default=15)
    parser.add_argument('--output', type=Path, required=True, help='JSON file: one row per (round, model)')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    settings = dict(device=device, batch=args.batch, image_size=args.image_size, warmup=args.warmup, reps=args.reps)
    rows = []
    for round_idx in range(args.rounds):
        rows.append({**measure_training(args.arch, **settings), 'model': args.arch, 'round': round_idx})
        for name in args.meta_layers.split(','):
            rows.append({**measure_training(f'gcp_{args.arch}', meta_layer=name, **settings),
                         'model': f'gcp_{args.arch}', 'round': round_idx, 'meta_layer': name})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1))
    print(f'wrote {len(rows)} rows to {args.output}')


if __name__ == '__main__':
    main()
