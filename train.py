#!/usr/bin/env python3
"""Train or fine-tune any timm model (GCP or not) with accelerate.

    python train.py                                   # the bundled demo: small GCP model on data/pets-mini
    python train.py --recipe finegrained_448 --data-dir DATA --model gcp_resnet50 --backbone-weights resnet50.a1_in1k
    accelerate launch train.py --recipe imagenet_65ep --data-dir IMAGENET --model gcp_resnet50

Run directory (--output): metrics.json, summary.csv (timm's per-epoch summary), checkpoints/, logs/ (TensorBoard),
model/ (Hub-ready).
User errors end with one line on stderr and an exit code per kind (timm_gcp.training.errors); --debug (or
TIMM_GCP_DEBUG=1) shows their traceback.
"""
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from timm.models import get_pretrained_cfg
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3, trim_summary, update_summary

import timm_gcp  # noqa: F401  (registers the GCP models with timm)
from timm_gcp.training import (
    DEFAULT_RECIPE, EXIT_DATA, EXIT_USAGE, Checkpointer, CheckpointError, StopSignal, TrainComponents, TrainState,
    TrainingDiverged, base_lr, check_compatible, check_input_size, check_meta_layer_switch, command_line,
    consolidate_counters, create_dataloader, create_datasets, create_loss, create_train_model,
    create_train_scheduler, create_transforms, dataset_name, evaluate, exit_code_of, finite_or_none, load_ema,
    metrics_for_card, nonfinite_tensors, own_run_dir, param_groups, parse_args, parse_meta_layer_switch,
    public_command, public_flags, resolve_run_dir, scalar_flags, select_checkpoint, set_meta_layer, train_one_epoch,
    user_errors, write_run_metrics)

if TYPE_CHECKING:
    from accelerate import Accelerator


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    # ---- config ------------------------------------------------------------------------------------------------------
    with user_errors(EXIT_USAGE):
        args = parse_args(argv)
        switch = parse_meta_layer_switch(args.switch_meta_layer)
    from accelerate import Accelerator, DataLoaderConfiguration  # imported once the flags parse: `--help` stays quick
    checkpoint, state, skipped = select_checkpoint(args.resume) if args.resume else (None, None, [])
    run_dir = resolve_run_dir(args, checkpoint)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum_steps,
        log_with=None if args.log_with == 'none' else args.log_with, project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    for note in skipped:
        accelerator.print(note, flush=True)
    if skipped:
        accelerator.print(f'resuming from the older intact checkpoint {checkpoint}', flush=True)
    with own_run_dir(accelerator, run_dir, resuming=checkpoint is not None):
        return _train(args, argv, switch, accelerator, run_dir, checkpoint, state)


def _train(args: Any, argv: Optional[List[str]], switch: Any, accelerator: 'Accelerator', run_dir: Path,
           checkpoint: Optional[Path], state: Optional[TrainState]) -> Dict[str, Any]:
    from accelerate.utils import set_seed
    from timm_gcp.hub import export_model
    set_seed(args.seed)
    accelerator.print(f'recipe: {args.recipe}' + (' (the bundled demo)' if args.recipe == DEFAULT_RECIPE else ''),
                      flush=True)

    # ---- data (checked before anything is built) -------------------------------------------------------------------
    with user_errors(EXIT_DATA):
        data = create_datasets(args.data_dir, args.dataset, args.train_split, args.val_split, seed=args.seed,
                               max_image_pixels=args.max_image_pixels)
    with user_errors(EXIT_USAGE):
        num_classes = args.num_classes or len(data.class_names)
        if num_classes < len(data.class_names):
            raise ValueError(f'--num-classes {num_classes} is fewer than the {len(data.class_names)} classes in the '
                             f'data')

        # ---- model, transforms, loaders, loss (every flag checked before any file is written) ------------------------
        model = create_train_model(args.model, num_classes, args.pretrained, args.model_kwargs, args.drop,
                                   args.drop_path, args.initial_checkpoint, args.backbone_weights)
        if switch:
            check_meta_layer_switch(model, switch[0])
        data.train.transform, data.val.transform, data_config = create_transforms(model, vars(args))
        check_input_size(model, data_config['input_size'], args.model)
        train_loader = create_dataloader(data.train, args.batch_size, True, args.workers, args.seed)
        val_loader = create_dataloader(data.val, args.validation_batch_size or args.batch_size, False, args.workers,
                                       args.seed)
        loss_fn, mixup = create_loss(num_classes, args.smoothing, args.batch_size, mixup_alpha=args.mixup,
                                     cutmix_alpha=args.cutmix, prob=args.mixup_prob, switch_prob=args.mixup_switch_prob,
                                     mode=args.mixup_mode)
    compat = json.loads(json.dumps({  # what the saved position means, as a checkpoint holds it
        'model': args.model, 'num_classes': num_classes, 'class_names': data.class_names,
        'model_kwargs': args.model_kwargs, 'train_images': len(data.train), 'batch_size': args.batch_size,
        'num_processes': accelerator.num_processes, 'grad_accum_steps': args.grad_accum_steps}))
    command = command_line(argv)
    if checkpoint:
        check_compatible(state.compat, compat, checkpoint)
        if state.epoch > args.epochs:
            raise CheckpointError(f'checkpoint {checkpoint} is at epoch {state.epoch}, past --epochs {args.epochs}')
        if not accelerator.is_main_process:
            state.reset_counters()  # the checkpoint holds the sum over processes: the main process keeps it
        command = state.command or command  # the command that started the run
    else:
        state = TrainState(compat=compat, command=command)
    if state.meta_layer:
        set_meta_layer([model], state.meta_layer)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # ---- optimizer and schedule (the timm scheduler is stepped here, once per update: never prepared) --------------
    with user_errors(EXIT_USAGE):
        optimizer = create_optimizer_v2(param_groups(model, args.weight_decay, args.head_lr_mult), opt=args.opt,
                                        lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
        if len(train_loader) == 0:
            raise ValueError(f'{len(data.train)} training images give no full batch of {args.batch_size} per process')
        scheduler = create_train_scheduler(optimizer, args, math.ceil(len(train_loader) / args.grad_accum_steps))
    bare = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema = ModelEmaV3(bare, decay=args.model_ema_decay) if args.model_ema else None
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    parts = TrainComponents(accelerator, model, optimizer, scheduler, loss_fn, mixup, ema, args.clip_grad,
                            args.channels_last, args.max_nonfinite_updates)

    # ---- resume (every file was validated: nothing below unpickles more than tensors) ----------------------------
    if checkpoint:
        accelerator.load_state(str(checkpoint))
        if ema is not None:
            load_ema(ema, checkpoint)
        scheduler.step_update(num_updates=state.updates)  # rebuilt from the flags: a longer --epochs applies
        accelerator.print(f'resumed from {checkpoint}: epoch {state.epoch}, batch {state.batches_done}, '
                          f'update {state.updates}')
    checkpointer = Checkpointer(accelerator, run_dir, args.checkpoint_hist, ema, last=checkpoint)
    accelerator.init_trackers('logs', config=scalar_flags(args))
    run_info = {'model': args.model, 'recipe': args.recipe, 'command': command,
                'dataset': args.dataset or str(args.data_dir), 'num_classes': len(data.class_names),
                'train_images': len(data.train), 'val_images': len(data.val)}
    metrics = write_run_metrics(accelerator, run_dir, run_info, state.history)
    summary_csv = run_dir / 'summary.csv'
    if accelerator.is_main_process:
        trim_summary(str(summary_csv), state.epoch)  # rows past the resumed checkpoint (timm's resume rule)

    # ---- training loop -----------------------------------------------------------------------------------------------
    with StopSignal() as stop:
        def on_update() -> bool:
            if args.log_interval and state.updates % args.log_interval == 0:
                accelerator.print(f'epoch {state.epoch} batch {state.batches_done}/{len(train_loader)} '
                                  f'update {state.updates} lr {base_lr(optimizer):.3g}', flush=True)
            stopping = stop.received_anywhere(accelerator)
            if stopping or (args.checkpoint_interval and state.updates % args.checkpoint_interval == 0):
                _check_finite(bare, f'at epoch {state.epoch} update {state.updates}')
                checkpointer.save(state)
            return stopping

        try:
            for epoch in range(state.epoch, args.epochs):
                if switch and epoch >= switch[1] and state.meta_layer != switch[0]:
                    state.meta_layer = switch[0]
                    set_meta_layer([bare, ema.module if ema else None], switch[0])
                    accelerator.print(f'epoch {epoch}: meta-layer switched to {switch[0]}')
                scheduler.step(epoch)
                data.train.set_epoch(epoch)
                train_loader.set_epoch(epoch)
                start = time.time()
                loader = train_loader
                if state.batches_done:
                    loader = accelerator.skip_first_batches(train_loader, state.batches_done)
                train_one_epoch(parts, loader, state, len(train_loader), on_update, not args.no_progress)
                if stop.received_anywhere(accelerator):
                    _exit_interrupted(accelerator, run_dir, command, stop.received)
                _check_finite(bare, f'at the end of epoch {epoch} update {state.updates}')

                # ---- evaluation --------------------------------------------------------------------------------------
                consolidate_counters(accelerator, state)
                row = {'epoch': epoch, 'lr': base_lr(optimizer),
                       'meta_layer': state.meta_layer or getattr(bare, 'meta_layer_name', None),
                       'train_loss': state.train_loss_sum / max(state.train_samples, 1),
                       'train_images': state.train_samples, 'unreadable_train': state.unreadable_train}
                row.update(evaluate(model, val_loader, accelerator, args.flip_test, args.channels_last,
                                    not args.no_progress))
                if ema is not None:
                    row.update({f'raw_{k}': row[k] for k in ('val_loss', 'top1', 'top5')})
                    row.update(evaluate(ema.module, val_loader, accelerator, args.flip_test, args.channels_last,
                                        not args.no_progress))
                row['epoch_time_s'] = round(time.time() - start, 2)
                state.history.append(finite_or_none(row))
                state.epoch, state.batches_done = epoch + 1, 0
                state.reset_counters()
                checkpointer.save(state)
                metrics = write_run_metrics(accelerator, run_dir, run_info, state.history)
                if accelerator.is_main_process:
                    update_summary(epoch, {'loss': row['train_loss']},
                                   {'loss': row['val_loss'], 'top1': row['top1'], 'top5': row['top5']},
                                   str(summary_csv), lr=row['lr'])
                accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
                accelerator.print(f'epoch {epoch}: train loss {row["train_loss"]:.4f} | val loss '
                                  f'{row["val_loss"]:.4f} top-1 {row["top1"]:.2f} top-5 {row["top5"]:.2f} '
                                  f'({row["val_images"]} images) | lr {row["lr"]:.3g} | '
                                  f'{row["epoch_time_s"]:.1f}s', flush=True)
        except TrainingDiverged as err:
            accelerator.end_training()
            raise TrainingDiverged(f'{err}; last good checkpoint: '
                                   f'{checkpointer.last or "none (try a lower --lr or --clip-grad)"}') from None

    # ---- export ------------------------------------------------------------------------------------------------------
    final_model = ema.module if ema is not None else bare
    model_dir = run_dir / 'model'
    _check_finite(final_model, 'in the final weights')
    if accelerator.is_main_process:
        export_model(final_model, model_dir, label_names=data.class_names, metrics=metrics_for_card(metrics),
                     recipe=public_flags(args), command=public_command(command), dataset=dataset_name(args),
                     data_config=data_config, base_model=_base_model(args, bare))
        final, best = metrics['final'], metrics['best']
        accelerator.print(f'final (epoch {final["epoch"]}): top-1 {final["top1"]:.2f} top-5 {final["top5"]:.2f}; '
                          f'best (epoch {best["epoch"]}): top-1 {best["top1"]:.2f} top-5 {best["top5"]:.2f}')
        accelerator.print(f'Hub-ready model: {model_dir}')
        accelerator.print(f'publish it with: timm-gcp push {model_dir} --repo-id ORG/NAME')
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {'run_dir': run_dir, 'metrics': metrics, 'model': final_model, 'data_config': data_config}


def _check_finite(model: torch.nn.Module, where: str) -> None:
    bad = nonfinite_tensors(model)
    if bad:
        raise TrainingDiverged(f'training diverged: {len(bad)} tensors non-finite {where} '
                               f'({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})')


def _base_model(args: Any, model: torch.nn.Module) -> Optional[str]:
    """The Hub repo of the weights the run started from (None: from scratch or a local file)."""
    if args.pretrained:
        return getattr(model, 'pretrained_cfg', {}).get('hf_hub_id')
    source = args.backbone_weights or ''
    if source.startswith('hf-hub:'):
        return source[len('hf-hub:'):]
    if source and not Path(source).exists():  # a timm name, e.g. resnet50.a1_in1k
        return getattr(get_pretrained_cfg(source), 'hf_hub_id', None)
    return None


def _exit_interrupted(accelerator: 'Accelerator', run_dir: Path, command: str, signum: Optional[int]) -> None:
    accelerator.end_training()
    accelerator.print(f'interrupted: checkpoint saved; continue with: {command} --resume {run_dir}', flush=True)
    sys.exit(128 + (signum or 2))


def cli(argv: Optional[List[str]] = None) -> int:
    """main() for the command line: a user error becomes one line on stderr and its exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = '--debug' in args or os.environ.get('TIMM_GCP_DEBUG', '') not in ('', '0')
    try:
        main(argv)
    except KeyboardInterrupt:  # before the training loop handles signals
        print('train.py: interrupted', file=sys.stderr)
        return 128 + 2
    except Exception as err:
        code = exit_code_of(err)
        if code is None or debug:
            raise
        print(f'train.py: error: {err}', file=sys.stderr)
        return code
    return 0


if __name__ == '__main__':
    sys.exit(cli())
