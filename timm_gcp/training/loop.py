"""One training epoch under accelerate, its loss and the scheduled learning rate."""
from typing import Any, Callable, Iterable, Optional, Tuple

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import TrainState
from .errors import TrainingDiverged


def create_loss(num_classes: int, smoothing: float, batch_size: int, **mixup_args: Any
                ) -> Tuple[Callable, Optional[Mixup]]:
    """The training loss and, when `mixup_args` (timm's `Mixup` keywords) enable mixup or cutmix, timm's Mixup."""
    if mixup_args.get('mixup_alpha', 0.) <= 0 and mixup_args.get('cutmix_alpha', 0.) <= 0:
        return (LabelSmoothingCrossEntropy(smoothing) if smoothing else nn.CrossEntropyLoss()), None
    if batch_size % 2:
        raise ValueError(f'mixup/cutmix need an even --batch-size, got {batch_size}')
    return SoftTargetCrossEntropy(), Mixup(**mixup_args, label_smoothing=smoothing, num_classes=num_classes)


def train_one_epoch(accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any, loss_fn: Callable,
                    loader: Iterable, state: TrainState, total_batches: int, on_update: Callable[[], bool],
                    mixup: Optional[Callable] = None, ema: Optional[nn.Module] = None,
                    clip_grad: Optional[float] = None, channels_last: bool = False, max_nonfinite_updates: int = 3,
                    progress: bool = True) -> None:
    """Train over `loader` (the epoch's remaining batches), advancing `state` and calling `on_update()` (True: stop
    the epoch) after every optimizer update. TrainingDiverged after `max_nonfinite_updates` non-finite losses in a
    row (on any process) or a meta-layer failing on a non-finite covariance."""
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    batches, nonfinite = state.batches_done, 0
    for x, y, unreadable in tqdm(loader, total=total_batches, initial=batches, desc=f'epoch {state.epoch}', leave=False,
                                 disable=not (progress and accelerator.is_main_process), dynamic_ncols=True):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            x, y = mixup(x, y)
        with accelerator.accumulate(model):
            try:
                loss = loss_fn(model(x), y)
                accelerator.backward(loss)
            except (ValueError, RuntimeError) as err:  # a meta-layer failing on a non-finite covariance diverged
                if not isinstance(err, torch.linalg.LinAlgError) and 'non-finite' not in str(err):
                    raise
                raise TrainingDiverged(f'training diverged at epoch {state.epoch} update {state.updates + 1} '
                                       f'({str(err).splitlines()[0]})') from err
            if accelerator.sync_gradients and clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad()
        batches += 1
        loss_sum += loss.detach().float() * x.shape[0]
        state.train_samples += x.shape[0]
        state.unreadable_train += int(unreadable.sum())
        if accelerator.sync_gradients:
            state.updates += 1
            state.batches_done = batches
            nonfinite = 0 if accelerator.reduce(loss_sum, 'sum').isfinite() else nonfinite + 1  # same on every process
            if nonfinite >= max_nonfinite_updates:
                raise TrainingDiverged(f'training diverged at epoch {state.epoch} update {state.updates} (loss '
                                       f'{float(loss):g} for {nonfinite} updates in a row)')
            state.train_loss_sum += float(loss_sum)
            loss_sum.zero_()
            scheduler.step_update(num_updates=state.updates)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model, keep_torch_compile=False), step=state.updates)
            if nonfinite == 0 and on_update():
                break


def base_lr(optimizer: Any) -> float:
    """The scheduled learning rate (of the first parameter group, its `lr_scale` taken out)."""
    group = optimizer.param_groups[0]
    return group['lr'] / group.get('lr_scale', 1.0)
