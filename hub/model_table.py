"""`timm-gcp model-table` as a script: `python hub/model_table.py --help` (see timm_gcp/hub/cli.py)."""
from timm_gcp.hub.cli import main

raise SystemExit(main(command='model-table'))
