"""Benchmark suite: every meta-layer and RiemGCP map (forward, forward+backward, memory kept for the backward) and
whole-network training against in-run baselines.

    python benchmarks/run.py [--device cpu|cuda] [--quick] [--meta-layers a,b] [--sections s,t]
                             [--batches 64 --dims 256 --positions 196] [--output DIR]

Results go to benchmarks/results/local/<device> (untracked) unless --output names another folder.
"""
import argparse
import platform
import sys
import time
from pathlib import Path

import timm
import torch

import timm_gcp
from timm_gcp.ops import auto_eigh_backend

import report
from meta_layer_bench import KEY_CONFIG, compiled_isqrt, grid, key_config_baselines, riemannian_maps
from network_bench import training_throughput
from timing import spin_up

FULL = dict(batches=[32, 64, 128, 256], dims=[128, 256], positions=[49, 196, 784], warmup=3, reps=10,
            key=KEY_CONFIG, arch='resnet50', net_batch=128, image_size=224, net_warmup=10, net_reps=15)
QUICK = dict(batches=[4], dims=[16], positions=[49], warmup=1, reps=3, key={'batch': 4, 'dim': 32, 'positions': 49},
             arch='resnet18', net_batch=2, image_size=64, net_warmup=1, net_reps=2)

# whole-network extras on CUDA: (meta-layer, options, slow): MPN-COV on torch.linalg.eigh, the compiled iSQRT, and an
# ICCV'21 layer in float32 instead of its float64 default
CUDA_VARIANTS = [('eig', {'eigh_backend': 'torch'}, True), ('isqrt', {'compile': True}, False),
                 ('svd_pade', {'float64': False}, False)]
SECTIONS = ('key_config', 'grid', 'riemannian', 'network', 'compiled')  # 'compiled' (CUDA graphs): CUDA only
GRID_SIZES = ('batches', 'dims', 'positions')
LOCAL_RESULTS = Path(__file__).resolve().parent / 'results' / 'local'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--quick', action='store_true', help='tiny sizes and few repetitions (seconds on a CPU)')
    parser.add_argument('--meta-layers', default=None,
                        help=f'comma-separated subset of {",".join(timm_gcp.list_meta_layers())} (default: all)')
    parser.add_argument('--arch', default=None, help='network compared: timm ARCH (GAP) against gcp_ARCH '
                                                     '(default resnet50; resnet18 with --quick)')
    for size in GRID_SIZES:
        parser.add_argument(f'--{size}', default=None, type=lambda text: [int(v) for v in text.split(',')],
                            help=f'comma-separated grid {size} instead of the preset ones')
    parser.add_argument('--sections', default=None,
                        help=f'comma-separated subset of {",".join(SECTIONS)} (default: all that the device runs)')
    parser.add_argument('--output', type=Path, default=None,
                        help='folder for results.json, .md and .png (default: benchmarks/results/local/<device>, '
                             'untracked, so committed results are never overwritten by accident)')
    args = parser.parse_args(argv)
    args.output = args.output or LOCAL_RESULTS / args.device
    args.sections = args.sections.split(',') if args.sections else list(SECTIONS)
    unknown_sections = sorted(set(args.sections) - set(SECTIONS))
    if unknown_sections:
        parser.error(f'unknown sections {unknown_sections}; known: {list(SECTIONS)}')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    known = timm_gcp.list_meta_layers()
    args.meta_layers = args.meta_layers.split(',') if args.meta_layers else known
    unknown = sorted(set(args.meta_layers) - set(known))
    if unknown:
        parser.error(f'unknown meta-layers {unknown}; known: {known}')
    if 'isqrt' not in args.meta_layers:
        args.meta_layers.insert(0, 'isqrt')  # the in-run baseline every ratio refers to
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = dict(QUICK if args.quick else FULL)
    cfg['arch'] = args.arch or cfg['arch']
    cfg.update({size: getattr(args, size) for size in GRID_SIZES if getattr(args, size)})
    cuda = device.type == 'cuda'
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the meta-layers' float32 is float32
        spin_up(device)
    started = time.time()
    result = {
        'environment': {
            'device_name': torch.cuda.get_device_name(device) if cuda else
            f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)',
            'device_type': device.type, 'torch': torch.__version__, 'timm': timm.__version__,
            'cuda': torch.version.cuda,
            'eigh_backend': auto_eigh_backend(device), 'python': sys.version.split()[0]},
        'settings': {**cfg, 'quick': args.quick, 'meta_layers': args.meta_layers},
    }
    eigh_backends = ['cusolver', 'torch'] if cuda else ['torch']
    sections = {
        'key_config': lambda: key_config_baselines(args.meta_layers, device, eigh_backends, cfg['warmup'],
                                                   cfg['reps'], **cfg['key']),
        'grid': lambda: grid(args.meta_layers, cfg['batches'], cfg['dims'], cfg['positions'], device,
                             cfg['warmup'], cfg['reps']),
        'riemannian': lambda: riemannian_maps(device, cfg['batches'], cfg['dims'], cfg['positions'], cfg['warmup'],
                                              cfg['reps']),
        'network': lambda: training_throughput(cfg['arch'], args.meta_layers, device, cfg['net_batch'],
                                               cfg['image_size'], cfg['net_warmup'], cfg['net_reps'],
                                               variants=CUDA_VARIANTS if cuda else []),
    }
    if cuda:  # last: compilation takes a while, and everything before is already written
        sections['compiled'] = lambda: compiled_isqrt(device, cfg['warmup'], cfg['reps'], **cfg['key'])
    sections = {name: measure for name, measure in sections.items() if name in args.sections}
    for name, measure in sections.items():
        print(f'[benchmarks] {name} ({time.time() - started:.0f} s)', flush=True)
        result[name] = measure()
        result['elapsed_s'] = time.time() - started
        report.write(result, args.output)
    print(report.markdown(result).split('## Every meta-layer')[0], flush=True)
    print(f'[benchmarks] wrote {args.output} in {result["elapsed_s"]:.0f} s', flush=True)


if __name__ == '__main__':
    main()
