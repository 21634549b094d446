"""Checkpoint folders: atomic naming, pruning, stale futures after resuming from an earlier checkpoint, validation
of every file, fallback to the newest intact checkpoint, files that cannot run code."""
import json
import math
import os
import pickle
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from timm_gcp.training.checkpoint import (
    Checkpointer, StopSignal, TrainState, check_compatible, consolidate_counters, read_train_state,
    select_checkpoint)
from timm_gcp.training.errors import CheckpointError


class OneProcess:
    """The part of `accelerate.Accelerator` that Checkpointer uses, for a single process."""
    is_main_process = True
    num_processes = 1
    device = torch.device('cpu')

    def reduce(self, tensor, reduction):
        return tensor

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir):  # the folder and files accelerate writes, with the loaders it reads them with
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_file({'w': torch.ones(3)}, str(Path(output_dir) / 'model.safetensors'))
        torch.save({'state': {}, 'param_groups': []}, Path(output_dir) / 'optimizer.bin')
        torch.save({'random_state': (3, (1, 2), None), 'numpy_random_seed': ('MT19937', [1, 2], 0, 0, 0.0),
                    'torch_manual_seed': torch.get_rng_state()}, Path(output_dir) / 'random_states_0.pkl')


def _names(run_dir):
    return sorted(p.name for p in (run_dir / 'checkpoints').iterdir())


def test_checkpoints_are_atomic_pruned_and_latest_is_found(tmp_path):
    saver = Checkpointer(OneProcess(), tmp_path, keep=2)
    (tmp_path / 'checkpoints' / '.tmp-checkpoint-u000000001-e0000').mkdir(parents=True)  # a save cut short
    for updates, epoch in ((2, 0), (4, 0), (6, 1)):
        saver.save(TrainState(epoch=epoch, updates=updates, batches_done=updates % 6))
    assert _names(tmp_path) == ['checkpoint-u000000004-e0000', 'checkpoint-u000000006-e0001']
    latest, state, skipped = select_checkpoint(str(tmp_path))
    assert latest.name == 'checkpoint-u000000006-e0001' and state.epoch == 1 and not skipped
    assert read_train_state(latest).epoch == 1 and select_checkpoint(str(latest))[0] == latest


def test_resuming_from_an_earlier_checkpoint_drops_its_stale_future(tmp_path):
    saver = Checkpointer(OneProcess(), tmp_path, keep=5)
    for updates in (2, 4, 6):
        saver.save(TrainState(updates=updates, batches_done=updates))
    saver.save(TrainState(updates=4, batches_done=4, history=[{'resumed': True}]))  # continued from update 2
    assert _names(tmp_path) == ['checkpoint-u000000002-e0000', 'checkpoint-u000000004-e0000']
    assert select_checkpoint(str(tmp_path))[1].history == [{'resumed': True}]


def test_incompatible_checkpoint_names_every_difference(tmp_path):
    saved = {'model': 'gcp_resnet50', 'num_classes': 200, 'model_kwargs': {}}
    check_compatible(saved, dict(saved), tmp_path)
    with pytest.raises(CheckpointError, match=r"model: checkpoint 'gcp_resnet50', this run 'gcp_resnet18'; "
                                         r"num_classes: checkpoint 200, this run 37"):
        check_compatible(saved, {'model': 'gcp_resnet18', 'num_classes': 37, 'model_kwargs': {}}, tmp_path)


class FirstOfTwo(OneProcess):
    """Process 0 of 2, whose peer holds the same local counters."""
    num_processes = 2

    def reduce(self, tensor, reduction):
        return tensor * 2


class SecondOfTwo(FirstOfTwo):
    is_main_process = False


def test_checkpointed_counters_are_the_sum_over_processes_kept_once(tmp_path):
    """The checkpoint holds the running counters summed over all processes; only the main process keeps the sum
    (train.py zeroes them on the other processes of a resumed run)."""
    state = TrainState(train_loss_sum=3., train_samples=6, unreadable_train=1)
    checkpoint = Checkpointer(FirstOfTwo(), tmp_path).save(state)
    saved = read_train_state(checkpoint)
    assert (saved.train_loss_sum, saved.train_samples, saved.unreadable_train) == (6., 12, 2)
    assert (state.train_loss_sum, state.train_samples, state.unreadable_train) == (6., 12, 2)
    other = TrainState(train_loss_sum=3., train_samples=6, unreadable_train=1)
    consolidate_counters(SecondOfTwo(), other)
    assert (other.train_loss_sum, other.train_samples, other.unreadable_train) == (0., 0, 0)


class Touch:
    """Unpickling this creates `marker`: proof that a loader ran code from a checkpoint."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')  # the planted pickle's
@pytest.mark.parametrize('recorded', [True, False])  # False: the attacker also removed the recorded hashes
@pytest.mark.parametrize('name', ['model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'trainer_state.json',
                                  'custom_checkpoint_0.pkl'])  # the last: the scheduler state train.py used to pickle
def test_a_pickle_planted_in_any_checkpoint_file_never_runs(tmp_path, name, recorded):
    checkpoint = Checkpointer(OneProcess(), tmp_path).save(TrainState(updates=2))
    if not recorded:
        state = json.loads((checkpoint / 'trainer_state.json').read_text())
        (checkpoint / 'trainer_state.json').write_text(json.dumps({**state, 'files': {}}))
    marker = tmp_path / 'code-ran'
    planted = pickle.dumps(Touch(marker))
    (checkpoint / name).write_bytes(planted)
    with pytest.raises(CheckpointError, match=re.escape(str(checkpoint / name))) as info:
        select_checkpoint(str(tmp_path))
    assert not marker.exists()
    if not recorded and name != 'trainer_state.json':
        assert 'cannot be read safely' in str(info.value)
    pickle.loads(planted)  # the planted bytes do run code under plain pickle
    assert marker.exists()


@pytest.mark.parametrize('damage', ['zeros', 'truncated', 'missing'])
@pytest.mark.parametrize('name', ['model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'trainer_state.json'])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_older_intact_one(tmp_path, name, damage):
    saver = Checkpointer(OneProcess(), tmp_path, keep=3)
    older = saver.save(TrainState(updates=2))
    latest = saver.save(TrainState(updates=4))
    path = latest / name
    if damage == 'zeros':
        path.write_bytes(bytes(path.stat().st_size))
    elif damage == 'truncated':
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(path))):  # asked for by name: an error
        select_checkpoint(str(latest))
    chosen, state, skipped = select_checkpoint(str(tmp_path))
    assert chosen == older and state.updates == 2
    if (latest / 'trainer_state.json').exists():  # else the folder is no checkpoint at all
        assert len(skipped) == 1 and str(path) in skipped[0]
        assert latest.exists() and older.exists()  # nothing pruned until the resumed run has saved
        resumed = saver.save(TrainState(updates=3))
        assert _names(tmp_path) == [older.name, resumed.name]


def test_a_checkpoint_records_and_checks_every_file(tmp_path):
    checkpoint = Checkpointer(OneProcess(), tmp_path).save(TrainState(updates=2))
    files = json.loads((checkpoint / 'trainer_state.json').read_text())['files']
    assert sorted(files) == ['model.safetensors', 'optimizer.bin', 'random_states_0.pkl']
    torch.save({'state': {}, 'param_groups': [{'lr': 1.0}]}, checkpoint / 'optimizer.bin')  # valid, but not ours
    with pytest.raises(CheckpointError, match='optimizer.bin is corrupt: its size or SHA-256 differs'):
        select_checkpoint(str(checkpoint))


def test_a_random_state_without_the_generators_is_an_error(tmp_path):
    checkpoint = Checkpointer(OneProcess(), tmp_path).save(TrainState(updates=2))
    state = json.loads((checkpoint / 'trainer_state.json').read_text())
    torch.save({'step': 0}, checkpoint / 'random_states_0.pkl')
    state['files'].pop('random_states_0.pkl')
    (checkpoint / 'trainer_state.json').write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match='random_states_0.pkl cannot be read safely: expected a mapping'):
        select_checkpoint(str(checkpoint))


def test_checkpoint_files_get_the_users_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        checkpoint = Checkpointer(OneProcess(), tmp_path).save(TrainState(updates=2))
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in checkpoint.iterdir()} == {oct(0o644)}


def test_a_non_finite_running_loss_is_checkpointed_as_null_and_read_back(tmp_path):
    """An update whose loss overflowed (fp16: the scaler skipped its step) leaves the running loss sum non-finite;
    a later checkpoint still saves it (strict JSON: null) and the resumed run reads it back as NaN."""
    checkpoint = Checkpointer(OneProcess(), tmp_path).save(TrainState(updates=2, train_loss_sum=math.inf,
                                                                      train_samples=8))
    text = (checkpoint / 'trainer_state.json').read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f'{c} in trainer_state.json'))
    state = select_checkpoint(str(checkpoint))[1]
    assert math.isnan(state.train_loss_sum) and state.train_samples == 8
    assert math.isnan(read_train_state(checkpoint).train_loss_sum)


class Trigger(OneProcess):
    """accelerate's trigger on one process: check_trigger reports a set trigger once, and resets it."""
    flag = False

    def set_trigger(self):
        self.flag = True

    def check_trigger(self):
        flag, self.flag = self.flag, False
        return flag


def test_a_stop_signal_is_recorded_and_reported_at_every_check_until_the_end():
    accelerator, previous = Trigger(), signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.received_anywhere(accelerator)
        os.kill(os.getpid(), signal.SIGTERM)                     # recorded, not fatal
        assert stop.received == signal.SIGTERM
        assert stop.received_anywhere(accelerator) and stop.received_anywhere(accelerator)
    assert signal.getsignal(signal.SIGTERM) is previous          # the handler is given back
