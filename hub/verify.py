"""`timm-gcp verify` as a script: `python hub/verify.py --help` (see timm_gcp/hub/cli.py)."""
import sys

from timm_gcp.hub.cli import main

if __name__ == '__main__':
    sys.exit(main(['verify', *sys.argv[1:]]))
