"""The `timm-gcp` command (or `python hub/<command>.py`): publish, verify, convert and export (ONNX) models, and keep
the README's model table. A failure ends in one line on stderr (the Hugging Face token masked) and exit status 1."""
import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, List, Optional

from huggingface_hub import get_token

from .catalogue import check_registry, load_catalogue, recorded_sha256, render_table, replace_table
from .convert import SOURCES, convert_checkpoint
from .onnx import export_onnx
from .push import push_model
from .robustness import CORRUPTIONS, check_conditions, evaluate_robustness, process_state, resolve_model
from .robustness_report import display_name, fmt, update_card, write_robustness_report
from .verify import verify_folder, verify_repo

CATALOGUE = 'hub/catalogue.yaml'  # relative to the repository root, where the maintainer commands run


def _push(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    result = push_model(args.folder, args.repo_id, private=args.private, revision=args.revision,
                        commit_message=args.commit_message, max_retries=args.max_retries,
                        retry_delay=args.retry_delay)
    print(f'pushed {result.repo_id}@{result.revision}: commit {result.commit_oid}\n{result.commit_url}')
    print(''.join(f'  sha256 {sha}  {name}\n' for name, sha in sorted(result.sha256.items())), end='')


def _verify(args: argparse.Namespace) -> None:
    options = dict(data_dir=args.data_dir, tolerance=args.tolerance, batch_size=args.batch_size,
                   hflip_average=args.hflip_average)
    if Path(args.target).is_dir():
        if args.revision or args.catalogue:
            raise ValueError(f'{args.target} is a local folder: --revision and --catalogue apply to a repo id only')
        report = verify_folder(args.target, **options)
        print(f'{report.source}: files, config, weights and card are fit to publish')
    else:
        expected = recorded_sha256(load_catalogue(args.catalogue), args.target) if args.catalogue else None
        report = verify_repo(args.target, revision=args.revision, expected_sha256=expected, **options)
        print(f'{report.source}@{report.commit}: checksums match the push manifest and the Hub object ids')
    print(''.join(f'  sha256 {sha}  {name}\n' for name, sha in sorted(report.sha256.items())), end='')
    print(f"{'hf-hub' if report.commit else 'local-dir'}: load reproduces model.safetensors exactly")
    if report.measured:
        card = ' '.join(f'{key[:3]}-{key[3:]} {value:.2f}%' for key, value in report.card.items())
        print(f"re-evaluated on {report.measured['count']} images: top-1 {report.measured['top1']:.2f}% "
              f"top-5 {report.measured['top5']:.2f}% (card: {card})")


def _convert(args: argparse.Namespace) -> None:
    lines = Path(args.label_names).read_text().splitlines() if args.label_names else []
    label_names = [line.strip() for line in lines if line.strip()] or None
    # the command as the card shows it: files by name only, no local paths, no output folder
    words = ['timm-gcp', 'convert', Path(args.src).name, '--model', args.model, '--source', args.source]
    for flag, value in (('--meta-layer', args.meta_layer), ('--layer4-stride', args.layer4_stride),
                        ('--label-names', args.label_names and Path(args.label_names).name)):
        words += [flag, str(value)] if value else []
    out, model = convert_checkpoint(args.src, args.model, args.output, source=args.source,
                                    meta_layer=args.meta_layer, layer4_stride=args.layer4_stride,
                                    label_names=label_names, command=shlex.join(words))
    print(f'wrote {out} ({args.model}, meta-layer {model.meta_layer_name}, layer4 stride {model.layer4_stride}, '
          f'{model.num_classes} classes)')


def _robustness(args: argparse.Namespace) -> None:
    corruptions, severities = check_conditions(args.corruptions, args.severities)
    folder = resolve_model(args.model, args.pretrained)[1]
    if args.update_card and folder is None:
        raise ValueError(f'--update-card needs a local export folder or train.py run folder, not {args.model}')
    result = evaluate_robustness(args.model, args.data_dir, baseline=args.baseline, pretrained=args.pretrained,
                                 corruptions=corruptions, severities=severities, seed=args.seed,
                                 batch_size=args.batch_size, workers=args.workers, progress=args.progress)
    if not process_state().is_main_process:
        return
    written = write_robustness_report(result, args.output)
    for role, entry in result['results'].items():
        summary = entry.get('normalized') or entry['unnormalized']
        score = (f"mCE {fmt(summary['mce'])}, relative mCE {fmt(summary['relative_mce'])}" if summary['normalized']
                 else f"mean corruption error {fmt(summary['mean_corruption_error'])}% (unnormalised: no --baseline)")
        print(f"{role} {display_name(result[role])}: clean error {fmt(entry['errors']['clean'])}%, {score}")
    print(f"{result['images']} images x {1 + len(corruptions) * len(severities)} conditions at "
          f"{result['images_per_s']:.1f} images/s; wrote {', '.join(map(str, written))}")
    if args.update_card:
        print(f'updated {update_card(folder, result)}')


def _int_list(text: str) -> list:
    try:
        return [int(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, e.g. 1,3,5, got {text!r}') from None


def _onnx(args: argparse.Namespace) -> None:
    report = export_onnx(args.model, args.output, checkpoint=args.checkpoint, pretrained=args.pretrained,
                         num_classes=args.num_classes, data_dir=args.data_dir, batch_size=args.batch_size,
                         img_size=args.img_size, dynamo=args.dynamo, opset=args.opset, tolerance=args.tolerance)
    sample = f'{report.images} images of {args.data_dir}' if report.images else 'random input'
    print(f'wrote {report.path} ({args.model}, {report.exporter} exporter, dynamic batch)\n'
          f'on {sample}: onnxruntime vs PyTorch max |difference| {report.onnx_difference:.1e}; export mode vs '
          f'the exact model {report.export_mode_difference:.1e} (largest output {report.output_scale:.3g})')


def _model_table(args: argparse.Namespace) -> None:
    entries = load_catalogue(args.catalogue)
    check_registry(entries)
    if args.write:
        readme = Path(args.readme)
        readme.write_text(replace_table(readme.read_text(), render_table(entries)))
    else:
        print(render_table(entries), end='')


def build_parser() -> argparse.ArgumentParser:
    """The `timm-gcp` parser with its subcommands."""
    parser = argparse.ArgumentParser(prog='timm-gcp', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def add(name: str, run: Callable[[argparse.Namespace], None], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(run=run)
        return p

    p = add('push', _push, 'publish an exported model folder to the Hub in one commit (token: HF_TOKEN or '
                           '`hf auth login`, never printed)')
    p.add_argument('folder', help='exported model folder (model.safetensors, config.json, README.md)')
    p.add_argument('--repo-id', required=True, help='target repository, ORG/NAME')
    p.add_argument('--private', action='store_true', help='create the repository private')
    p.add_argument('--revision', default='main', help='branch to commit to, created if missing (default: %(default)s)')
    p.add_argument('--commit-message')
    p.add_argument('--max-retries', type=int, default=5, help='retries on 408/429/5xx/connection errors (%(default)s)')
    p.add_argument('--retry-delay', type=float, default=1.0, help='first backoff delay, doubling (%(default)s s)')

    p = add('verify', _verify, "check a published repo (checksums, Hub object ids) or a local export folder "
                               "(push's checks), bit-identical loading and, with --data-dir, the card's accuracy")
    p.add_argument('target', help='ORG/NAME, or an exported model folder')
    p.add_argument('--revision', help='branch, tag or commit of a repo (default: main)')
    p.add_argument('--data-dir', help='image folder (with val/<class>/...) to re-evaluate on')
    p.add_argument('--tolerance', type=float, default=0.5, help='allowed top-1/top-5 difference (%(default)s points)')
    p.add_argument('-b', '--batch-size', type=int, default=32, help='(default: %(default)s)')
    p.add_argument('--hflip-average', action='store_true', help='average logits with the flipped image')
    p.add_argument('--catalogue', nargs='?', const=CATALOGUE, help=f'also compare a repo with the sha256 the '
                   f'catalogue records (bare flag: {CATALOGUE})')

    p = add('convert', _convert, "convert an official GCP ResNet checkpoint into a folder that loads with "
                                 "timm.create_model('local-dir:DIR', pretrained=True)")
    p.add_argument('src', help='official checkpoint (.pth / .pth.tar)')
    p.add_argument('--model', required=True, help='timm-gcp architecture, e.g. gcp_resnet50')
    p.add_argument('--output', required=True, help='folder to write')
    p.add_argument('--source', choices=sorted(SOURCES), default='fast-mpn-cov',
                   help='which release: fixes the meta-layer and the layer4 stride (default: %(default)s)')
    p.add_argument('--meta-layer', help="override the source's meta-layer")
    p.add_argument('--layer4-stride', type=int, choices=(1, 2), help="override the source's stride")
    p.add_argument('--label-names', help='text file with one class name per line')

    p = add('robustness', _robustness, 'corruption robustness (Hendrycks & Dietterich): error under the 15 ImageNet-C '
                                       'corruptions x 5 severities of the validation images, CE/mCE against --baseline')
    p.add_argument('model', metavar='MODEL', help='export folder, train.py run folder, hf-hub:ORG/NAME, local-dir:PATH or a timm name '
                                 '(with --pretrained)')
    p.add_argument('--data-dir', required=True, metavar='DATA',
                   help='image folder: its val/ (or validation/) <class>/<image> files')
    p.add_argument('--baseline', metavar='MODEL', help='model normalising CE and mCE (same forms as MODEL); without: unnormalised errors')
    p.add_argument('--output', required=True, metavar='DIR', help='folder for robustness.json, robustness.md, robustness.png')
    p.add_argument('--pretrained', action='store_true', help="load a timm name's published weights")
    p.add_argument('--corruptions', type=lambda text: text.split(','),
                   help=f'comma-separated subset (default: all): {", ".join(CORRUPTIONS)}')
    p.add_argument('--severities', type=_int_list, help='comma-separated subset of 1-5 (default: all)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random corruptions (default: %(default)s)')
    p.add_argument('-b', '--batch-size', type=int, default=64, help='(default: %(default)s)')
    p.add_argument('-j', '--workers', type=int, default=min(4, os.cpu_count() or 1),
                   help='DataLoader processes corrupting images in parallel (default: %(default)s)')
    p.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    p.add_argument('--update-card', action='store_true', help="add the numbers to the export's model card README.md")

    p = add('onnx', _onnx, "export a timm or timm-gcp model to ONNX with timm's onnx_export (GCP heads in export "
                           "mode), then check the file with onnxruntime against the exact PyTorch model")
    p.add_argument('model', help='timm model name, local-dir:DIR (e.g. a train.py run\'s model/) or hf-hub:ORG/NAME')
    p.add_argument('output', help='ONNX file to write')
    p.add_argument('--checkpoint', help='weights to load on top (a train.py checkpoint, .safetensors or .pth)')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction,
                   help="the model's pretrained weights (default: unless --checkpoint, as timm's onnx_export.py)")
    p.add_argument('--num-classes', type=int, help="(default: the model's)")
    p.add_argument('--data-dir', help='image folder (its val/ or the folder itself) whose first images are the '
                                      'sample batch; default: random input')
    p.add_argument('-b', '--batch-size', type=int, default=8, help='sample images (default: %(default)s)')
    p.add_argument('--img-size', type=int, help="input resolution (default: the model's)")
    p.add_argument('--dynamo', action='store_true', help='the torch.export-based exporter (default: TorchScript)')
    p.add_argument('--opset', type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument('--tolerance', type=float, default=1e-4, help='allowed onnxruntime difference from PyTorch, '
                                                                  'relative to the largest output (%(default)s)')

    p = add('model-table', _model_table, "print the README's model table from the catalogue (checked against "
                                         "timm's registry), or rewrite it between its markers (--write)")
    p.add_argument('--catalogue', default=CATALOGUE, help='(default: %(default)s)')
    p.add_argument('--readme', default='README.md', help='(default: %(default)s)')
    p.add_argument('--write', action='store_true', help='replace the table in the README')
    return parser


def redact_token(text: str) -> str:
    """`text` with the active Hugging Face token masked (for error messages that echo requests)."""
    token = get_token()
    return text.replace(token, '***') if token else text


def main(argv: Optional[List[str]] = None, command: Optional[str] = None) -> int:
    """Run one subcommand (`command` first when given: the hub/*.py scripts); any error is one line on stderr with
    the token masked, and exit status 1."""
    args = build_parser().parse_args(([command] if command else []) + (sys.argv[1:] if argv is None else argv))
    try:
        args.run(args)
    except Exception as e:
        print(redact_token(f'timm-gcp {args.command}: {type(e).__name__}: {e}'), file=sys.stderr)
        return 1
    return 0
