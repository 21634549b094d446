"""`timm-gcp verify` as a script: `python hub/verify.py --help` (see timm_gcp/hub/cli.py)."""
from timm_gcp.hub.cli import main

raise SystemExit(main(command='verify'))
