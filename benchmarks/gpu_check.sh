#!/usr/bin/env bash
# The one prepared GPU session: environment, the CUDA-marked tests, the full benchmark suite, then interleaved
# training-step rounds (under 10 minutes in all).
# Run from the repository root; everything it writes lands under $OUT (log.txt, bench/results.{json,md,png},
# bench/network_repeat.json).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT/bench"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv
  python3 -c "import torch, timm, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'timm', timm.__version__, torch.cuda.get_device_name())"
  python3 -X faulthandler -c "
import torch, timm_gcp
from timm_gcp.ops.cusolver_eigh import cusolver_eigh, cusolver_status
print('cusolver', cusolver_status())
a = timm_gcp.covariance(torch.randn(4, 8, 20, device='cuda', dtype=torch.float64))
w, v = cusolver_eigh(a)
print('smoke residual', ((a @ v - v * w[:, None]).norm() / a.norm()).item(),
      'eigenvalue error', (w - torch.linalg.eigvalsh(a)).abs().max().item())"
  timeout 150 python3 -m pytest -m cuda tests -q -p no:cacheprovider --continue-on-collection-errors -rfEs
  echo "pytest exit: $?"
  timeout 300 python3 benchmarks/run.py --device cuda --output "$OUT/bench"
  echo "benchmark exit: $?"
  timeout 110 python3 benchmarks/network_rounds.py --rounds 3 --meta-layers isqrt,eig,cov,svd_pade \
    --output "$OUT/bench/network_repeat.json"
  echo "network rounds exit: $?"
  date -u
} 2>&1 | tee "$OUT/log.txt"
