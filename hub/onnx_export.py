"""`timm-gcp onnx` as a script, the counterpart of timm's onnx_export.py: `python hub/onnx_export.py --help` (see
timm_gcp/hub/cli.py)."""
from timm_gcp.hub.cli import main

raise SystemExit(main(command='onnx'))
