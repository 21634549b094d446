"""Verify a published timm-gcp repo: checksums, hf-hub: loading and, given data, the card's accuracy.

    python hub/verify.py ORG/NAME [--revision R] [--data-dir D] [--tolerance 0.5]

Exits 0 when everything matches, 1 with a message naming the mismatch otherwise.
"""
import argparse
import sys
from pathlib import Path

from timm_gcp.hub.catalogue import load_catalogue, recorded_sha256
from timm_gcp.hub.push import redact_token
from timm_gcp.hub.verify import verify_repo

CATALOGUE = Path(__file__).resolve().parent / 'catalogue.yaml'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('repo_id', help='ORG/NAME')
    parser.add_argument('--revision', default=None, help='branch, tag or commit (default main)')
    parser.add_argument('--data-dir', default=None, help='image folder (with val/<class>/...) to re-evaluate on')
    parser.add_argument('--tolerance', type=float, default=0.5, help='allowed top-1/top-5 difference in points')
    parser.add_argument('-b', '--batch-size', type=int, default=32)
    parser.add_argument('--hflip-average', action='store_true', help='average logits with the flipped image')
    parser.add_argument('--catalogue', nargs='?', const=str(CATALOGUE), default=None,
                        help='also compare with the sha256 recorded in the catalogue (default hub/catalogue.yaml)')
    args = parser.parse_args(argv)
    try:
        expected = recorded_sha256(load_catalogue(args.catalogue), args.repo_id) if args.catalogue else None
        report = verify_repo(args.repo_id, revision=args.revision, data_dir=args.data_dir, tolerance=args.tolerance,
                             batch_size=args.batch_size, hflip_average=args.hflip_average, expected_sha256=expected)
    except Exception as e:
        print(redact_token(f'verify failed: {type(e).__name__}: {e}'), file=sys.stderr)
        return 1
    print(f'{report.repo_id}@{report.commit}: checksums match the push manifest and the Hub object ids')
    for name, sha in sorted(report.sha256.items()):
        print(f'  sha256 {sha}  {name}')
    print('hf-hub: load reproduces model.safetensors exactly')
    if report.measured:
        print(f"re-evaluated on {report.measured['count']} images: top-1 {report.measured['top1']:.2f}% "
              f"top-5 {report.measured['top5']:.2f}% (card: {report.card})")
    return 0


if __name__ == '__main__':
    sys.exit(main())
