"""Checkpoint folders: atomic naming, pruning, stale futures after resuming from an earlier checkpoint, validation
of every file, fallback to the newest intact checkpoint, files that cannot run code."""
import errno
import hashlib
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from timm_gcp.training.checkpoint import (
    Checkpointer, Interrupted, StopSignal, TrainState, check_compatible, consolidate_counters, read_train_state,
    select_checkpoint)
from timm_gcp.training.errors import CheckpointError, OutputUnwritable, exit_code_of

EXIT_OUTPUT_UNWRITABLE = 8  # as docs/training.md documents it


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


def at(updates: int, epoch: int = 0, **fields) -> TrainState:
    """A consistent TrainState: one history row per finished epoch."""
    history = [{'epoch': e, 'top1': 50.0, 'top5': 90.0, 'val_loss': 1.5} for e in range(epoch)]
    return TrainState(updates=updates, epoch=epoch, history=history, **fields)


def test_checkpoints_are_atomic_pruned_and_latest_is_found(tmp_path):
    saver = Checkpointer(OneProcess(), tmp_path, keep=2)
    (tmp_path / 'checkpoints' / '.tmp-checkpoint-u000000001-e0000').mkdir(parents=True)  # a save cut short
    for updates, epoch in ((2, 0), (4, 0), (6, 1)):
        saver.save(at(updates, epoch, batches_done=updates % 6))
    assert _names(tmp_path) == ['checkpoint-u000000004-e0000', 'checkpoint-u000000006-e0001']
    latest, state, skipped = select_checkpoint(str(tmp_path))
    assert latest.name == 'checkpoint-u000000006-e0001' and state.epoch == 1 and not skipped
    assert read_train_state(latest).epoch == 1 and select_checkpoint(str(latest))[0] == latest


def test_resuming_from_an_earlier_checkpoint_drops_its_stale_future(tmp_path):
    saver = Checkpointer(OneProcess(), tmp_path, keep=5)
    for updates in (2, 4, 6):
        saver.save(TrainState(updates=updates, batches_done=updates))
    saver.save(TrainState(updates=4, batches_done=4, meta_layer='resumed'))  # continued from update 2
    assert _names(tmp_path) == ['checkpoint-u000000002-e0000', 'checkpoint-u000000004-e0000']
    assert select_checkpoint(str(tmp_path))[1].meta_layer == 'resumed'


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
@pytest.mark.parametrize('recorded', [True, False])  # False: the attacker also removed the hashes and re-signed
@pytest.mark.parametrize('name', ['model.safetensors', 'optimizer.bin', 'random_states_0.pkl', 'trainer_state.json',
                                  'custom_checkpoint_0.pkl'])  # the last: the scheduler state train.py used to pickle
def test_a_pickle_planted_in_any_checkpoint_file_never_runs(tmp_path, name, recorded):
    checkpoint = Checkpointer(OneProcess(), tmp_path).save(TrainState(updates=2))
    if not recorded:
        state = json.loads((checkpoint / 'trainer_state.json').read_text())
        _resign(checkpoint / 'trainer_state.json', {**state, 'files': {}})
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
    _resign(checkpoint / 'trainer_state.json', state)
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
    with pytest.raises(Interrupted) as info:
        with StopSignal(defer=True) as stop:
            assert not stop.received_anywhere(accelerator)
            os.kill(os.getpid(), signal.SIGTERM)                 # recorded, not fatal
            assert stop.received == signal.SIGTERM
            assert stop.received_anywhere(accelerator) and stop.received_anywhere(accelerator)
    assert info.value.signum == signal.SIGTERM                   # left unhandled: raised on leaving the context
    assert signal.getsignal(signal.SIGTERM) is previous          # the handler is given back


def test_outside_the_loop_a_stop_signal_ends_the_process_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        with StopSignal(defer=False):
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail('the signal should have stopped the body')
    assert info.value.signum == signal.SIGINT and isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGINT) is previous


def _resign(path: Path, content: dict) -> None:
    """Write `content` as trainer_state.json with the SHA-256 of its content recomputed, as an editor who knows the
    format would (canonical JSON: sorted keys, no spaces)."""
    content = {k: v for k, v in content.items() if k != 'sha256'}
    text = json.dumps(content, sort_keys=True, separators=(',', ':'))
    path.write_text(json.dumps({**content, 'sha256': hashlib.sha256(text.encode()).hexdigest()}))


EDITS = {  # issue 21, fault 1: each edit of the last checkpoint of a finished 3-epoch run, and what names it
    'epoch 1': (lambda s: {**s, 'epoch': 1}, r'"updates" 18 and "epoch" 1 disagree with the folder name '
                                             r'checkpoint-u000000018-e0003'),
    'epoch -1': (lambda s: {**s, 'epoch': -1}, r'"epoch" must be a whole number >= 0, got -1'),
    'epoch "x"': (lambda s: {**s, 'epoch': 'x'}, r'"epoch" must be a whole number >= 0, got \'x\''),
    'history cut': (lambda s: {**s, 'history': s['history'][:1]}, r'"history" must hold one row per finished epoch, '
                                                                  r'0 to 2, for "epoch" 3; it holds epochs 0'),
    'broken JSON': (None, r'is not a valid trainer state: Expecting'),
}


@pytest.mark.parametrize('resigned', [False, True])  # True: the editor also recomputed the recorded SHA-256
@pytest.mark.parametrize('edit', sorted(EDITS))
def test_an_edited_trainer_state_is_refused_and_the_older_checkpoint_used(tmp_path, edit, resigned):
    saver = Checkpointer(OneProcess(), tmp_path, keep=3)
    older = [saver.save(at(6 * epoch, epoch)) for epoch in (1, 2)][-1]
    latest = saver.save(at(18, 3))
    path = latest / 'trainer_state.json'
    change, reason = EDITS[edit]
    content = json.loads(path.read_text())
    if change is None:
        path.write_text(path.read_text().rstrip()[:-1])  # the closing brace gone
    elif resigned:
        _resign(path, change(content))
    else:
        path.write_text(json.dumps(change(content)))
        reason = r'its content does not match the SHA-256 it records \(edited or damaged\)'
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + '.*' + reason):  # named: exit 4
        select_checkpoint(str(latest))
    chosen, state, skipped = select_checkpoint(str(tmp_path))
    assert chosen == older and state.epoch == 2 and [row['epoch'] for row in state.history] == [0, 1]
    assert len(skipped) == 1 and str(path) in skipped[0]


def test_a_trainer_state_field_of_the_wrong_type_is_named(tmp_path):
    latest = Checkpointer(OneProcess(), tmp_path).save(at(6, 1))
    path = latest / 'trainer_state.json'
    content = json.loads(path.read_text())
    cases = [({'updates': True}, r'"updates" must be a whole number >= 0, got True'),
             ({'train_loss_sum': 'NaN'}, r'"train_loss_sum" must be a finite number or null'),
             ({'history': {}}, r'"history" must be a list, got dict'),
             ({'history': [0]}, r'"history" must hold one row per finished epoch, 0 to 0, for "epoch" 1; it holds '
                                r'epochs None'),
             ({'history': [{'epoch': 0, 'top1': 'high', 'top5': 1.0, 'val_loss': 1.0}]},
              r'"history" row of epoch 0 holds \{\'top1\': \'high\'\}'),
             ({'files': {'../model.safetensors': content['files']['model.safetensors']}},
              r'"files" entry \'../model.safetensors\' must be a file name'),
             ({'compat': []}, r'"compat" must be an object, got list')]
    for change, reason in cases:
        _resign(path, {**content, **change})
        with pytest.raises(CheckpointError, match=reason):
            read_train_state(latest)
    path.write_text(json.dumps({k: v for k, v in content.items() if k != 'sha256'}))  # written before the hash
    assert read_train_state(latest).epoch == 1


class FullDisk(OneProcess):
    """An accelerator whose save_state writes part of a checkpoint, then meets `error` (what a full disk raises)."""
    def __init__(self, error: BaseException):
        self.error = error

    def save_state(self, output_dir):
        super().save_state(output_dir)
        (Path(output_dir) / 'optimizer.bin').write_bytes(bytes(1000))  # the half-written file
        raise self.error


def _torch_write_error() -> RuntimeError:
    """What torch.save raises on a full disk (its errno lost), chained as torch chains it."""
    try:
        try:
            raise RuntimeError('basic_ios::clear: iostream error')
        except RuntimeError:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 1596416 vs 1596304')
    except RuntimeError as err:
        return err


@pytest.mark.parametrize('error, reason', [
    (OSError(errno.ENOSPC, 'No space left on device'), r'no space left on device \(ENOSPC\); [\d,.]+ MiB free there'),
    (OSError(errno.EDQUOT, 'Disk quota exceeded'), r'disk quota exceeded \(EDQUOT\); [\d,.]+ MiB free there'),
    (OSError(errno.EROFS, 'Read-only file system'), r'read-only file system \(EROFS\)'),
    (PermissionError(errno.EACCES, 'Permission denied'), r'permission denied \(EACCES\)'),
    (SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)'),
     r'no space left on device \(ENOSPC\); [\d,.]+ MiB free there'),
    (_torch_write_error(), r'the write failed \(\[enforce fail at inline_container.cc:672\] . unexpected pos '
                           r'1596416 vs 1596304\); [\d,.]+ MiB free there'),
])
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_folder(tmp_path, error, reason):
    """Issue 21, fault 3: the error names the path, the free space and the last good checkpoint; the partial
    folder is gone at once (not at the next save)."""
    good = Checkpointer(OneProcess(), tmp_path).save(at(6, 1))
    saver = Checkpointer(FullDisk(error), tmp_path, last=good)
    with pytest.raises(OutputUnwritable) as info:
        saver.save(at(12, 2))
    message = str(info.value)
    assert re.fullmatch(rf'cannot write {re.escape(str(tmp_path / "checkpoints"))}/\.tmp-checkpoint-u000000012-e0002: '
                        rf'{reason}; the partial checkpoint is removed; last good checkpoint: {re.escape(str(good))}',
                        message), message
    assert exit_code_of(info.value) == EXIT_OUTPUT_UNWRITABLE and '\n' not in message
    assert _names(tmp_path) == [good.name]                            # no .tmp-checkpoint-* left behind
    assert select_checkpoint(str(tmp_path))[0] == good


def test_a_bug_while_checkpointing_keeps_its_traceback_and_leaves_no_partial_folder(tmp_path):
    with pytest.raises(TypeError, match='not a disk error'):
        Checkpointer(FullDisk(TypeError('not a disk error')), tmp_path).save(at(6, 1))
    assert _names(tmp_path) == []


@pytest.mark.slow
def test_real_writers_failing_mid_checkpoint_are_recognised(tmp_path):
    """accelerate, torch and safetensors writing a real checkpoint into a file size limit (RLIMIT_FSIZE, with
    SIGXFSZ ignored: write() then fails as on a full disk, EFBIG): safetensors keeps the errno in its message, torch
    loses it; both end in one OutputUnwritable line naming the last good checkpoint."""
    script = f'''
import resource, signal, sys, torch
from accelerate import Accelerator
from timm_gcp.training.checkpoint import Checkpointer, TrainState
from timm_gcp.training.errors import OutputUnwritable
accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(64, 64)                      # 16 KiB of weights, 32 KiB of Adam state once it has stepped
optimizer = torch.optim.Adam(model.parameters())
model, optimizer = accelerator.prepare(model, optimizer)
saver = Checkpointer(accelerator, sys.argv[1])
good = saver.save(TrainState())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (24 * 1024, resource.RLIM_INFINITY))
model(torch.ones(1, 64)).sum().backward()
optimizer.step()
try:
    saver.save(TrainState(updates=1))
except OutputUnwritable as err:
    print(err)
'''
    proc = subprocess.run([sys.executable, '-c', script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.fullmatch(r'cannot write .*/checkpoints/\.tmp-checkpoint-u000000001-e0000: the write failed \(\[enforce '
                        r'fail at inline_container.cc:\d+\] . unexpected pos \d+ vs \d+\); [\d,.]+ MiB free there; the '
                        r'partial checkpoint is removed; last good checkpoint: .*/checkpoint-u000000000-e0000\n',
                        proc.stdout), proc.stdout + proc.stderr[-3000:]
    assert _names(tmp_path) == ['checkpoint-u000000000-e0000']
