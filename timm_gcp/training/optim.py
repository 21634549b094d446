"""Optimizer parameter groups (for timm's `create_optimizer_v2`) and the learning-rate schedule (timm's factory)."""
from argparse import Namespace
from typing import Any, Dict, List

from timm.optim import param_groups_weight_decay
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch import nn

__all__ = ['param_groups', 'create_train_scheduler']


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 1.0) -> List[Dict[str, Any]]:
    """timm's weight-decay groups (`param_groups_weight_decay`: none on biases, norms and `no_weight_decay()`), each
    split into backbone and classifier, the classifier's with `lr_scale` `head_lr_mult` (which timm schedulers apply).
    timm has no per-module lr multiplier (its `layer_decay` scales by depth), hence the split here."""
    no_decay = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    groups = []
    for group in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay):
        for is_head, lr_scale in ((False, 1.0), (True, head_lr_mult)):
            params = [p for p in group['params'] if (id(p) in head_ids) == is_head]
            if params:
                groups.append({**group, 'params': params, 'lr_scale': lr_scale})
    return groups


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
