"""`timm-gcp convert` as a script: `python hub/convert.py --help` (see timm_gcp/hub/cli.py)."""
from timm_gcp.hub.cli import main

raise SystemExit(main(command='convert'))
