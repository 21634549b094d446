#!/usr/bin/env python3
"""Train or fine-tune any timm model (GCP or not) with accelerate.

    python train.py                                   # the bundled demo: small GCP model on data/pets-mini
    python train.py --recipe finegrained_448 --data-dir DATA --model gcp_resnet50 --backbone-weights resnet50.a1_in1k
    accelerate launch train.py --recipe imagenet_65ep --data-dir IMAGENET --model gcp_resnet50

Run directory (--output): metrics.json, curves.png, checkpoints/, logs/ (TensorBoard), model/ (Hub-ready).
"""
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import timm_gcp  # noqa: F401  (registers the GCP models with timm)
from timm_gcp.hub import export_model
from timm_gcp.training import (
    Checkpointer, StopSignal, TrainComponents, TrainState, check_compatible, check_meta_layer_switch, command_line,
    consolidate_counters, create_dataloader, create_datasets, create_train_model, create_transforms, evaluate,
    find_checkpoint, param_groups, parse_args, parse_meta_layer_switch, plain_model, plot_curves, read_train_state,
    set_meta_layer, summarize, train_one_epoch, write_json)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    # ---- config ------------------------------------------------------------------------------------------------------
    args = parse_args(argv)
    switch = parse_meta_layer_switch(args.switch_meta_layer)
    checkpoint = find_checkpoint(args.resume) if args.resume else None
    run_dir = _run_dir(args, checkpoint)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum_steps,
        log_with=None if args.log_with == 'none' else args.log_with, project_dir=str(run_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(args.seed)

    # ---- data (checked before anything is built) -------------------------------------------------------------------
    data = create_datasets(args.data_dir, args.dataset, args.train_split, args.val_split, seed=args.seed)
    num_classes = args.num_classes or len(data.class_names)
    if num_classes < len(data.class_names):
        raise ValueError(f'--num-classes {num_classes} is fewer than the {len(data.class_names)} classes in the data')

    # ---- model -------------------------------------------------------------------------------------------------------
    model = create_train_model(args.model, num_classes, args.pretrained, args.model_kwargs, args.drop,
                               args.drop_path, args.initial_checkpoint, args.backbone_weights)
    if switch:
        check_meta_layer_switch(model, switch[0])
    compat = json.loads(json.dumps({'model': args.model, 'num_classes': num_classes,
                                     'class_names': data.class_names, 'model_kwargs': args.model_kwargs}))
    saved = read_train_state(checkpoint) if checkpoint else TrainState(compat=compat)
    if checkpoint:
        check_compatible(saved.compat, compat, checkpoint)
    if saved.meta_layer:
        set_meta_layer([model], saved.meta_layer)
    data.train.transform, data.val.transform, data_config = create_transforms(model, vars(args))
    train_loader = create_dataloader(data.train, args.batch_size, True, args.workers, args.seed)
    val_loader = create_dataloader(data.val, args.validation_batch_size or args.batch_size, False, args.workers,
                               args.seed)
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        if args.batch_size % 2:
            raise ValueError(f'mixup/cutmix need an even --batch-size, got {args.batch_size}')
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        loss_fn = SoftTargetCrossEntropy()
    else:
        loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else torch.nn.CrossEntropyLoss()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # ---- optimizer and schedule (the timm scheduler is stepped here, once per update: never prepared) --------------
    optimizer = create_optimizer_v2(param_groups(model, args.weight_decay, args.head_lr_mult), opt=args.opt,
                                    lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if len(train_loader) == 0:
        raise ValueError(f'{len(data.train)} training images give no full batch of {args.batch_size} per process')
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    scheduler, _ = create_scheduler_v2(
        optimizer, args.sched, num_epochs=args.epochs - args.cooldown_epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)
    if scheduler is None:
        raise ValueError(f'--sched {args.sched!r} gives no timm scheduler; for a fixed lr use --sched step '
                         f'--decay-rate 1')
    accelerator.register_for_checkpointing(scheduler)
    ema = None
    if args.model_ema:
        ema = ModelEmaV3(plain_model(accelerator, model), decay=args.model_ema_decay)
        accelerator.register_for_checkpointing(ema)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    parts = TrainComponents(accelerator, model, optimizer, scheduler, loss_fn, mixup, ema, args.clip_grad,
                            args.channels_last)

    # ---- resume ------------------------------------------------------------------------------------------------------
    state = saved
    if checkpoint:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f'resumed from {checkpoint}: epoch {state.epoch}, batch {state.batches_done}, '
                          f'update {state.updates}')
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    checkpointer = Checkpointer(accelerator, run_dir, args.checkpoint_hist)
    command = command_line(argv)
    accelerator.init_trackers('logs', config=_scalar_config(args))

    # ---- training loop -----------------------------------------------------------------------------------------------
    with StopSignal() as stop:
        def on_update() -> bool:
            if args.log_interval and state.updates % args.log_interval == 0:
                accelerator.print(f'epoch {state.epoch} batch {state.batches_done}/{len(train_loader)} '
                                  f'update {state.updates} lr {_lr(optimizer):.3g}', flush=True)
            stopping = _any_process(accelerator, stop.received is not None)
            if stopping or (args.checkpoint_interval and state.updates % args.checkpoint_interval == 0):
                checkpointer.save(state)
            return stopping

        for epoch in range(state.epoch, args.epochs):
            if switch and epoch >= switch[1] and state.meta_layer != switch[0]:
                state.meta_layer = switch[0]
                set_meta_layer([plain_model(accelerator, model), ema.module if ema else None], switch[0])
                accelerator.print(f'epoch {epoch}: meta-layer switched to {switch[0]}')
            scheduler.step(epoch)
            data.train.set_epoch(epoch)
            train_loader.set_epoch(epoch)
            start = time.time()
            loader = train_loader
            if state.batches_done:
                loader = accelerator.skip_first_batches(train_loader, state.batches_done)
            train_one_epoch(parts, loader, state, len(train_loader), on_update, not args.no_progress)
            if _any_process(accelerator, stop.received is not None):
                _exit_interrupted(accelerator, run_dir, command, stop.received)

            # ---- evaluation ------------------------------------------------------------------------------------------
            consolidate_counters(accelerator, state)
            row = {'epoch': epoch, 'lr': _lr(optimizer), 'meta_layer': state.meta_layer,
                   'train_loss': state.train_loss_sum / max(state.train_samples, 1),
                   'train_images': state.train_samples, 'unreadable_train': state.unreadable_train}
            row.update(evaluate(accelerator, model, val_loader, args.flip_test, args.channels_last,
                                not args.no_progress))
            if ema is not None:
                row.update({f'raw_{k}': row[k] for k in ('val_loss', 'top1', 'top5')})
                row.update(evaluate(accelerator, ema.module, val_loader, args.flip_test, args.channels_last,
                                    not args.no_progress))
            row['epoch_time_s'] = round(time.time() - start, 2)
            state.history.append(row)
            state.epoch, state.batches_done = epoch + 1, 0
            state.train_loss_sum, state.train_samples, state.unreadable_train = 0., 0, 0
            checkpointer.save(state)
            _write_metrics(accelerator, run_dir, args, command, data, state)
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
            accelerator.print(f'epoch {epoch}: train loss {row["train_loss"]:.4f} | val loss {row["val_loss"]:.4f} '
                              f'top-1 {row["top1"]:.2f} top-5 {row["top5"]:.2f} ({row["val_images"]} images) | '
                              f'lr {row["lr"]:.3g} | {row["epoch_time_s"]:.1f}s', flush=True)

    # ---- export ------------------------------------------------------------------------------------------------------
    metrics = _write_metrics(accelerator, run_dir, args, command, data, state)
    final_model = ema.module if ema is not None else plain_model(accelerator, model)
    model_dir = run_dir / 'model'
    if accelerator.is_main_process:
        export_model(final_model, model_dir, label_names=data.class_names, metrics=_card_metrics(metrics),
                     recipe=_flags(args), command=command, dataset=_dataset_name(args), data_config=data_config)
        final, best = metrics['final'], metrics['best']
        accelerator.print(f'final (epoch {final["epoch"]}): top-1 {final["top1"]:.2f} top-5 {final["top5"]:.2f}; '
                          f'best (epoch {best["epoch"]}): top-1 {best["top1"]:.2f} top-5 {best["top5"]:.2f}')
        accelerator.print(f'Hub-ready model: {model_dir}')
        accelerator.print(f'publish it with: python hub/push.py {model_dir} --repo-id ORG/NAME')
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {'run_dir': run_dir, 'metrics': metrics, 'model': final_model, 'data_config': data_config}


def _run_dir(args, checkpoint: Optional[Path]) -> Path:
    """--output, else the resumed run's folder, else the first free runs/<recipe>-<model>[-N].

    Chosen before any process creates a folder, so every process picks the same one.
    """
    if args.output:
        run_dir = Path(args.output)
    elif checkpoint is not None:
        run_dir = checkpoint.parent.parent
    else:
        base = Path('runs') / f'{Path(args.recipe).stem}-{args.model}'.replace('/', '_').replace(':', '_')
        run_dir = next(p for p in (base.with_name(f'{base.name}-{n}') if n > 1 else base for n in range(1, 10 ** 6))
                       if not p.exists())
    if checkpoint is None and any((run_dir / 'checkpoints').glob('checkpoint-*')):
        raise FileExistsError(f'{run_dir} already holds a run: continue it with --resume {run_dir}, or choose '
                              f'another --output')
    return run_dir


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), 'sum') > 0)


def _lr(optimizer) -> float:
    group = optimizer.param_groups[0]
    return group['lr'] / group.get('lr_scale', 1.0)


def _scalar_config(args) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


def _flags(args) -> Dict[str, Any]:
    """The effective flags: `-c` with this file (paths made absolute) reproduces the run."""
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ('config', 'resume')}
    for key in ('data_dir', 'initial_checkpoint'):
        if flags.get(key) and Path(flags[key]).exists():
            flags[key] = str(Path(flags[key]).resolve())
    return flags


def _dataset_name(args) -> str:
    """The dataset as a model card names it: the HF dataset id, or the image folder's name."""
    return args.dataset[len('hfds/'):] if args.dataset.startswith('hfds/') else Path(args.data_dir).resolve().name


def _card_metrics(metrics: Dict[str, Any]) -> Dict[str, Any]:
    final, best = metrics['final'], metrics['best']
    return {'top1': final['top1'], 'top5': final['top5'], 'epochs': final['epoch'] + 1,
            'best_top1': best['top1'], 'best_top5': best['top5'], 'best_epoch': best['epoch']}


def _write_metrics(accelerator: Accelerator, run_dir: Path, args, command: str, data, state: TrainState) -> Dict:
    metrics = {'model': args.model, 'recipe': args.recipe, 'command': command,
               'dataset': args.dataset or str(args.data_dir), 'num_classes': len(data.class_names),
               'train_images': len(data.train), 'val_images': len(data.val),
               **summarize(state.history), 'history': state.history}
    if accelerator.is_main_process:
        write_json(metrics, run_dir / 'metrics.json')
        if state.history:
            plot_curves(state.history, run_dir / 'curves.png')
    return metrics


def _exit_interrupted(accelerator: Accelerator, run_dir: Path, command: str, signum: Optional[int]) -> None:
    accelerator.print(f'interrupted: checkpoint saved; continue with: {command} --resume {run_dir}', flush=True)
    accelerator.end_training()
    sys.exit(128 + (signum or 2))


if __name__ == '__main__':
    main()
