"""`timm-gcp model-table` as a script: `python hub/model_table.py --help` (see timm_gcp/hub/cli.py)."""
import sys

from timm_gcp.hub.cli import main

if __name__ == '__main__':
    sys.exit(main(['model-table', *sys.argv[1:]]))
