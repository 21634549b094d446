"""Convert an official GCP ResNet checkpoint (fast-MPN-COV, DifferentiableSVD) into a timm-gcp model folder.

    python hub/convert.py SRC --model gcp_resnet50 --output DIR [--source fast-mpn-cov|svd-pade]

DIR gets model.safetensors, config.json and README.md: load it with
`timm.create_model('local-dir:DIR', pretrained=True)` after `import timm_gcp`, or publish it with hub/push.py.
"""
import argparse
import shlex
import sys
from pathlib import Path

from timm_gcp.hub.convert import SOURCES, convert_checkpoint


def _published_command(args: argparse.Namespace) -> str:
    """The conversion command as the model card shows it: files by name only, no local paths, no output folder."""
    words = ['python', 'hub/convert.py', Path(args.src).name, '--model', args.model, '--source', args.source]
    for flag, value in (('--meta-layer', args.meta_layer), ('--layer4-stride', args.layer4_stride),
                        ('--label-names', args.label_names and Path(args.label_names).name)):
        if value:
            words += [flag, str(value)]
    return shlex.join(words)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='official checkpoint (.pth / .pth.tar)')
    parser.add_argument('--model', required=True, help='timm-gcp architecture, e.g. gcp_resnet50')
    parser.add_argument('--output', required=True, help='folder to write')
    parser.add_argument('--source', choices=sorted(SOURCES), default='fast-mpn-cov',
                        help='which release: fixes the meta-layer and the layer4 stride (default fast-mpn-cov)')
    parser.add_argument('--meta-layer', default=None, help="override the source's meta-layer")
    parser.add_argument('--layer4-stride', type=int, choices=(1, 2), default=None,
                        help="override the source's layer4 stride")
    parser.add_argument('--label-names', default=None, help='text file with one class name per line')
    args = parser.parse_args(argv)
    label_names = None
    if args.label_names:
        with open(args.label_names) as f:
            label_names = [line.strip() for line in f if line.strip()]
    command = _published_command(args)
    try:
        out, model = convert_checkpoint(args.src, args.model, args.output, source=args.source,
                                        meta_layer=args.meta_layer, layer4_stride=args.layer4_stride,
                                        label_names=label_names, command=command)
    except Exception as e:
        print(f'convert failed: {type(e).__name__}: {e}', file=sys.stderr)
        return 1
    print(f'wrote {out} ({args.model}, meta-layer {model.meta_layer_name}, layer4 stride {model.layer4_stride}, '
          f'{model.num_classes} classes)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
