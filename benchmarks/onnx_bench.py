"""Deployment cost on CPU: onnxruntime (TorchScript-based export of the model in export mode) vs the exact PyTorch
model, per meta-layer, with the largest logit difference between them. Prints the Markdown table of
docs/models.md#deploying; medians of repeated runs (`timing.median_ms`).

    python benchmarks/onnx_bench.py [--model gcp_resnet18] [--img-size 112] [-b 4] [--threads 1] [--checkpoint ...]
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import onnxruntime
import timm
import torch
from timm.utils.onnx import onnx_export

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timm_gcp  # noqa: E402,F401  (registers the models)
from timing import median_ms  # noqa: E402

META_LAYERS = ('isqrt', 'cov', 'mtp_lya', 'mpa_lya', 'eig', 'svd_pade')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='gcp_resnet18')
    parser.add_argument('--checkpoint', default='', help='weights (default: random)')
    parser.add_argument('--num-classes', type=int, default=12)
    parser.add_argument('--img-size', type=int, default=112)
    parser.add_argument('-b', '--batch-size', type=int, default=4)
    parser.add_argument('--reps', type=int, default=7)
    parser.add_argument('--meta-layers', nargs='+', default=META_LAYERS)
    parser.add_argument('--threads', type=int, default=1,
                        help='for both (default 1: on a CPU shared with other jobs, 2 OpenMP threads wait on each other)')
    args = parser.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    print(f'{args.model}, {args.img_size} px, batch {args.batch_size}, {threads} threads, {os.cpu_count()} cores; '
          f'median ms per batch over up to {args.reps} runs')
    print('| meta-layer | PyTorch, exact | onnxruntime, export mode | max abs logit difference (largest logit) |')
    print('|---|---|---|---|')
    for name in args.meta_layers:
        model = timm.create_model(args.model, num_classes=args.num_classes, meta_layer=name,
                                  checkpoint_path=args.checkpoint).eval()
        with torch.no_grad():
            exact = model(x)
            torch_ms = median_ms(lambda: model(x), torch.device('cpu'), warmup=1, reps=args.reps, budget_s=30)
            model.set_exportable(True)
            with tempfile.TemporaryDirectory() as folder:
                path = str(Path(folder) / 'model.onnx')
                onnx_export(model, path, example_input=x)
                session = onnxruntime.InferenceSession(path, options)
                feed = {session.get_inputs()[0].name: x.numpy()}
                onnx_out = torch.from_numpy(session.run(None, feed)[0])
                ort_ms = median_ms(lambda: session.run(None, feed), torch.device('cpu'), warmup=1, reps=args.reps,
                                   budget_s=30)
        difference = (onnx_out - exact).abs().max().item()
        print(f'| `{name}` | {torch_ms:.0f} | {ort_ms:.0f} | {difference:.1e} ({exact.abs().max():.1f}) |', flush=True)


if __name__ == '__main__':
    main()
