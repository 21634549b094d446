"""`timm-gcp push` as a script: `python hub/push.py --help` (see timm_gcp/hub/cli.py)."""
import sys

from timm_gcp.hub.cli import main

if __name__ == '__main__':
    sys.exit(main(['push', *sys.argv[1:]]))
