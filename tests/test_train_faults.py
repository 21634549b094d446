"""train.py under faults and hostile inputs: planted pickles, a locked run folder, divergence, resume with changed
flags, published files without local paths, one clear message and exit code per kind of user error."""
import errno
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import BUNDLED_DATA, image_subset
from test_train import (  # noqa: F401 (fixtures)
    ROOT, SUBPROCESS_ENV, TINY, _start, in_process, run_train, train_script)
from test_train_checkpoint import OneProcess, SecondOfTwo, Touch
from timm_gcp.training.checkpoint import read_train_state
from timm_gcp.training.errors import (
    EXIT_DATA, EXIT_USAGE, CheckpointError, OutputInUse, TrainingDiverged, exit_code_of, user_errors)
from timm_gcp.training import run_lock
from timm_gcp.training.run_lock import own_run_dir

EXIT_CHECKPOINT, EXIT_DIVERGED, EXIT_OUTPUT_IN_USE = 4, 5, 6  # as docs/training.md documents them

SECRET = 'home-of-jdoe-4711'  # stands for a user name / private mount point in every local path of these runs


@pytest.fixture(scope='module')
def tiny_pets(tmp_path_factory) -> Path:
    """3 classes of the bundled pets sample, 8 training images each (6 updates of 4), 5 validation images, under a
    private-looking path."""
    return image_subset(BUNDLED_DATA, tmp_path_factory.mktemp(SECRET) / 'pets', 3, 8, (2, 2, 1))


@pytest.fixture(scope='module')
def finished(train_script, tiny_pets, tmp_path_factory) -> Path:  # noqa: F811
    """A finished 1-epoch run (cosine schedule) with its checkpoint, under a private-looking path."""
    out = tmp_path_factory.mktemp(SECRET) / 'run'
    argv = [*TINY, '--data-dir', tiny_pets, '--epochs', '1', '--output', out, '--sched', 'cosine']
    in_process(train_script.main, argv)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / 'run'
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns('model', '.run.lock'))
    return dst


def test_published_files_hold_no_local_paths_and_describe_the_run(finished, tiny_pets):
    files = sorted(p for p in (finished / 'model').rglob('*') if p.is_file())
    assert {p.name for p in files} >= {'README.md', 'config.json', 'model.safetensors'}
    for path in files:
        text = path.read_bytes().decode('utf-8', errors='replace')
        for private in (SECRET, str(tiny_pets.parent), str(finished), os.path.expanduser('~')):
            assert private not in text, (path.name, private)
    readme = (finished / 'model' / 'README.md').read_text()
    assert 'python train.py --recipe none --model gcp_resnet18' in readme and '--data-dir pets' in readme
    metrics = json.loads((finished / 'metrics.json').read_text())
    assert str(tiny_pets) in metrics['command']                     # the local file keeps the full command
    assert metrics['history'][0]['meta_layer'] == timm.create_model('gcp_resnet18').meta_layer_name


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')  # the planted pickle's
def test_resume_never_runs_a_planted_pickle(train_script, finished, tiny_pets, tmp_path, capsys):  # noqa: F811
    run = _copy(finished, tmp_path)
    checkpoint = sorted((run / 'checkpoints').glob('checkpoint-*'))[-1]
    marker = tmp_path / 'code-ran'
    for name in ('optimizer.bin', 'random_states_0.pkl', 'custom_checkpoint_0.pkl'):
        saved = (checkpoint / name).read_bytes() if (checkpoint / name).exists() else None
        (checkpoint / name).write_bytes(pickle.dumps(Touch(marker)))
        code = in_process(train_script.cli, [*TINY, '--data-dir', tiny_pets, '--epochs', '2', '--resume', run])
        err = capsys.readouterr().err
        assert code == EXIT_CHECKPOINT and not marker.exists(), err
        assert err.count('\n') == 1 and str(checkpoint / name) in err, err
        (checkpoint / name).write_bytes(saved) if saved is not None else (checkpoint / name).unlink()


def test_resume_refuses_changed_flags_and_extends_the_schedule(run_train, finished, tiny_pets, tmp_path):  # noqa
    run = _copy(finished, tmp_path)
    args = [*TINY, '--data-dir', tiny_pets, '--sched', 'cosine', '--resume', run]
    with pytest.raises(CheckpointError, match=r'train_images: checkpoint 24, this run 18; batch_size: checkpoint 4, '
                                              r'this run 2\)'):
        run_train(*args, '--epochs', '2', '-b', '2', '--data-dir', image_subset(tiny_pets, tmp_path / 'd', 3, 6, [1] * 3))
    result = run_train(*args, '--epochs', '2')                          # a longer run: the schedule is rebuilt
    history = result['metrics']['history']
    assert [row['epoch'] for row in history] == [0, 1]
    assert history[0]['lr'] == pytest.approx(0.01)
    assert history[1]['lr'] == pytest.approx(0.01 / 2)                  # cosine over 2 epochs (not 1), at epoch 1
    metrics = json.loads((run / 'metrics.json').read_text())
    assert '--resume' not in metrics['command'] and "'--epochs' '1'" not in metrics['command']
    assert metrics['command'] == json.loads((finished / 'metrics.json').read_text())['command']


def test_divergence_stops_the_run_without_exporting(run_train, tiny_pets, tmp_path):  # noqa: F811
    out = tmp_path / 'run'
    with pytest.raises(TrainingDiverged, match=r'training diverged at epoch 0 update \d+ \(.*\); last good '
                                               r'checkpoint: none'):
        run_train(*TINY, '--data-dir', tiny_pets, '--epochs', '2', '--lr', '1e8', '--output', out)
    assert not (out / 'model').exists() and not list((out / 'checkpoints').glob('checkpoint-*'))
    json.loads((out / 'metrics.json').read_text(), parse_constant=lambda c: pytest.fail(f'{c} in metrics.json'))


def test_divergence_after_a_good_checkpoint_names_it(run_train, finished, tiny_pets, tmp_path):  # noqa: F811
    run = _copy(finished, tmp_path)
    with pytest.raises(TrainingDiverged, match=r'training diverged at epoch 1 .*; last good checkpoint: ') as info:
        run_train(*TINY, '--data-dir', tiny_pets, '--sched', 'cosine', '--epochs', '3', '--lr', '1e8',
                  '--checkpoint-interval', '1', '--resume', run)
    good = Path(str(info.value).split('last good checkpoint: ')[1])
    assert good == sorted((run / 'checkpoints').glob('checkpoint-*'))[-1]
    weights = load_file(good / 'model.safetensors')                     # every checkpoint written is finite
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_divergence_with_an_exact_meta_layer_is_reported_as_divergence(run_train, tiny_pets, tmp_path):  # noqa
    with pytest.raises(TrainingDiverged, match=r'training diverged at epoch 0 update \d+'):
        run_train(*TINY, '--data-dir', tiny_pets, '--epochs', '2', '--lr', '1e8', '--model-kwargs', 'gcp_dim=8',
                  'meta_layer=svd_pade', '--output', tmp_path / 'run')


def test_run_lock_names_its_holder_and_is_released(tmp_path):
    run_dir = tmp_path / 'run'
    with own_run_dir(OneProcess(), run_dir, resuming=False):
        with pytest.raises(OutputInUse, match=rf'{run_dir} is in use by another run \({{"pid": {os.getpid()}, '
                                              r'"host": .*"started": '):
            with own_run_dir(OneProcess(), run_dir, resuming=True):
                pass
        (run_dir / 'metrics.json').write_text('{}')
    with own_run_dir(OneProcess(), run_dir, resuming=False):            # released: free again
        pass
    assert (run_dir / 'metrics.json').exists()
    with own_run_dir(OneProcess(), tmp_path / 'runs' / 'unused', resuming=False):
        pass
    assert not (tmp_path / 'runs').exists()                              # folders it made and nothing used


def test_a_new_run_in_a_folder_holding_a_run_is_refused_on_every_process(tmp_path, monkeypatch):
    run_dir = tmp_path / 'run'
    (run_dir / 'checkpoints' / 'checkpoint-u000000002-e0000').mkdir(parents=True)
    with pytest.raises(OutputInUse, match=rf'{run_dir} already holds a run: continue it with --resume {run_dir}'):
        with own_run_dir(OneProcess(), run_dir, resuming=False):
            pass
    assert exit_code_of(OutputInUse()) == EXIT_OUTPUT_IN_USE and isinstance(OutputInUse(), FileExistsError)
    with own_run_dir(OneProcess(), run_dir, resuming=True):             # --resume: continued, not refused
        pass
    assert sorted(p.name for p in run_dir.iterdir()) == ['.run.lock', 'checkpoints']
    monkeypatch.setattr(run_lock, 'broadcast_object_list',
                        lambda objects: [OutputInUse('refused by the main process')])
    with pytest.raises(OutputInUse, match='refused by the main process'):  # the main process's verdict
        with own_run_dir(SecondOfTwo(), run_dir, resuming=True):
            pass


@pytest.mark.slow
def test_a_second_run_on_the_same_output_fails_at_once(tiny_pets, tmp_path):
    out = tmp_path / 'run'
    args = [*TINY, '--data-dir', tiny_pets, '--epochs', '100', '--log-interval', '1', '--output', out]
    first = _start(args)                                                 # long enough to outlive the second
    for line in first.stdout:
        if ' update 1 ' in line:
            break
    second = subprocess.run([sys.executable, str(ROOT / 'train.py'), *map(str, args)], cwd=ROOT, env=SUBPROCESS_ENV,
                            capture_output=True, text=True, timeout=120)
    assert first.poll() is None                                          # still training
    assert second.returncode == EXIT_OUTPUT_IN_USE, second.stderr
    assert f'{out} is in use by another run ({{"pid": {first.pid}' in second.stderr
    assert second.stderr.count('\n') == 1 and 'Traceback' not in second.stderr
    first.send_signal(signal.SIGTERM)                                    # the first run was not disturbed
    assert first.wait(timeout=120) == 128 + signal.SIGTERM
    assert read_train_state(sorted((out / 'checkpoints').glob('checkpoint-*'))[-1]).updates >= 1


def test_user_errors_are_one_line_with_an_exit_code(train_script, tiny_pets, tmp_path, capsys):  # noqa: F811
    base = [*TINY, '--epochs', '1']
    cases = [
        (['--data-dir', str(tiny_pets), '--img-size', '8'], EXIT_USAGE, 'cannot run at input size'),
        (['--data-dir', str(tiny_pets), '--model', 'gcp_resnt18'], EXIT_USAGE,
         "Unknown model 'gcp_resnt18'; did you mean gcp_resnet18, "),
        (['--data-dir', str(tiny_pets), '--model', 'resnet18.nope'], EXIT_USAGE,
         "resnet18 has no pretrained tag 'nope'; its tags: resnet18.a1_in1k, "),
        (['--data-dir', str(tmp_path / 'missing')], EXIT_DATA, 'does not exist'),
        (['--data-dir', str(tiny_pets), '--backbone-weights', 'resnet18.a1_in1kk'], EXIT_USAGE,
         "'resnet18.a1_in1kk': timm has no such pretrained tag of resnet18; did you mean resnet18.a1_in1k, "),
        (['--data-dir', str(tiny_pets), '--resume', str(tmp_path)], EXIT_CHECKPOINT, 'no checkpoint found'),
    ]
    for extra, code, message in cases:
        assert in_process(train_script.cli, [*base, *extra, '--output', tmp_path / 'out']) == code, extra
        err = capsys.readouterr().err
        assert err.startswith('train.py: error: ') and message in err and err.count('\n') == 1, err
    with pytest.raises(FileNotFoundError, match='does not exist'):     # --debug: the traceback of a user error
        in_process(train_script.cli, [*base, *cases[3][0], '--debug'])
    (tmp_path / 'debug.yaml').write_text('debug: true\n')              # a config file's debug counts the same
    with pytest.raises(FileNotFoundError, match='does not exist'):
        in_process(train_script.cli, [*base, *cases[3][0], '-c', tmp_path / 'debug.yaml'])
    assert not (tmp_path / 'out').exists()


def test_user_errors_keep_their_type_and_the_first_code():
    with pytest.raises(FileNotFoundError) as info:                     # callers still catch the built-in type
        with user_errors(EXIT_USAGE):
            with user_errors(EXIT_DATA):
                raise FileNotFoundError('data/train does not exist')
    assert exit_code_of(info.value) == EXIT_DATA                         # the stage it came from
    with pytest.raises(CheckpointError) as info:
        with user_errors(EXIT_USAGE):
            raise CheckpointError('corrupt')
    assert exit_code_of(info.value) == EXIT_CHECKPOINT                   # its own code, not the stage's
    assert exit_code_of(TrainingDiverged()) == EXIT_DIVERGED
    with pytest.raises(ZeroDivisionError) as info:                     # a bug: no code, so its traceback shows
        with user_errors(EXIT_USAGE):
            raise ZeroDivisionError
    assert exit_code_of(info.value) is None


@pytest.mark.slow
def test_cli_exit_codes_in_a_real_process(tiny_pets, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), *map(str, TINY), '--data-dir', tiny_pets,
                           '--epochs', '2', '--lr', '1e8', '--output', tmp_path / 'run'],
                          cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith('train.py: error: training diverged at epoch 0')
    assert 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_sigint_exits_128_plus_2_with_the_resume_command_last(tiny_pets, tmp_path):
    out = tmp_path / 'run'
    proc = _start([*TINY, '--data-dir', tiny_pets, '--epochs', '3', '--log-interval', '1', '--output', out])
    for line in proc.stdout:
        if ' update 2 ' in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read().strip().splitlines()
    assert proc.wait() == 128 + signal.SIGINT
    assert rest[-1].startswith('interrupted: checkpoint saved; continue with: python train.py')


def test_tiny_convnext_fine_tunes_with_the_convnext_recipe(run_train, tiny_pets, tmp_path):  # noqa: F811
    out = tmp_path / 'run'
    result = run_train('--recipe', 'finegrained_convnext_448', '--model', 'gcp_test_convnext', '--no-pretrained',
                       '--data-dir', tiny_pets, '--img-size', '64', '-b', '4', '--epochs', '1', '--workers', '0',
                       '--model-kwargs', 'gcp_dim=16', '--no-progress', '--log-with', 'none', '--output', out)
    row = result['metrics']['history'][0]
    assert row['train_images'] == 24 and row['val_images'] == 5
    config = json.loads((out / 'model' / 'config.json').read_text())
    assert config['architecture'] == 'gcp_test_convnext'


EXIT_WEIGHTS = 7  # as docs/training.md documents it


@pytest.mark.slow
@pytest.mark.parametrize('launch, flags, fix', [
    ([sys.executable], ['--model', 'gcp_resnet18.a1_in1k', '--pretrained'],
     '--backbone-weights FILE instead of --pretrained'),
    ([sys.executable, '-m', 'accelerate.commands.launch', '-q', '--cpu', '--num_processes', '1'],
     ['--model', 'gcp_resnet18', '--backbone-weights', 'resnet18.a1_in1k'], '--backbone-weights FILE, FILE a local'),
])
def test_weights_the_hub_cannot_deliver_end_in_one_line(tiny_pets, tmp_path, launch, flags, fix):
    """An unreachable Hub and an empty cache, in a real process (alone and under `accelerate launch -q`): one line
    naming the model, the repo and the three ways out, the documented exit code, no traceback, no run folder."""
    env = {**SUBPROCESS_ENV, 'HF_ENDPOINT': 'http://127.0.0.1:9', 'HF_HUB_CACHE': str(tmp_path / 'empty-cache')}
    env.pop('HF_HUB_OFFLINE', None)
    proc = subprocess.run([*launch, str(ROOT / 'train.py'), *map(str, TINY), *flags, '--data-dir', tiny_pets,
                           '--epochs', '1', '--output', tmp_path / 'run'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == (EXIT_WEIGHTS if len(launch) == 1 else 1), proc.stderr[-3000:]  # `-q`: the launcher's 1
    assert 'Traceback' not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('train.py: error: ')]
    assert len(errors) == 1, proc.stderr
    assert 'cannot load the weights of Hub repo timm/resnet18.a1_in1k (http://127.0.0.1:9 cannot deliver them' \
        in errors[0]
    assert 'connect to the Hub' in errors[0] and 'HF_HUB_OFFLINE=1' in errors[0] and fix in errors[0]
    assert not (tmp_path / 'run').exists()


def test_the_demo_outside_the_repository_says_where_to_run_it(train_script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert in_process(train_script.cli, ['--epochs', '1']) == EXIT_DATA
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'run `python train.py` from the repository root' in err, err


def test_the_printed_commands_repeat_the_launcher(train_script, monkeypatch):
    for name in ('ACCELERATE_MIXED_PRECISION', 'TORCHELASTIC_RUN_ID', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE'):
        monkeypatch.delenv(name, raising=False)
    assert train_script.command_line(['--lr', '0.1']) == 'python train.py --lr 0.1'
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')               # `accelerate launch` on one machine
    monkeypatch.setenv('WORLD_SIZE', '8')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert train_script.launcher() == ['accelerate', 'launch', '--num_processes', '8', '--num_machines', '2']
    command = train_script.command_line(['--data-dir', '/data/cub', '--output', '/runs/a b'])
    assert train_script.public_command(command) == \
        'accelerate launch --num_processes 8 --num_machines 2 train.py --data-dir cub'
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION')
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'none')
    assert train_script.launcher() == ['torchrun', '--nproc_per_node', '4', '--nnodes', '2']


def test_workers_default_to_what_the_machine_has(train_script):
    cpus = len(os.sched_getaffinity(0))
    assert train_script.parse_config(['--data-dir', 'x']).workers == min(4, cpus)


@pytest.mark.slow
def test_the_demo_publishes_its_data_set_name_and_no_checkout_path(train_script, tmp_path, monkeypatch):
    """`python train.py` in a checkout with a distinctive folder name: the card and config.json name the data set
    pets-mini, and no exported file holds the checkout's name."""
    checkout = tmp_path / 'my-checkout-Zq9x'
    shutil.copytree(BUNDLED_DATA, checkout / 'data' / 'pets-mini')
    monkeypatch.chdir(checkout)
    in_process(train_script.main, ['--epochs', '1', '--img-size', '32', '--output', 'run', '--no-progress',
                                   '--log-with', 'none'])
    model_dir = checkout / 'run' / 'model'
    card = (model_dir / 'README.md').read_text()
    assert 'datasets:\n- pets-mini\n' in card and '# gcp_resnet18 on pets-mini' in card
    pretrained_cfg = json.loads((model_dir / 'config.json').read_text())['pretrained_cfg']
    assert pretrained_cfg['tag'] == 'pets_mini' and ' on pets-mini (37 classes)' in pretrained_cfg['description']
    for path in model_dir.iterdir():
        assert b'my-checkout-Zq9x' not in path.read_bytes(), path.name


# ---- issue 21: a fault-injection pass (tiny runs; a user whose machine, disk and fingers misbehave) ----------------
EXIT_OUTPUT_UNWRITABLE = 8  # as docs/training.md documents it


def _one_error_line(err: str) -> str:
    assert err.startswith('train.py: error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
    return err[len('train.py: error: '):-1]


@pytest.fixture(scope='module')
def finished_twice(train_script, tiny_pets, tmp_path_factory) -> Path:  # noqa: F811
    """A finished 2-epoch run: checkpoints at the end of epoch 0 (u6-e1) and epoch 1 (u12-e2), and its export."""
    out = tmp_path_factory.mktemp('twice') / 'run'
    in_process(train_script.main, [*TINY, '--data-dir', tiny_pets, '--epochs', '2', '--output', out])
    return out


EDITS = {'epoch 1': 1, 'epoch -1': -1, 'epoch "x"': 'x', 'broken JSON': None}


@pytest.mark.slow
def test_an_edited_trainer_state_is_exit_4_or_the_older_checkpoint(train_script, finished_twice, tiny_pets,  # noqa
                                                                    tmp_path, capsys):
    """Fault 1: with "epoch": 1 in the last checkpoint of a finished run, --resume re-trained epoch 1 on the finished
    weights and exited 0; -1 trained at lr -1; "x" was a TypeError traceback. Each edit is now refused by name (exit
    4), and the run folder resumes from the older intact checkpoint."""
    run = _copy(finished_twice, tmp_path)
    older, latest = sorted((run / 'checkpoints').glob('checkpoint-*'))
    state_file = latest / 'trainer_state.json'
    original = state_file.read_text()
    args = [*TINY, '--data-dir', tiny_pets, '--epochs', '2']
    for edit, value in EDITS.items():
        state = json.loads(original)
        state_file.write_text(original.rstrip()[:-1] if value is None else json.dumps({**state, 'epoch': value}))
        assert in_process(train_script.cli, [*args, '--resume', latest]) == EXIT_CHECKPOINT, edit
        message = _one_error_line(capsys.readouterr().err)
        assert f'{state_file} is not a valid trainer state: ' in message, message
    state_file.write_text(json.dumps({**json.loads(original), 'epoch': 1}))
    assert in_process(train_script.cli, [*args, '--resume', run]) == 0
    printed = capsys.readouterr().out
    assert f'skipping checkpoint {latest}: {state_file} is not a valid trainer state: its content does not match ' \
           f'the SHA-256 it records (edited or damaged)' in printed
    assert f'resuming from the older intact checkpoint {older}' in printed
    metrics = json.loads((run / 'metrics.json').read_text())
    assert [row['epoch'] for row in metrics['history']] == [0, 1]          # epoch 1 trained once, not twice
    finished_metrics = json.loads((finished_twice / 'metrics.json').read_text())
    assert metrics['final']['top1'] == finished_metrics['final']['top1']   # the same run, resumed exactly


@pytest.mark.slow
def test_printed_commands_run_when_pasted_into_a_shell(tmp_path):
    """Fault 2: with --output under a path with spaces and non-ASCII characters, the printed resume command and
    `timm-gcp push` command failed with exit 2 when pasted. Both now run through bash as printed."""
    home = tmp_path / 'out dir' / 'rün ✓ 日本'
    data = image_subset(BUNDLED_DATA, home / 'pets data', 3, 8, (2, 2, 1))
    out = home / 'run 1'
    env = {**SUBPROCESS_ENV, 'PATH': f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}',
           'HF_HOME': str(tmp_path / 'hf_home'), 'HF_HUB_OFFLINE': '1'}
    env.pop('HF_TOKEN', None)
    proc = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *map(str, TINY), '--data-dir', data, '--epochs',
                             '2', '--log-interval', '1', '--output', out], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if ' update 2 ' in line:
            proc.send_signal(signal.SIGTERM)
            break
    last = proc.stdout.read().strip().splitlines()[-1]
    assert proc.wait() == 128 + signal.SIGTERM
    resume = last.split('continue with: ', 1)[1]
    assert shlex.split(resume)[-2:] == ['--resume', str(out)]
    refused = subprocess.run([sys.executable, str(ROOT / 'train.py'), *map(str, TINY), '--data-dir', data,
                              '--epochs', '2', '--output', out], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == EXIT_OUTPUT_IN_USE
    hint = refused.stderr.split('continue it with ', 1)[1].split(', or choose')[0]
    assert shlex.split(hint) == ['--resume', str(out)]
    resumed = subprocess.run(['bash', '-c', resume], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert [row['epoch'] for row in json.loads((out / 'metrics.json').read_text())['history']] == [0, 1]
    publish = resumed.stdout.strip().splitlines()[-1].split('publish it with: ', 1)[1]
    assert shlex.split(publish) == ['timm-gcp', 'push', str(out / 'model'), '--repo-id', 'ORG/NAME']
    pushed = subprocess.run(['bash', '-c', publish], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    # the folder was found and validated (push checks it before anything else); only the token is missing here
    assert pushed.returncode == 1 and pushed.stderr == 'timm-gcp push: ValueError: no Hugging Face token: set ' \
                                                       'HF_TOKEN or run `hf auth login`\n', pushed.stderr


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_naming_the_last_good_checkpoint(train_script, finished,  # noqa
                                                                                      tiny_pets, tmp_path,
                                                                                      monkeypatch, capsys):
    """Fault 3: a full disk while saving a checkpoint was a traceback (SafetensorError, or torch's "unexpected pos")
    with no word of space or path, and the partial .tmp-checkpoint-* stayed on the full disk."""
    from accelerate import Accelerator
    run = _copy(finished, tmp_path)
    good = sorted((run / 'checkpoints').glob('checkpoint-*'))[-1]
    save_state = Accelerator.save_state

    def full_disk(self, output_dir, **kwargs):
        save_state(self, output_dir, **kwargs)                           # most of it written, then the disk is full
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(Accelerator, 'save_state', full_disk)
    code = in_process(train_script.cli, [*TINY, '--data-dir', tiny_pets, '--epochs', '2', '--checkpoint-interval',
                                         '1', '--resume', run])
    assert code == EXIT_OUTPUT_UNWRITABLE
    message = _one_error_line(capsys.readouterr().err)
    assert re.fullmatch(rf'cannot write {re.escape(str(run))}/checkpoints/\.tmp-checkpoint-u000000007-e0001: no space '
                        rf'left on device \(ENOSPC\); [\d,.]+ MiB free there; the partial checkpoint is removed; last '
                        rf'good checkpoint: {re.escape(str(good))}', message), message
    assert [p.name for p in (run / 'checkpoints').iterdir()] == [good.name]  # removed at once, not at the next save


def test_a_full_disk_while_exporting_is_one_line_and_leaves_no_staging_folder(train_script, finished,  # noqa: F811
                                                                                tiny_pets, tmp_path, monkeypatch,
                                                                                capsys):
    """Fault 3, the export: safetensors reports a full disk as a SafetensorError holding "(os error 28)"."""
    from safetensors import SafetensorError
    from timm_gcp.hub import export as export_module
    run = _copy(finished, tmp_path)

    def full_disk(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(export_module, 'save_for_hf', full_disk)
    code = in_process(train_script.cli, [*TINY, '--data-dir', tiny_pets, '--epochs', '1', '--resume', run])
    assert code == EXIT_OUTPUT_UNWRITABLE
    message = _one_error_line(capsys.readouterr().err)
    assert re.fullmatch(rf'cannot write {re.escape(str(run))}: no space left on device \(ENOSPC\); [\d,.]+ MiB free '
                        rf'there; last good checkpoint: .*/checkpoint-u000000006-e0001', message), message
    assert not [p.name for p in run.iterdir() if p.name.startswith('.model.')]


@pytest.fixture
def read_only_for_root_too(monkeypatch):
    """Root ignores a folder's mode 555: refuse, as the kernel does for anyone else, to create a file or folder in a
    folder nobody may write to (filelock's lock file and Path.mkdir go through os.open and os.mkdir)."""
    if os.geteuid() != 0:
        return
    denied = lambda path: not os.stat(os.path.dirname(os.path.abspath(path))).st_mode & 0o222  # noqa: E731
    real_open, real_mkdir = os.open, os.mkdir

    def checked_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and denied(path):
            raise PermissionError(errno.EACCES, 'Permission denied', os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def checked_mkdir(path, *args, **kwargs):
        if denied(path):
            raise PermissionError(errno.EACCES, 'Permission denied', os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, 'open', checked_open)
    monkeypatch.setattr(os, 'mkdir', checked_mkdir)


def test_an_unwritable_output_is_one_line(train_script, tiny_pets, tmp_path, read_only_for_root_too,  # noqa: F811
                                          capsys):
    """Fault 4: --output under a folder of mode 555, or itself of mode 555, was an 18-line PermissionError
    traceback (exit 1)."""
    (tmp_path / 'locked').mkdir()
    (tmp_path / 'locked-run').mkdir()
    try:
        for folder, failed in ((tmp_path / 'locked', tmp_path / 'locked' / 'run'),
                               (tmp_path / 'locked-run', tmp_path / 'locked-run' / '.run.lock')):
            folder.chmod(0o555)
            out = folder / 'run' if folder.name == 'locked' else folder
            code = in_process(train_script.cli, [*TINY, '--data-dir', tiny_pets, '--epochs', '1', '--output', out])
            assert code == EXIT_OUTPUT_UNWRITABLE
            assert _one_error_line(capsys.readouterr().err) == (
                f'cannot write {failed}: permission denied (EACCES); nothing was written; choose an --output you can '
                f'write to')
    finally:
        for folder in ('locked', 'locked-run'):
            (tmp_path / folder).chmod(0o755)
    assert list((tmp_path / 'locked').iterdir()) == [] and list((tmp_path / 'locked-run').iterdir()) == []


def test_a_resumed_run_removes_what_a_killed_export_left(train_script, finished, tiny_pets, tmp_path):  # noqa: F811
    """Fault 6: after a SIGKILL during the export, `.model.tmp-*` and `.model.old-*/export` stayed after a later
    resume and export (as the export writes them: a part-written new export, the earlier export moved aside)."""
    run = _copy(finished, tmp_path)
    (run / '.model.tmp-k1ll3d').mkdir()
    (run / '.model.tmp-k1ll3d' / 'model.safetensors').write_bytes(bytes(1000))
    shutil.copytree(finished / 'model', run / '.model.old-k1ll3d' / 'export')
    in_process(train_script.main, [*TINY, '--data-dir', tiny_pets, '--epochs', '1', '--resume', run])
    assert not [p.name for p in run.iterdir() if p.name.startswith('.model.')]
    assert (run / 'model' / 'model.safetensors').is_file()


def test_a_folder_holding_a_finished_run_without_checkpoints_is_refused(train_script, finished, tiny_pets,  # noqa
                                                                          tmp_path, capsys):
    """Fault 8: a folder with an export and metrics but no checkpoints/ was silently overwritten by a new run."""
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / 'checkpoints')
    shutil.copytree(finished / 'model', run / 'model')
    files = lambda: {p: p.read_bytes() for p in run.rglob('*') if p.is_file() and p.name != '.run.lock'}  # noqa
    before = files()
    code = in_process(train_script.cli, [*TINY, '--data-dir', tiny_pets, '--epochs', '1', '--output', run])
    assert code == EXIT_OUTPUT_IN_USE
    assert _one_error_line(capsys.readouterr().err) == (
        f'{run} already holds the results of a run (model/, metrics.json) and no checkpoint to continue it from: '
        f'choose another --output, or remove them to start again there')
    assert files() == before


def test_results_a_new_run_would_overwrite_are_refused(tmp_path):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'metrics.json').write_text('{"history": []}')             # a run that failed before its first epoch
    with own_run_dir(OneProcess(), run_dir, resuming=False):
        pass
    for name, text in (('metrics.json', '{"history": [{"epoch": 0}]}'), ('metrics.json', '{"hist'), ('model', None)):
        (run_dir / name).mkdir() if text is None else (run_dir / name).write_text(text)
        with pytest.raises(OutputInUse, match=r'already holds the results of a run \((model/, )?metrics.json\)'):
            with own_run_dir(OneProcess(), run_dir, resuming=False):
                pass
    with own_run_dir(OneProcess(), run_dir, resuming=True):              # --resume: the run's own results
        pass


@pytest.mark.slow
def test_a_signal_during_the_final_evaluation_or_export_is_honoured(train_script, tiny_pets, tmp_path,  # noqa: F811
                                                                      monkeypatch, capsys):
    """Fault 9: a SIGTERM during the final evaluation or the export was ignored (exit 0). Now the evaluation ends,
    the epoch's checkpoint is saved and the run exits 143 with the resume command; during the export the export is
    abandoned whole (an earlier one stays) and the run exits 143; --resume then exports."""
    from timm_gcp.hub import export as export_module
    from timm_gcp.training import evaluate as evaluate_module
    out = tmp_path / 'run'
    args = [*TINY, '--data-dir', tiny_pets, '--epochs', '1', '--output', out]
    evaluate, save_for_hf = evaluate_module.evaluate, export_module.save_for_hf

    def evaluate_and_get_a_sigterm(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*a, **kw)

    monkeypatch.setattr(evaluate_module, 'evaluate', evaluate_and_get_a_sigterm)
    with pytest.raises(SystemExit) as info:
        in_process(train_script.cli, args)
    assert info.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f'--resume {out}')
    assert read_train_state(sorted((out / 'checkpoints').glob('checkpoint-*'))[-1]).epoch == 1  # the epoch is saved
    assert not (out / 'model').exists()
    monkeypatch.setattr(evaluate_module, 'evaluate', evaluate)

    def weights_written_then_a_sigterm(*a, **kw):
        save_for_hf(*a, **kw)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export_module, 'save_for_hf', weights_written_then_a_sigterm)
    assert in_process(train_script.cli, [*args, '--resume', out]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == 'train.py: interrupted\n'
    assert not (out / 'model').exists() and not [p for p in out.iterdir() if p.name.startswith('.model.')]
    monkeypatch.setattr(export_module, 'save_for_hf', save_for_hf)
    assert in_process(train_script.cli, [*args, '--resume', out]) == 0
    assert (out / 'model' / 'model.safetensors').is_file()


def test_a_symlink_loop_or_a_class_name_not_in_utf8_is_one_line(train_script, tiny_pets, tmp_path,  # noqa: F811
                                                                   capsys):
    """Faults 5 and 10 through train.py: a symlink loop in the data (984 images read instead of 24) and a class folder
    not named in UTF-8 (published as a lone surrogate) are data errors, exit 3, naming the path."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_pets, data)
    daisy = sorted((data / 'train').iterdir())[0]
    (daisy / 'loop').symlink_to('..')
    assert in_process(train_script.cli, [*TINY, '--data-dir', data, '--epochs', '1',
                                         '--output', tmp_path / 'run']) == EXIT_DATA
    assert _one_error_line(capsys.readouterr().err).startswith(
        f'symlink loop in the data: {daisy / "loop"} points to {data / "train"}, which holds it')
    (daisy / 'loop').unlink()
    for split in ('train', 'val'):
        try:
            os.rename(sorted((data / split).iterdir())[0], os.fsencode(data / split) + b'/dais\xff')
        except OSError as err:
            pytest.skip(f'this file system refuses a name that is not UTF-8: {err}')
    assert in_process(train_script.cli, [*TINY, '--data-dir', data, '--epochs', '1',
                                         '--output', tmp_path / 'run']) == EXIT_DATA
    assert _one_error_line(capsys.readouterr().err).startswith(
        f"class folder name b'dais\\xff' in {data / 'train'} is not valid UTF-8")
    assert not (tmp_path / 'run').exists()
