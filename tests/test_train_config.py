"""Recipes, flag precedence, the demo-recipe rule, --help defaults, published flags and command without local paths,
meta-layer switch parsing, parameter groups and scheduler semantics of train.py."""
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.optim import create_optimizer_v2
from torchvision import transforms as T

import timm_gcp  # noqa: F401
from timm_gcp.training.data import create_transforms
from timm_gcp.training.model import param_groups
from train import (
    DEFAULT_RECIPE, build_parser, command_line, create_scheduler, list_recipes, load_recipe, parse_config,
    parse_meta_layer_switch, public_command, public_flags)

ROOT = Path(__file__).resolve().parents[1]


def _lr_per_epoch(args):
    """The lr of each epoch under the scheduler train.py builds from `args`, over a one-parameter SGD."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched = create_scheduler(opt, args, updates_per_epoch=1)
    lrs = []
    for epoch in range(args.epochs):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]['lr'])
    return lrs


def test_every_recipe_loads_with_known_flags():
    names = list_recipes()
    assert {'finegrained_448', 'imagenet_65ep', 'imagenet_50ep_lradju', 'imagenet_30ep_lrfast', 'imagenet_100ep_lrnorm',
            DEFAULT_RECIPE} <= set(names)
    for name in names:
        args = parse_config(['--recipe', name])
        assert timm.is_model(args.model), name


def test_finegrained_recipe_values():
    args = parse_config(['--recipe', 'finegrained_448', '--data-dir', '/data/cub'])
    assert (args.img_size, args.batch_size, args.epochs, args.opt) == (448, 10, 100, 'sgd')
    assert (args.lr, args.momentum, args.weight_decay, args.head_lr_mult) == (1.2e-3, 0.9, 1e-4, 5.0)
    assert args.flip_test and args.smoothing == 0
    assert set(_lr_per_epoch(args)) == {1.2e-3}  # constant for all 100 epochs


@pytest.mark.parametrize('model', ['idccp_resnet50.a1_in1k', 'gcp_resnet50.a1_in1k', 'gcp_convnext_tiny.fb_in22k'])
def test_aerial_recipe_makes_any_gcp_backbone_idccp(model):
    args = parse_config(['--recipe', 'aerial_224', '--data-dir', '/data/aid', '--model', model, '--pretrained'])
    assert (args.img_size, args.crop_pct, args.batch_size, args.epochs, args.opt) == (224, 1.0, 16, 50, 'sgd')
    assert (args.lr, args.weight_decay, args.head_lr_mult, args.hflip) == (0.005, 1e-4, 5.0, 0.0)
    with torch.device('meta'):
        net = timm.create_model(model.split('.')[0], num_classes=30, **args.model_kwargs)
    assert net.group_invariance.group == 'd4' and net.head_hidden_size == 666  # 36 x 36, triu


def test_imagenet_65ep_steps_at_30_45_60():
    lrs = _lr_per_epoch(parse_config(['--recipe', 'imagenet_65ep']))
    assert len(lrs) == 65
    for epoch, expected in ((0, 0.1), (29, 0.1), (30, 0.01), (44, 0.01), (45, 1e-3), (59, 1e-3), (60, 1e-4),
                            (64, 1e-4)):
        assert lrs[epoch] == pytest.approx(expected), epoch


def test_lradju_poly_schedule_matches_formula():
    args = parse_config(['--recipe', 'imagenet_50ep_lradju'])
    lrs = _lr_per_epoch(args)
    expected = [0.1 * (1 - (e - 1) / 49) ** 2 for e in range(1, 51)]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_lrfast_poly_schedule_matches_formula():
    """CVPR'20 LRfast: power 11 over 52 epochs, training stopped after 30 (timm's poly stretched by cooldown -22)."""
    args = parse_config(['--recipe', 'imagenet_30ep_lrfast'])
    lrs = _lr_per_epoch(args)
    assert len(lrs) == 30
    assert lrs == pytest.approx([0.1 * (1 - (e - 1) / 52) ** 11 for e in range(1, 31)], abs=1e-12)


def test_lrnorm_steps_every_30_epochs():
    """CVPR'20 LRnorm: 0.1, x0.1 every 30 epochs, 100 epochs."""
    lrs = _lr_per_epoch(parse_config(['--recipe', 'imagenet_100ep_lrnorm']))
    assert lrs == pytest.approx([0.1 * 0.1 ** ((e - 1) // 30) for e in range(1, 101)], rel=1e-12)


def test_precedence_cli_over_config_over_recipe(tmp_path):
    config = tmp_path / 'cfg.yaml'
    config.write_text('lr: 0.5\nbatch-size: 7\ndata_dir: sub/data\n')
    args = parse_config(['--recipe', 'imagenet_65ep', '-c', str(config), '--lr', '0.25'])
    assert args.lr == 0.25                      # command line wins
    assert args.batch_size == 7                 # config file over recipe
    assert args.epochs == 65                    # recipe over flag default
    assert args.data_dir == str(tmp_path / 'sub' / 'data')  # YAML paths are relative to the YAML file


def test_default_recipe_points_at_bundled_data():
    args = parse_config([])
    assert args.recipe == DEFAULT_RECIPE
    assert (load_recipe(DEFAULT_RECIPE)['data_dir']).endswith('data/pets-mini')
    assert args.model.startswith('gcp_')


def test_a_users_data_never_inherits_the_demo_recipe(tmp_path):
    args = parse_config(['--data-dir', str(tmp_path), '--model', 'gcp_resnet18'])
    assert args.recipe == 'none'
    assert (args.img_size, args.model_kwargs, args.epochs, args.warmup_epochs) == (None, {}, 300, 0)
    assert parse_config(['--dataset', 'hfds/org/pets']).recipe == 'none'
    assert parse_config(['--epochs', '1']).recipe == DEFAULT_RECIPE        # no data named: the demo
    assert parse_config(['--data-dir', str(tmp_path), '--recipe', DEFAULT_RECIPE]).img_size == 64  # asked for


def test_help_shows_defaults():
    text = ' '.join(build_parser().format_help().split())
    for expected in ('(default: 0.1)', '(default: 300)', '(default: sgd)',
                     '--max-image-pixels', '(default: 89478485)'):
        assert expected in text, expected


def test_published_flags_and_command_hold_no_local_paths(tmp_path):
    secret = tmp_path / 'home-of-jdoe'
    data, out = secret / 'datasets' / 'cub', secret / 'runs' / 'r1'
    data.mkdir(parents=True)
    (secret / 'cfg.yaml').write_text('lr: 0.5\n')
    argv = ['--data-dir', str(data), '--model', 'gcp_resnet18', f'--output={out}', '-c', str(secret / 'cfg.yaml'),
            '--resume', str(out), '--backbone-weights', 'resnet18.a1_in1k', '--model-kwargs', 'gcp_dim=8']
    command = public_command(command_line(argv))
    assert command == ('python train.py --data-dir cub --model gcp_resnet18 -c cfg.yaml --backbone-weights '
                       'resnet18.a1_in1k --model-kwargs gcp_dim=8')
    flags = public_flags(parse_config(argv))
    assert flags['data_dir'] == 'cub' and flags['lr'] == 0.5 and flags['model_kwargs'] == {'gcp_dim': 8}
    assert not {'output', 'resume', 'config'} & set(flags)
    assert 'home-of-jdoe' not in repr(flags) and 'home-of-jdoe' not in command
    local = public_command(command_line(['--model', f'local-dir:{secret}/exported',
                                         f'--initial-checkpoint={out}/w.pt']))
    assert local == 'python train.py --model local-dir:exported --initial-checkpoint w.pt'
    (secret / 'pets_hf').mkdir()
    hub = public_command(command_line(['--dataset', f'hfds/{secret}/pets_hf', '--backbone-weights',
                                       'hf-hub:timm/resnet50.a1_in1k', '--data-dir', '.']))
    assert hub == f'python train.py --dataset hfds/pets_hf --backbone-weights hf-hub:timm/resnet50.a1_in1k ' \
                  f'--data-dir {Path.cwd().name}'
    assert public_flags(parse_config(['--dataset', 'hfds/org/pets']))['dataset'] == 'hfds/org/pets'  # a Hub id


def test_bad_config_inputs(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('learning_rate: 0.1\n')
    with pytest.raises(ValueError, match="unknown flag 'learning_rate'"):
        parse_config(['-c', str(bad)])
    with pytest.raises(ValueError, match='Unknown recipe'):
        parse_config(['--recipe', 'no_such_recipe'])
    with pytest.raises(ValueError, match='batch-size must be >= 1'):
        parse_config(['-b', '0'])
    assert parse_config(['--model-kwargs', 'gcp_dim=8', 'meta_layer=eig']).model_kwargs == {'gcp_dim': 8,
                                                                                          'meta_layer': 'eig'}
    with pytest.raises(SystemExit):                                      # argparse's usage error, exit 2
        parse_config(['--model-kwargs', 'gcp_dim'])


def test_parse_meta_layer_switch():
    assert parse_meta_layer_switch('svd_pade@45') == ('svd_pade', 45)
    assert parse_meta_layer_switch(None) is None
    for bad in ('svd_pade', 'svd_pade@', '@3', 'svd pade@3'):
        with pytest.raises(ValueError, match='NAME@EPOCH'):
            parse_meta_layer_switch(bad)


def test_param_groups_scale_classifier_lr_and_skip_decay_on_norms():
    model = timm.create_model('gcp_resnet18', num_classes=5, gcp_dim=8)
    groups = param_groups(model, weight_decay=1e-4, head_lr_mult=5.0)
    head = {id(p) for p in model.get_classifier().parameters()}
    for group in groups:
        is_head = {id(p) in head for p in group['params']}
        assert len(is_head) == 1
        assert group['lr_scale'] == (5.0 if is_head.pop() else 1.0)
        assert group['weight_decay'] == (0. if all(p.ndim <= 1 for p in group['params']) else 1e-4)
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))
    # the fine-grained recipe's optimizer and scheduler apply lr_scale: classifier at 5x the base lr
    args = parse_config(['--recipe', 'finegrained_448'])
    opt = create_optimizer_v2(param_groups(model, args.weight_decay, args.head_lr_mult), opt=args.opt, lr=args.lr,
                              weight_decay=args.weight_decay, momentum=args.momentum)
    create_scheduler(opt, args, updates_per_epoch=1)
    lrs = {g['lr_scale']: g['lr'] for g in opt.param_groups}
    assert lrs == pytest.approx({1.0: 1.2e-3, 5.0: 6e-3})
    assert {g['weight_decay'] for g in opt.param_groups} == {0., 1e-4}


def test_a_sched_without_timm_scheduler_is_refused():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="--sched 'none' gives no timm scheduler"):
        create_scheduler(opt, parse_config(['--sched', 'none']), updates_per_epoch=1)


def test_finegrained_transforms_are_resize_centre_crop():
    """Training: Resize(448) + CenterCrop(448) (+ flip); test: the same centre crop (GCP_FACTS fine-grained)."""
    args = parse_config(['--recipe', 'finegrained_448'])
    assert args.hflip == 0.5 and args.color_jitter == 0
    args.hflip = 0.                                               # compare the geometry without the random flip
    model = timm.create_model('gcp_resnet18', num_classes=3, gcp_dim=8)
    train_tf, eval_tf, cfg = create_transforms(model, asdict(args))
    y, x = torch.meshgrid(torch.arange(500.), torch.arange(640.), indexing='ij')
    img = Image.fromarray(torch.stack([x / 640 * 255, y / 500 * 255, (x + y) / 1140 * 255], -1).byte().numpy())
    reference = T.Compose([T.Resize(448, interpolation=T.InterpolationMode(cfg['interpolation'])), T.CenterCrop(448),
                           T.ToTensor(), T.Normalize(cfg['mean'], cfg['std'])])(img)
    torch.testing.assert_close(eval_tf(img), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(train_tf(img), reference, rtol=0, atol=0.05)  # crop-then-resize: interpolation only


def test_finegrained_convnext_recipe():
    args = parse_config(['--recipe', 'finegrained_convnext_448', '--data-dir', '/data/cub'])
    assert timm.is_model(args.model) and args.model.startswith('gcp_convnext')
    assert (args.img_size, args.opt, args.sched, args.pretrained) == (448, 'adamw', 'cosine', True)
    assert args.interpolation == '' and args.crop_pct == 1.0            # mean/std/interpolation: the tag's own
    lrs = _lr_per_epoch(args)
    assert lrs[0] == pytest.approx(1e-6) and max(lrs) == pytest.approx(1e-4, rel=1e-2)  # warm-up to the peak
    assert lrs[-1] < 2e-6 and lrs == sorted(lrs[:3]) + lrs[3:]                          # cosine down to min_lr


def test_a_pretrained_tag_brings_its_own_data_config():
    """`--model gcp_<name>.<tag>` without preprocessing flags: mean/std, interpolation, crop and size of the tag."""
    args = parse_config(['--data-dir', '/data/cub', '--model', 'gcp_test_convnext.r160_in1k'])
    model = timm.create_model(args.model, num_classes=3, gcp_dim=8)
    expected = model.pretrained_cfg
    assert expected['mean'] != (0.485, 0.456, 0.406)                    # not timm's ImageNet default
    _, eval_tf, data_config = create_transforms(model, asdict(args))
    for key in ('input_size', 'mean', 'std'):
        assert tuple(data_config[key]) == tuple(expected[key]), key
    assert (data_config['interpolation'], data_config['crop_pct']) == (expected['interpolation'], expected['crop_pct'])
    normalize = [t for t in eval_tf.transforms if isinstance(t, T.Normalize)][0]
    assert [float(m) for m in normalize.mean] == [0.5, 0.5, 0.5]


def test_help_imports_no_training_machinery():
    """`train.py --help` needs only the flags: torch, timm, accelerate, TensorBoard and the Hub tooling stay
    unimported (importing torch alone takes seconds)."""
    done = subprocess.run([sys.executable, '-X', 'importtime', str(ROOT / 'train.py'), '--help'], capture_output=True,
                          text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120, check=True)
    assert '--recipe' in done.stdout and 'recipes: ' + ', '.join(list_recipes()) in ' '.join(done.stdout.split())
    imported = {line.rsplit('|', 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith('import time')}
    assert 'yaml' in imported                                            # the check sees this process's imports
    assert not imported & {'torch', 'timm', 'timm_gcp', 'accelerate', 'tensorboard', 'datasets'}


@pytest.mark.slow
def test_recipes_ship_in_the_wheel(tmp_path):
    """A wheel holds the recipes and train.py finds them there, outside the checkout."""
    src = tmp_path / 'src'  # a copy of what the build reads: the build leaves its build/ folder there
    shutil.copytree(ROOT / 'timm_gcp', src / 'timm_gcp', ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(tmp_path / 'dist'), str(src)], check=True, timeout=600)
    wheel, = (tmp_path / 'dist').glob('timm_gcp-*.whl')
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / 'site')
    assert {f'timm_gcp/recipes/{name}.yaml' for name in list_recipes()} <= set(names)
    (tmp_path / 'script').mkdir()
    shutil.copy(ROOT / 'train.py', tmp_path / 'script' / 'train.py')  # train.py run outside the checkout
    script = ('import sys, train; assert str(train.RECIPES).startswith(sys.argv[1]), train.RECIPES; '
              'print(train.load_recipe("finegrained_448")["img_size"], len(train.list_recipes()))')
    pythonpath = os.pathsep.join([str(tmp_path / 'site'), str(tmp_path / 'script')])
    done = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'site')], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, 'PYTHONPATH': pythonpath, 'OMP_NUM_THREADS': '1'},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['448', str(len(list_recipes()))]
