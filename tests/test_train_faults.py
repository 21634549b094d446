"""train.py under faults and hostile inputs: planted pickles, a locked run folder, divergence, resume with changed
flags, published files without local paths, one clear message and exit code per kind of user error."""
import json
import os
import pickle
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
    monkeypatch.setattr(run_lock, 'broadcast_object_list', lambda objects: ['refused by the main process'])
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
