"""Optimizer and learning-rate schedule from train.py's flags (timm's factories)."""
from argparse import Namespace
from typing import Any

from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch import nn

from .model import param_groups

__all__ = ['create_train_optimizer', 'create_train_scheduler']


def create_train_optimizer(model: nn.Module, args: Namespace) -> Any:
    """timm optimizer over `param_groups` (no decay on biases and norms, classifier lr x `head_lr_mult`)."""
    return create_optimizer_v2(param_groups(model, args.weight_decay, args.head_lr_mult), opt=args.opt, lr=args.lr,
                               weight_decay=args.weight_decay, momentum=args.momentum)


def create_train_scheduler(optimizer: Any, args: Namespace, updates_per_epoch: int) -> Any:
    """The timm scheduler of `args.sched` (timm's `scheduler_kwargs` reads the flags, which carry timm's names): the
    caller steps it once per update and once per epoch, never prepared by accelerate (which would step it once per
    process). `--epochs` includes the cooldown epochs (timm's scheduler adds them to `num_epochs`)."""
    kwargs = {**scheduler_kwargs(args), 'num_epochs': args.epochs - args.cooldown_epochs}
    scheduler, _ = create_scheduler_v2(optimizer, **kwargs, updates_per_epoch=updates_per_epoch)
    if scheduler is None:
        raise ValueError(f'--sched {args.sched!r} gives no timm scheduler; for a fixed lr use --sched step '
                         f'--decay-rate 1')
    return scheduler
