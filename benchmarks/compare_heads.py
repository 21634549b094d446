"""Side-by-side head study: one backbone and recipe trained by train.py with GAP and with each GCP head ("arm"), over
seeds, then one table (study.md, study.json) and the validation curves of every arm (curves.png).

    python benchmarks/compare_heads.py --data-dir DATA --model gcp_resnet18 --arms gap isqrt svd_pade dropcov \\
        --seeds 0 1 2 --output runs/heads [--robustness] [train.py flags, e.g. --recipe R --epochs 30 --img-size 112]
    accelerate launch benchmarks/compare_heads.py ...     # every arm trained with DDP on all processes

An arm is a preset (gap: global_pool='avg' on the same GCP backbone; dropcov: meta_layer='cov', dropcov=True; any
meta-layer name: meta_layer=NAME) or NAME:k=v,k=v with model kwargs (Python literals), e.g.
'isqrt3:meta_layer=isqrt,meta_layer_kwargs={"num_iter":3}'. The first arm is the reference of mCE. Each (arm, seed)
is its own train.py run folder OUTPUT/runs/ARM-sSEED: a re-run skips finished runs and resumes interrupted ones.
"""
import argparse
import ast
import importlib.util
import json
import math
import re
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState

import timm_gcp
from timm_gcp.hub.robustness import check_class_names, check_conditions, measure_errors, process_state, summarize
from timm_gcp.hub.robustness_report import fmt, markdown_table, write_atomic, write_text_atomic
from timm_gcp.training.data import create_eval_dataset
from timm_gcp.training.errors import exit_code_of

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {'gap': {'global_pool': 'avg'}, 'dropcov': {'meta_layer': 'cov', 'dropcov': True}}
ROBUSTNESS_SEED = 0  # every arm and seed sees the same corrupted images


def _train_module() -> Any:
    """train.py of this checkout (a script beside the package, not part of it)."""
    spec = importlib.util.spec_from_file_location('timm_gcp_train', ROOT / 'train.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_arm(text: str) -> Tuple[str, Dict[str, Any]]:
    """'isqrt' -> ('isqrt', {'meta_layer': 'isqrt'}); 'name:k=v,k=v' -> ('name', {k: v}) with Python literal values
    (bare words are strings)."""
    name, _, spec = text.partition(':')
    if not re.fullmatch(r'[A-Za-z0-9_.-]+', name):
        raise ValueError(f'arm {text!r}: the name must be letters, digits, _, . or - (it names run folders)')
    if not spec:
        if name in PRESETS:
            return name, dict(PRESETS[name])
        if name in timm_gcp.list_meta_layers():
            return name, {'meta_layer': name}
        raise ValueError(f'arm {name!r} is not a preset ({", ".join([*PRESETS, *timm_gcp.list_meta_layers()])}); '
                         f'give its model kwargs as {name}:k=v,k=v')
    try:
        call = ast.parse(f'arm({spec})', mode='eval').body
        if call.args or not call.keywords or any(k.arg is None for k in call.keywords):
            raise SyntaxError('expected k=v pairs')
        return name, {k.arg: k.value.id if isinstance(k.value, ast.Name) else ast.literal_eval(k.value)
                      for k in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise ValueError(f'arm {text!r}: expected NAME:k=v,k=v with Python literal values ({err})') from None


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    """The study's flags, and the train.py flags shared by every arm."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument('--data-dir', required=True, help='image folder with train/ and val/')
    parser.add_argument('--model', default='gcp_resnet18', help='GCP architecture every arm trains '
                                                                '(default: %(default)s)')
    parser.add_argument('--arms', nargs='+', default=['gap', 'isqrt'], help='arms, the first the reference '
                                                                            '(default: gap isqrt)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0], help='(default: 0)')
    parser.add_argument('--output', type=Path, required=True, help='study folder: runs/, robustness/, study.*')
    parser.add_argument('--reach', type=float, help='top-1 (%%) whose first epoch the table reports (default: the '
                                                    'lowest mean final top-1 of the arms, which every arm reaches)')
    parser.add_argument('--robustness', action='store_true', help='measure every run on the corrupted val images')
    parser.add_argument('--corruptions', type=lambda text: text.split(','), help='comma-separated subset')
    parser.add_argument('--severities', type=lambda text: [int(v) for v in text.split(',')],
                        help='comma-separated subset of 1-5')
    args, train_args = parser.parse_known_args(argv)
    reserved = sorted({a.split('=')[0] for a in train_args} & {'--seed', '--output', '--resume'})
    if reserved:
        parser.error(f'{", ".join(reserved)}: set per run by the study (use --seeds and --output)')
    arms = [parse_arm(text) for text in args.arms]
    if len({name for name, _ in arms}) != len(arms):
        parser.error(f'--arms names an arm twice: {args.arms}')
    args.arms = dict(arms)
    args.corruptions, args.severities = check_conditions(args.corruptions, args.severities)
    return args, train_args


def _train_argv(args: argparse.Namespace, train_args: List[str], kwargs: Dict[str, Any], seed: int,
                run_dir: Path) -> List[str]:
    """train.py's command line for one arm and seed: the shared flags, the arm's model kwargs over the shared ones."""
    shared, rest = _split_model_kwargs(train_args)
    merged = {**shared, **kwargs}
    argv = ['--data-dir', str(args.data_dir), '--model', args.model, '--seed', str(seed), '--output', str(run_dir),
            *rest]
    return argv + (['--model-kwargs', *[f'{k}={v!r}' for k, v in merged.items()]] if merged else [])


def _split_model_kwargs(train_args: List[str]) -> Tuple[Dict[str, Any], List[str]]:
    """(--model-kwargs given to the study, the other train.py flags)."""
    if '--model-kwargs' not in train_args:
        return {}, list(train_args)
    at = train_args.index('--model-kwargs')
    end = next((i for i in range(at + 1, len(train_args)) if train_args[i].startswith('-')), len(train_args))
    pairs = [item.split('=', 1) for item in train_args[at + 1:end]]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f'--model-kwargs expects k=v pairs, got {train_args[at + 1:end]}')
    return {k: _literal(v) for k, v in pairs}, train_args[:at] + train_args[end:]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check_study(args: argparse.Namespace, train_args: List[str]) -> None:
    """Record the study's settings in OUTPUT/study-settings.json; a re-run must keep them (arms and seeds may grow,
    an existing arm keeps its kwargs)."""
    path = args.output / 'study-settings.json'
    settings = {'data_dir': str(Path(args.data_dir).resolve()), 'model': args.model, 'train_args': train_args,
                'arms': args.arms}
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in ('data_dir', 'model', 'train_args') if old[k] != settings[k]]
        changed += [f'arm {name}' for name, kwargs in args.arms.items() if old['arms'].get(name, kwargs) != kwargs]
        if changed:
            raise ValueError(f'{args.output} holds a study with other settings ({", ".join(changed)}): choose another '
                             f'--output or repeat its settings ({path})')
        settings['arms'] = {**old['arms'], **args.arms}
    if process_state().is_main_process:
        write_text_atomic(path, json.dumps(settings, indent=1))


@contextmanager
def one_process_group() -> Iterator[None]:
    """Keep the processes' torch.distributed group for the whole study: train.py's `end_training` destroys it after
    each run, and torch does not reliably create the default group again in the same processes (gloo reconnects to
    the previous group's addresses); it is destroyed once, at the end."""
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    try:
        yield
    finally:
        PartialState.destroy_process_group = destroy
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _reset_accelerate() -> None:
    """train.py creates an Accelerator per run; its singletons are cleared between runs."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _run_arms(train: Any, args: argparse.Namespace, train_args: List[str], seed: int) -> None:
    """Train each arm for `seed` that has not finished: resume an interrupted run, start a missing one."""
    for arm, kwargs in args.arms.items():
        run_dir = args.output / 'runs' / f'{arm}-s{seed}'
        if (run_dir / 'model' / 'model.safetensors').is_file():
            process_state().print(f'{arm} seed {seed}: finished, skipped')
            continue
        argv = _train_argv(args, train_args, kwargs, seed, run_dir)
        if any((run_dir / 'checkpoints').glob('checkpoint-*')):
            argv += ['--resume', str(run_dir)]
        process_state().print(f'{arm} seed {seed}: python train.py {" ".join(argv)}', flush=True)
        try:
            train.main(argv)
        finally:
            _reset_accelerate()


def _load_export(run_dir: Path) -> torch.nn.Module:
    return timm.create_model(f'local-dir:{run_dir / "model"}', pretrained=True).eval().to(process_state().device)


def _measure_robustness(args: argparse.Namespace, train_cfg: Any, seed: int) -> None:
    """Corruption errors of the arms of `seed` not measured yet under these corruptions and severities, all arms on
    the same corrupted batches; OUTPUT/robustness/ARM-sSEED.json each."""
    wanted = {'corruptions': args.corruptions, 'severities': args.severities, 'seed': ROBUSTNESS_SEED}
    missing = []
    for arm in args.arms:
        path = args.output / 'robustness' / f'{arm}-s{seed}.json'
        if not path.is_file() or json.loads(path.read_text())['conditions'] != wanted:
            missing.append(arm)
    if not missing:
        return
    models = {arm: _load_export(args.output / 'runs' / f'{arm}-s{seed}') for arm in missing}
    val_dir = Path(args.data_dir) / train_cfg.val_split
    names = check_class_names(next(iter(models.values())), 'the model', create_eval_dataset(val_dir).class_names)
    dataset = create_eval_dataset(val_dir, names)
    dataset.seed = ROBUSTNESS_SEED
    measured = measure_errors(models, dataset, args.corruptions, args.severities,
                              batch_size=train_cfg.validation_batch_size or train_cfg.batch_size,
                              workers=train_cfg.workers, progress=train_cfg.progress)
    if process_state().is_main_process:
        for arm in missing:
            record = {'conditions': wanted, 'errors': measured['errors'][arm], 'images': measured['images'],
                      'images_per_s': measured['images_per_s']}
            write_text_atomic(args.output / 'robustness' / f'{arm}-s{seed}.json', json.dumps(record, indent=1))
    process_state().wait_for_everyone()


def head_parameters(model: torch.nn.Module) -> int:
    """Parameters of the pooling (a GCP head's reduction) and the classifier."""
    pool = getattr(model, 'global_pool', None)
    modules = [model.get_classifier()] + ([pool] if isinstance(pool, torch.nn.Module) else [])
    return sum(p.numel() for m in modules for p in m.parameters())


def _mean_std(values: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else None,
            'n': len(values)}


def _seed_row(run_dir: Path, reach: Optional[float]) -> Dict[str, Any]:
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    history = metrics['history']
    train_time = sum(row.get('train_time_s', row['epoch_time_s']) for row in history)
    return {'top1': [row['top1'] for row in history], 'final_top1': metrics['final']['top1'],
            'best_top1': metrics['best']['top1'], 'best_epoch': metrics['best']['epoch'] + 1,
            'reach_epoch': next((row['epoch'] + 1 for row in history if reach is not None and row['top1'] is not None
                                 and row['top1'] >= reach), None),
            'train_time_s': train_time,
            'images_per_s': sum(row['train_images'] for row in history) / train_time if train_time else None}


def summarize_study(args: argparse.Namespace) -> Dict[str, Any]:
    """Per arm: every finished seed's numbers and their mean and std; the reach threshold; mCE against the first arm
    of the same seed."""
    finished = {arm: [s for s in args.seeds if (args.output / 'runs' / f'{arm}-s{s}' / 'model').is_dir()]
                for arm in args.arms}
    finals = {arm: statistics.fmean(json.loads((args.output / 'runs' / f'{arm}-s{s}' / 'metrics.json').read_text())
                                    ['final']['top1'] for s in seeds) for arm, seeds in finished.items() if seeds}
    reach = args.reach if args.reach is not None else min(finals.values(), default=None)
    reference = next(iter(args.arms))
    arms = []
    for arm, kwargs in args.arms.items():
        seeds = {s: _seed_row(args.output / 'runs' / f'{arm}-s{s}', reach) for s in finished[arm]}
        for seed, row in seeds.items():
            path = args.output / 'robustness' / f'{arm}-s{seed}.json'
            reference_path = args.output / 'robustness' / f'{reference}-s{seed}.json'
            if args.robustness and path.is_file():
                errors = json.loads(path.read_text())['errors']
                own = summarize(errors)
                row.update(clean_error=errors['clean'], mean_corruption_error=own['mean_corruption_error'])
                if reference_path.is_file():
                    versus = summarize(errors, json.loads(reference_path.read_text())['errors'])
                    row.update(mce=versus['mce'], relative_mce=versus['relative_mce'])
        head = head_parameters(_load_export(args.output / 'runs' / f'{arm}-s{finished[arm][0]}')) if seeds else None
        keys = ('final_top1', 'best_top1', 'reach_epoch', 'train_time_s', 'images_per_s', 'clean_error',
                'mean_corruption_error', 'mce', 'relative_mce')
        arms.append({'arm': arm, 'model_kwargs': kwargs, 'head_parameters': head, 'seeds': seeds,
                     'summary': {k: _mean_std([row.get(k) for row in seeds.values()]) for k in keys}})
    return {'model': args.model, 'data': Path(args.data_dir).resolve().name, 'reference_arm': reference,
            'reach_top1': reach, 'robustness': {'corruptions': args.corruptions, 'severities': args.severities,
                                                'seed': ROBUSTNESS_SEED} if args.robustness else None, 'arms': arms}


def _cell(stat: Optional[Dict[str, float]], digits: int = 1, total: Optional[int] = None) -> str:
    if stat is None:
        return '—'
    text = fmt(stat['mean'], digits) + (f' ± {fmt(stat["std"], digits)}' if stat['std'] is not None else '')
    return text + (f' ({stat["n"]}/{total})' if total is not None and stat['n'] < total else '')


def study_markdown(study: Dict[str, Any], command: str) -> str:
    """The table: mean ± std over seeds (sample std), the reach epoch over the seeds that reached it."""
    header = ['arm', 'model kwargs', 'seeds', 'final top-1', 'best top-1', f'epoch reaching {fmt(study["reach_top1"])}%',
              'train time (s)', 'train img/s', 'head params']
    robust = study['robustness'] is not None
    if robust:
        header += ['clean error', 'corruption error', f'mCE ({study["reference_arm"]} = 100)', 'relative mCE']
    rows = []
    for arm in study['arms']:
        s, n = arm['summary'], len(arm['seeds'])
        row = [arm['arm'], '`' + json.dumps(arm['model_kwargs']) + '`', str(n), _cell(s['final_top1'], 2),
               _cell(s['best_top1'], 2), _cell(s['reach_epoch'], 1, n), _cell(s['train_time_s'], 0),
               _cell(s['images_per_s'], 1), f'{arm["head_parameters"]:,}' if arm['head_parameters'] else '—']
        if robust:
            row += [_cell(s['clean_error']), _cell(s['mean_corruption_error']), _cell(s['mce']),
                    _cell(s['relative_mce'])]
        rows.append(row)
    notes = [f'# Head study: `{study["model"]}` on `{study["data"]}`', f'`{command}`',
             markdown_table(header, rows),
             'Top-1 and errors in %, mean ± sample std over seeds; "epoch reaching": the first epoch (from 1) whose '
             'validation top-1 reaches the threshold, over the seeds that reach it (k/n when not all do); train time: '
             'the training passes of all epochs (no evaluation); head params: pooling + classifier.']
    if robust:
        notes.append(f'Corruption error: the mean over {len(study["robustness"]["corruptions"])} corruptions x '
                     f'severities {study["robustness"]["severities"]} (unnormalised); mCE and relative mCE '
                     f'(Hendrycks & Dietterich) against the `{study["reference_arm"]}` run of the same seed.')
    return '\n\n'.join(notes) + '\n'


def plot_curves(study: Dict[str, Any], path: Path) -> None:
    """Validation top-1 per epoch of every arm: the mean over seeds, a band of ± one std."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in study['arms']:
        curves = [row['top1'] for row in arm['seeds'].values()]
        if not curves:
            continue
        epochs = min(len(c) for c in curves)
        mean = [statistics.fmean(c[e] for c in curves) for e in range(epochs)]
        std = [statistics.stdev(c[e] for c in curves) if len(curves) > 1 else 0. for e in range(epochs)]
        x = list(range(1, epochs + 1))
        ax.plot(x, mean, marker='o', ms=3, label=f'{arm["arm"]} ({len(curves)} seeds)')
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_xlabel('epoch')
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title(f'{study["model"]} on {study["data"]}')
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format='png'))
    plt.close(fig)


def run(args: argparse.Namespace, train_args: List[str], command: str) -> Dict[str, Any]:
    """Train every (arm, seed), measure robustness, write study.md, study.json and curves.png."""
    train = _train_module()
    first = next(iter(args.arms.values()))
    train_cfg = train.parse_config(_train_argv(args, train_args, first, args.seeds[0], args.output / 'runs' / 'x'))
    for kwargs in args.arms.values():  # every arm's flags are checked before the first run
        train.parse_config(_train_argv(args, train_args, kwargs, args.seeds[0], args.output / 'runs' / 'x'))
    if args.robustness and train_cfg.dataset:
        raise ValueError('--robustness reads image folders (--data-dir), not --dataset')
    _check_study(args, train_args)
    with one_process_group():
        for seed in args.seeds:
            _run_arms(train, args, train_args, seed)
            if args.robustness:
                _measure_robustness(args, train_cfg, seed)
    study = summarize_study(args)
    if process_state().is_main_process:
        text = study_markdown(study, command)
        write_text_atomic(args.output / 'study.md', text)
        try:
            plot_curves(study, args.output / 'curves.png')
        except ImportError:
            print('matplotlib is not installed: no curves.png (pip install "timm-gcp[bench]")')
        write_text_atomic(args.output / 'study.json', json.dumps(study, indent=1, allow_nan=False))
        print(text)
    return study


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: a user error is one line on stderr and train.py's exit code for its kind."""
    argv = sys.argv[1:] if argv is None else argv
    args, train_args = parse_args(argv)
    command = ' '.join(['python', 'benchmarks/compare_heads.py', *argv])
    try:
        run(args, train_args, command)
    except Exception as err:
        code = exit_code_of(err) or (2 if isinstance(err, (ValueError, OSError, ImportError)) else None)
        if code is None:
            raise
        print(f'compare_heads.py: error: {err}', file=sys.stderr)
        return code
    return 0


if __name__ == '__main__':
    sys.exit(main())
