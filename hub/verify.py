"""Verify a published timm-gcp repo or a local export folder, and, given data, the card's accuracy.

    python hub/verify.py ORG/NAME [--revision R] [--catalogue] [--data-dir D] [--tolerance 0.5]
    python hub/verify.py RUN_DIR/model [--data-dir D] [--tolerance 0.5]

A repo: checksums against the push manifest and the Hub's object ids, then `hf-hub:` loading. A folder (any existing
directory): what hub/push.py checks before uploading, then `local-dir:` loading. Both compare the loaded weights
with model.safetensors bit for bit. Exits 0 when everything matches, 1 with a message naming the mismatch otherwise.
"""
import argparse
import sys
from pathlib import Path

from timm_gcp.hub.catalogue import load_catalogue, recorded_sha256
from timm_gcp.hub.push import redact_token
from timm_gcp.hub.verify import verify_folder, verify_repo

CATALOGUE = Path(__file__).resolve().parent / 'catalogue.yaml'


def _verify(args: argparse.Namespace):
    options = dict(data_dir=args.data_dir, tolerance=args.tolerance, batch_size=args.batch_size,
                   hflip_average=args.hflip_average)
    if Path(args.target).is_dir():
        if args.revision or args.catalogue:
            raise ValueError(f'{args.target} is a local folder: --revision and --catalogue apply to a repo id only')
        return verify_folder(args.target, **options)
    expected = recorded_sha256(load_catalogue(args.catalogue), args.target) if args.catalogue else None
    return verify_repo(args.target, revision=args.revision, expected_sha256=expected, **options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('target', help='ORG/NAME, or an exported model folder')
    parser.add_argument('--revision', default=None, help='branch, tag or commit of a repo (default main)')
    parser.add_argument('--data-dir', default=None, help='image folder (with val/<class>/...) to re-evaluate on')
    parser.add_argument('--tolerance', type=float, default=0.5, help='allowed top-1/top-5 difference in points')
    parser.add_argument('-b', '--batch-size', type=int, default=32)
    parser.add_argument('--hflip-average', action='store_true', help='average logits with the flipped image')
    parser.add_argument('--catalogue', nargs='?', const=str(CATALOGUE), default=None,
                        help='also compare a repo with the sha256 the catalogue records (default hub/catalogue.yaml)')
    args = parser.parse_args(argv)
    try:
        report = _verify(args)
    except Exception as e:
        print(redact_token(f'verify failed: {type(e).__name__}: {e}'), file=sys.stderr)
        return 1
    if report.commit:
        print(f'{report.source}@{report.commit}: checksums match the push manifest and the Hub object ids')
    else:
        print(f'{report.source}: files, config, weights and card are fit to publish')
    for name, sha in sorted(report.sha256.items()):
        print(f'  sha256 {sha}  {name}')
    print(f"{'hf-hub' if report.commit else 'local-dir'}: load reproduces model.safetensors exactly")
    if report.measured:
        print(f"re-evaluated on {report.measured['count']} images: top-1 {report.measured['top1']:.2f}% "
              f"top-5 {report.measured['top5']:.2f}% (card: {report.card})")
    return 0


if __name__ == '__main__':
    sys.exit(main())
