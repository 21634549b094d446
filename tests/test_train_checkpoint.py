"""Checkpoint folders: atomic naming, pruning, stale futures after resuming from an earlier checkpoint."""
from pathlib import Path

import pytest
import torch

from timm_gcp.training import (
    Checkpointer, TrainState, check_compatible, consolidate_counters, find_checkpoint, read_train_state)


class OneProcess:
    """The part of `accelerate.Accelerator` that Checkpointer uses, for a single process."""
    is_main_process = True
    num_processes = 1
    device = torch.device('cpu')

    def reduce(self, tensor, reduction):
        return tensor

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir):
        (Path(output_dir) / 'model.safetensors').write_bytes(b'weights')


def _names(run_dir):
    return sorted(p.name for p in (run_dir / 'checkpoints').iterdir())


def test_checkpoints_are_atomic_pruned_and_latest_is_found(tmp_path):
    saver = Checkpointer(OneProcess(), tmp_path, keep=2)
    (tmp_path / 'checkpoints' / '.tmp-checkpoint-u000000001-e0000').mkdir(parents=True)  # a save cut short
    for updates, epoch in ((2, 0), (4, 0), (6, 1)):
        saver.save(TrainState(epoch=epoch, updates=updates, batches_done=updates % 6))
    assert _names(tmp_path) == ['checkpoint-u000000004-e0000', 'checkpoint-u000000006-e0001']
    latest = find_checkpoint(str(tmp_path))
    assert latest.name == 'checkpoint-u000000006-e0001' and read_train_state(latest).epoch == 1
    assert find_checkpoint(str(latest)) == latest


def test_resuming_from_an_earlier_checkpoint_drops_its_stale_future(tmp_path):
    saver = Checkpointer(OneProcess(), tmp_path, keep=5)
    for updates in (2, 4, 6):
        saver.save(TrainState(updates=updates, batches_done=updates))
    saver.save(TrainState(updates=4, batches_done=4, history=[{'resumed': True}]))  # continued from update 2
    assert _names(tmp_path) == ['checkpoint-u000000002-e0000', 'checkpoint-u000000004-e0000']
    assert read_train_state(find_checkpoint(str(tmp_path))).history == [{'resumed': True}]


def test_incompatible_checkpoint_names_every_difference(tmp_path):
    saved = {'model': 'gcp_resnet50', 'num_classes': 200, 'model_kwargs': {}}
    check_compatible(saved, dict(saved), tmp_path)
    with pytest.raises(ValueError, match=r"model: checkpoint 'gcp_resnet50', this run 'gcp_resnet18'; "
                                         r"num_classes: checkpoint 200, this run 37"):
        check_compatible(saved, {'model': 'gcp_resnet18', 'num_classes': 37, 'model_kwargs': {}}, tmp_path)


class SecondOfTwo(OneProcess):
    """Process 1 of 2, whose peer holds the same local counters."""
    is_main_process = False
    num_processes = 2

    def reduce(self, tensor, reduction):
        return tensor * 2


def test_resumed_counters_are_counted_once_across_processes(tmp_path):
    """The checkpoint holds the sum over all processes: on resume only the main process starts from it."""
    Checkpointer(OneProcess(), tmp_path).save(TrainState(train_loss_sum=6., train_samples=12, unreadable_train=1))
    checkpoint = find_checkpoint(str(tmp_path))
    main = read_train_state(checkpoint, OneProcess())
    other = read_train_state(checkpoint, SecondOfTwo())
    assert (main.train_loss_sum, main.train_samples, main.unreadable_train) == (6., 12, 1)
    assert (other.train_loss_sum, other.train_samples, other.unreadable_train) == (0., 0, 0)
    assert read_train_state(checkpoint).train_samples == 12
    other.train_samples = 4                                       # batches seen after the resume
    consolidate_counters(SecondOfTwo(), other)
    assert other.train_samples == 0                               # only the main process keeps the total
