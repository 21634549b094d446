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
from timm.utils import ModelEmaV3

import timm_gcp  # noqa: F401  (registers the GCP models with timm)
from timm_gcp.hub import export_model
from timm_gcp.training import (
    Checkpointer, StopSignal, TrainComponents, TrainState, base_lr, card_metrics, check_compatible,
    check_meta_layer_switch, command_line, consolidate_counters, create_dataloader, create_datasets, create_loss,
    create_train_model, create_train_optimizer, create_train_scheduler, create_transforms, dataset_name,
    effective_flags, evaluate, find_checkpoint, parse_args, parse_meta_layer_switch, plain_model, read_train_state,
    resolve_run_dir, scalar_flags, set_meta_layer, train_one_epoch, write_run_metrics)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    # ---- config ------------------------------------------------------------------------------------------------------
    args = parse_args(argv)
    switch = parse_meta_layer_switch(args.switch_meta_layer)
    checkpoint = find_checkpoint(args.resume) if args.resume else None
    run_dir = resolve_run_dir(args, checkpoint)
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
    compat = json.loads(json.dumps({'model': args.model, 'num_classes': num_classes,  # as a checkpoint holds it
                                     'class_names': data.class_names, 'model_kwargs': args.model_kwargs}))
    state = read_train_state(checkpoint, accelerator) if checkpoint else TrainState(compat=compat)
    if checkpoint:
        check_compatible(state.compat, compat, checkpoint)
    if state.meta_layer:
        set_meta_layer([model], state.meta_layer)
    data.train.transform, data.val.transform, data_config = create_transforms(model, vars(args))
    train_loader = create_dataloader(data.train, args.batch_size, True, args.workers, args.seed)
    val_loader = create_dataloader(data.val, args.validation_batch_size or args.batch_size, False, args.workers,
                                   args.seed)
    loss_fn, mixup = create_loss(args, num_classes)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # ---- optimizer and schedule (the timm scheduler is stepped here, once per update: never prepared) --------------
    optimizer = create_train_optimizer(model, args)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if len(train_loader) == 0:
        raise ValueError(f'{len(data.train)} training images give no full batch of {args.batch_size} per process')
    scheduler = create_train_scheduler(optimizer, args, math.ceil(len(train_loader) / args.grad_accum_steps))
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
    if checkpoint:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f'resumed from {checkpoint}: epoch {state.epoch}, batch {state.batches_done}, '
                          f'update {state.updates}')
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    checkpointer = Checkpointer(accelerator, run_dir, args.checkpoint_hist)
    command = command_line(argv)
    accelerator.init_trackers('logs', config=scalar_flags(args))
    metrics = write_run_metrics(accelerator, run_dir, args, command, data, state.history)

    # ---- training loop -----------------------------------------------------------------------------------------------
    with StopSignal() as stop:
        def on_update() -> bool:
            if args.log_interval and state.updates % args.log_interval == 0:
                accelerator.print(f'epoch {state.epoch} batch {state.batches_done}/{len(train_loader)} '
                                  f'update {state.updates} lr {base_lr(optimizer):.3g}', flush=True)
            stopping = stop.received_anywhere(accelerator)
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
            if stop.received_anywhere(accelerator):
                _exit_interrupted(accelerator, run_dir, command, stop.received)

            # ---- evaluation ------------------------------------------------------------------------------------------
            consolidate_counters(accelerator, state)
            row = {'epoch': epoch, 'lr': base_lr(optimizer), 'meta_layer': state.meta_layer,
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
            state.reset_counters()
            checkpointer.save(state)
            metrics = write_run_metrics(accelerator, run_dir, args, command, data, state.history)
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch)
            accelerator.print(f'epoch {epoch}: train loss {row["train_loss"]:.4f} | val loss {row["val_loss"]:.4f} '
                              f'top-1 {row["top1"]:.2f} top-5 {row["top5"]:.2f} ({row["val_images"]} images) | '
                              f'lr {row["lr"]:.3g} | {row["epoch_time_s"]:.1f}s', flush=True)

    # ---- export ------------------------------------------------------------------------------------------------------
    final_model = ema.module if ema is not None else plain_model(accelerator, model)
    model_dir = run_dir / 'model'
    if accelerator.is_main_process:
        export_model(final_model, model_dir, label_names=data.class_names, metrics=card_metrics(metrics),
                     recipe=effective_flags(args), command=command, dataset=dataset_name(args),
                     data_config=data_config)
        final, best = metrics['final'], metrics['best']
        accelerator.print(f'final (epoch {final["epoch"]}): top-1 {final["top1"]:.2f} top-5 {final["top5"]:.2f}; '
                          f'best (epoch {best["epoch"]}): top-1 {best["top1"]:.2f} top-5 {best["top5"]:.2f}')
        accelerator.print(f'Hub-ready model: {model_dir}')
        accelerator.print(f'publish it with: python hub/push.py {model_dir} --repo-id ORG/NAME')
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {'run_dir': run_dir, 'metrics': metrics, 'model': final_model, 'data_config': data_config}


def _exit_interrupted(accelerator: Accelerator, run_dir: Path, command: str, signum: Optional[int]) -> None:
    accelerator.print(f'interrupted: checkpoint saved; continue with: {command} --resume {run_dir}', flush=True)
    accelerator.end_training()
    sys.exit(128 + (signum or 2))


if __name__ == '__main__':
    main()
