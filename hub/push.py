"""`timm-gcp push` as a script: `python hub/push.py --help` (see timm_gcp/hub/cli.py)."""
from timm_gcp.hub.cli import main

raise SystemExit(main(command='push'))
