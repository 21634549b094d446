"""Recipes, flag precedence, meta-layer switch parsing, parameter groups and scheduler semantics of train.py."""
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import timm_gcp  # noqa: F401
from timm_gcp.training import (
    DEFAULT_RECIPE, list_recipes, load_recipe, param_groups, parse_args, parse_meta_layer_switch)


def _scheduler_for(args, updates_per_epoch=1):
    """The scheduler train.py builds from `args` (same call), over a one-parameter SGD."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched, _ = create_scheduler_v2(
        opt, args.sched, num_epochs=args.epochs - args.cooldown_epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)
    return opt, sched


def _lr_per_epoch(args):
    opt, sched = _scheduler_for(args)
    lrs = []
    for epoch in range(args.epochs):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]['lr'])
    return lrs


def test_every_recipe_loads_with_known_flags():
    names = list_recipes()
    assert {'finegrained_448', 'imagenet_65ep', 'imagenet_50ep_lradju', DEFAULT_RECIPE} <= set(names)
    for name in names:
        args = parse_args(['--recipe', name])
        assert timm.is_model(args.model), name


def test_finegrained_recipe_values():
    args = parse_args(['--recipe', 'finegrained_448', '--data-dir', '/data/cub'])
    assert (args.img_size, args.batch_size, args.epochs, args.opt) == (448, 10, 100, 'sgd')
    assert (args.lr, args.momentum, args.weight_decay, args.head_lr_mult) == (1.2e-3, 0.9, 1e-4, 5.0)
    assert args.flip_test and args.smoothing == 0
    assert set(_lr_per_epoch(args)) == {1.2e-3}  # constant for all 100 epochs


def test_imagenet_65ep_steps_at_30_45_60():
    lrs = _lr_per_epoch(parse_args(['--recipe', 'imagenet_65ep']))
    assert len(lrs) == 65
    for epoch, expected in ((0, 0.1), (29, 0.1), (30, 0.01), (44, 0.01), (45, 1e-3), (59, 1e-3), (60, 1e-4),
                            (64, 1e-4)):
        assert lrs[epoch] == pytest.approx(expected), epoch


def test_lradju_poly_schedule_matches_formula():
    args = parse_args(['--recipe', 'imagenet_50ep_lradju'])
    lrs = _lr_per_epoch(args)
    expected = [0.1 * (1 - (e - 1) / 49) ** 2 for e in range(1, 51)]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_precedence_cli_over_config_over_recipe(tmp_path):
    config = tmp_path / 'cfg.yaml'
    config.write_text('lr: 0.5\nbatch-size: 7\ndata_dir: sub/data\n')
    args = parse_args(['--recipe', 'imagenet_65ep', '-c', str(config), '--lr', '0.25'])
    assert args.lr == 0.25                      # command line wins
    assert args.batch_size == 7                 # config file over recipe
    assert args.epochs == 65                    # recipe over flag default
    assert args.data_dir == str(tmp_path / 'sub' / 'data')  # YAML paths are relative to the YAML file


def test_default_recipe_points_at_bundled_data():
    args = parse_args([])
    assert args.recipe == DEFAULT_RECIPE
    assert (load_recipe(DEFAULT_RECIPE)['data_dir']).endswith('data/pets-mini')
    assert args.model.startswith('gcp_')


def test_bad_config_inputs(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('learning_rate: 0.1\n')
    with pytest.raises(ValueError, match="unknown flag 'learning_rate'"):
        parse_args(['-c', str(bad)])
    with pytest.raises(ValueError, match='Unknown recipe'):
        parse_args(['--recipe', 'no_such_recipe'])
    with pytest.raises(ValueError, match='batch-size must be >= 1'):
        parse_args(['-b', '0'])


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
    # the timm scheduler applies lr_scale: classifier at 5x the base lr
    opt = create_optimizer_v2(groups, opt='sgd', lr=1.2e-3, weight_decay=1e-4, momentum=0.9)
    create_scheduler_v2(opt, 'step', num_epochs=10, decay_epochs=10, decay_rate=1.0)
    lrs = {g['lr_scale']: g['lr'] for g in opt.param_groups}
    assert lrs == pytest.approx({1.0: 1.2e-3, 5.0: 6e-3})
