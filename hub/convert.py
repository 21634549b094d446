"""`timm-gcp convert` as a script: `python hub/convert.py --help` (see timm_gcp/hub/cli.py)."""
import sys

from timm_gcp.hub.cli import main

if __name__ == '__main__':
    sys.exit(main(['convert', *sys.argv[1:]]))
