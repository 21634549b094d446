"""`timm-gcp robustness` as a script: `python hub/robustness.py --help`, or `accelerate launch hub/robustness.py ...`
to share the corruptions out over processes (see timm_gcp/hub/cli.py)."""
from timm_gcp.hub.cli import main

raise SystemExit(main(command='robustness'))
