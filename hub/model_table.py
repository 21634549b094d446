"""Print the README model table generated from hub/catalogue.yaml, or rewrite it in README.md (--write).

The table lives between the markers <!-- model-table --> and <!-- /model-table --> of README.md. The catalogue is
checked against timm's registry first: published entries must be registered tags, the others must not be.
"""
import argparse
import sys
from pathlib import Path

from timm_gcp.hub.catalogue import check_registry, load_catalogue, render_table, replace_table

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--catalogue', default=str(ROOT / 'hub' / 'catalogue.yaml'))
    parser.add_argument('--readme', default=str(ROOT / 'README.md'))
    parser.add_argument('--write', action='store_true', help='replace the table in the README')
    args = parser.parse_args(argv)
    try:
        entries = load_catalogue(args.catalogue)
        check_registry(entries)
        table = render_table(entries)
        if args.write:
            readme = Path(args.readme)
            readme.write_text(replace_table(readme.read_text(), table))
    except ValueError as e:
        print(f'model table: {e}', file=sys.stderr)
        return 1
    if not args.write:
        print(table, end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
