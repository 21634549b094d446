"""Corruption robustness: Hendrycks & Dietterich's CE / mCE / relative mCE against a hand computation, deterministic
corruptions (runs, worker counts), every corruption on non-224 images, and `timm-gcp robustness` end to end: JSON,
Markdown, PNG, the model card, and one error line per kind of bad input with nothing written."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader

import timm_gcp  # noqa: F401
from timm_gcp.hub import export_model
from timm_gcp.hub.cli import main
from timm_gcp.hub.export import check_export_dir
from timm_gcp.hub.robustness import (
    CORRUPTIONS, Corruption, check_conditions, corruption_transform, summarize)
from timm_gcp.hub.verify import verify_folder
from timm_gcp.training.data import create_eval_dataset
from tiny_images import image_folder

DATA_CONFIG = {'input_size': (3, 32, 32), 'interpolation': 'bilinear', 'mean': (0.5,) * 3, 'std': (0.5,) * 3,
               'crop_pct': 1.0, 'crop_mode': 'center'}


def test_ce_mce_and_relative_mce_by_hand():
    model = {'clean': 10., 'corruptions': {'gaussian_noise': {1: 20., 2: 30.}, 'fog': {1: 40., 2: 60.}}}
    baseline = {'clean': 5., 'corruptions': {'gaussian_noise': {1: 30., 2: 50.}, 'fog': {1: 40., 2: 40.}}}
    s = summarize(model, baseline)
    # CE_c = 100 sum_s E_s,c / sum_s E^b_s,c: noise 50/80, fog 100/80
    assert s['ce'] == pytest.approx({'gaussian_noise': 62.5, 'fog': 125.0})
    assert s['mce'] == pytest.approx(93.75)
    # relative CE_c = 100 sum_s (E_s,c - E_clean) / sum_s (E^b_s,c - E^b_clean): noise 30/70, fog 80/70
    assert s['relative_ce'] == pytest.approx({'gaussian_noise': 300 / 7, 'fog': 800 / 7})
    assert s['relative_mce'] == pytest.approx(550 / 7)
    assert summarize(baseline, baseline)['mce'] == pytest.approx(100.)
    plain = summarize(model)  # no baseline: unnormalised means, labelled so
    assert not plain['normalized'] and 'mce' not in plain
    assert plain['mean_error'] == {'gaussian_noise': 25., 'fog': 50.}
    assert plain['mean_corruption_error'] == 37.5 and plain['relative_mean_corruption_error'] == 27.5


def test_undefined_ratios_are_none():
    model = {'clean': 10., 'corruptions': {'fog': {1: 10.}, 'snow': {1: 20.}}}
    perfect = {'clean': 0., 'corruptions': {'fog': {1: 0.}, 'snow': {1: 10.}}}
    s = summarize(model, perfect)
    assert s['ce'] == {'fog': None, 'snow': 200.} and s['mce'] is None
    with pytest.raises(ValueError, match='other corruptions or severities'):
        summarize(model, {'clean': 0., 'corruptions': {'fog': {2: 1.}, 'snow': {1: 1.}}})


@pytest.mark.parametrize('corruptions, severities, message', [
    (['gaussian_noise', 'fogg'], [1], "unknown corruption.*'fogg'"),
    (['fog'], [0, 3], 'from 1 to 5, got \\[0\\]'),
    (['fog'], [6], 'from 1 to 5'),
    (['fog'], [True], 'from 1 to 5'),
    ([], [1], 'unknown corruption'),
])
def test_bad_conditions(corruptions, severities, message):
    with pytest.raises(ValueError, match=message):
        check_conditions(corruptions, severities)


def test_conditions_default_to_imagenet_c():
    assert check_conditions() == (list(CORRUPTIONS), [1, 2, 3, 4, 5]) and len(CORRUPTIONS) == 15
    assert check_conditions(['fog', 'gaussian_noise'], [3, 1, 3]) == (['gaussian_noise', 'fog'], [1, 3])


@pytest.mark.parametrize('size', [(150, 150), (500, 375)])
def test_every_corruption_runs_on_non_224_images(size):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    np.random.seed(0)
    for name in CORRUPTIONS:
        out = Corruption(name, 3)(Image.fromarray(pixels))
        assert out.size == size and out.mode == 'RGB', name


def _corrupted(root, condition, seed, workers):
    dataset = replace(create_eval_dataset(root), seed=seed, transform=corruption_transform(DATA_CONFIG, condition))
    return torch.cat([x for x, _, _ in DataLoader(dataset, batch_size=3, num_workers=workers)])


@pytest.mark.parametrize('condition', [('gaussian_noise', 4), ('impulse_noise', 2)])  # numpy's RNG; a seed argument
def test_corruption_is_identical_across_runs_and_worker_counts(tmp_path, condition):
    root = image_folder(tmp_path / 'data', val=3)
    first = _corrupted(root, condition, seed=7, workers=0)
    assert torch.equal(first, _corrupted(root, condition, seed=7, workers=0))   # another run
    assert torch.equal(first, _corrupted(root, condition, seed=7, workers=2))   # other processes, other batches
    assert not torch.equal(first, _corrupted(root, condition, seed=8, workers=0))
    assert not torch.equal(first, _corrupted(root, None, seed=7, workers=0))    # the corruption did something


def test_input_smaller_than_the_corruptions_accept():
    with pytest.raises(ValueError, match='at least 32 x 32'):
        corruption_transform({**DATA_CONFIG, 'input_size': (3, 16, 16)}, ('fog', 1))


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    """A 2-class image folder and two tiny exported models of its classes, a GCP head and GAP."""
    root = tmp_path_factory.mktemp('robustness')
    image_folder(root / 'data')
    for name, kwargs in (('gcp', {}), ('gap', {'global_pool': 'avg'})):
        model = timm.create_model('gcp_resnet18', num_classes=2, gcp_dim=8, **kwargs)
        export_model(model, root / name, label_names=['cat', 'dog'], dataset='data', data_config=DATA_CONFIG)
    return root


def _run(*argv):
    return main(['robustness', *map(str, argv), '--workers', '0', '--no-progress'])


@pytest.mark.slow
def test_cli_end_to_end_with_baseline_and_card(study, tmp_path, capsys):
    out = tmp_path / 'out'
    assert _run(study / 'gcp', '--data-dir', study / 'data', '--baseline', study / 'gap', '--output', out,
                '--corruptions', 'fog,contrast', '--severities', '2', '--seed', '3', '--update-card') == 0
    printed = capsys.readouterr().out
    result = json.loads((out / 'robustness.json').read_text())
    assert (result['images'], result['classes'], result['corruptions'], result['severities']) == (
        10, 2, ['fog', 'contrast'], [2])  # ImageNet-C's order
    model, baseline = result['results']['model'], result['results']['baseline']
    errors, base = model['errors']['corruptions'], baseline['errors']['corruptions']
    for name in ('contrast', 'fog'):
        if base[name]['2'] > 0:
            assert model['normalized']['ce'][name] == pytest.approx(100 * errors[name]['2'] / base[name]['2'])
    assert baseline['normalized']['mce'] in (100., None)
    assert 'model gcp: clean error' in printed and 'images/s' in printed
    assert (out / 'robustness.png').read_bytes()[:4] == b'\x89PNG'
    table = (out / 'robustness.md').read_text()
    assert '| weather | fog |' in table and 'normalised by the baseline `gap`' in table
    card = (study / 'gcp' / 'README.md').read_text()
    assert card.count('## Corruption robustness') == 1 and 'validation split of `data`' in card
    assert card.index('## Corruption robustness') < card.index('## How to use')
    check_export_dir(study / 'gcp')                     # still fit to publish: no local path entered the card
    verify_folder(study / 'gcp')                        # and the export's manifest records the new card
    # the same seed gives the same numbers; a second --update-card replaces the section
    assert _run(study / 'gcp', '--data-dir', study / 'data', '--baseline', study / 'gap', '--output', tmp_path / 'again',
                '--corruptions', 'contrast,fog', '--severities', '2', '--seed', '3', '--update-card') == 0
    assert json.loads((tmp_path / 'again' / 'robustness.json').read_text())['results'] == result['results']
    assert (study / 'gcp' / 'README.md').read_text().count('## Corruption robustness') == 1


def test_cli_without_baseline_reports_unnormalised_errors(study, tmp_path, capsys):
    run = tmp_path / 'run'  # a train.py run folder: RUN/model
    export_model(timm.create_model('gcp_resnet18', num_classes=2, gcp_dim=8), run / 'model',
                 label_names=['cat', 'dog'], data_config=DATA_CONFIG)
    assert _run(run, '--data-dir', study / 'data', '--output', tmp_path / 'out', '--corruptions', 'brightness',
                '--severities', '1') == 0
    assert 'unnormalised: no --baseline' in capsys.readouterr().out
    result = json.loads((tmp_path / 'out' / 'robustness.json').read_text())
    assert result['baseline'] is None and set(result['results']) == {'model'}
    assert not result['results']['model']['unnormalized']['normalized']
    assert 'not CE/mCE' in (tmp_path / 'out' / 'robustness.md').read_text()


def _bad_data(root, case):
    if case == 'empty val split':
        (root / 'val').mkdir(parents=True)
    elif case == 'other classes':
        image_folder(root, classes=('cat', 'cow'), train=0, val=1)
    return root


@pytest.mark.parametrize('case, extra, message', [
    ('unknown corruption', ['--corruptions', 'fog,smog'], "unknown corruption.*'smog'"),
    ('severity', ['--severities', '0,6'], 'from 1 to 5'),
    ('empty val split', [], 'holds no class folders'),
    ('other classes', [], "classes model does not know: \\['cow'\\]"),
    ('baseline classes', ['--baseline', 'OTHER'], 'baseline has another class list'),
    ('timm name', ['--baseline', 'resnet18'], 'add --pretrained'),
    ('not a model', ['--baseline', 'NOWHERE'], 'neither a folder'),
    ('update card', ['--update-card', '--pretrained', '--baseline', 'GAP'], '--update-card needs a local export'),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(study, tmp_path, capsys, case, extra, message):
    data = _bad_data(tmp_path / 'data', case) if case in ('empty val split', 'other classes') else study / 'data'
    export_model(timm.create_model('gcp_resnet18', num_classes=3, gcp_dim=8), tmp_path / 'other',
                 label_names=['cat', 'dog', 'cow'], data_config=DATA_CONFIG)
    extra = [{'OTHER': tmp_path / 'other', 'NOWHERE': tmp_path / 'nowhere', 'GAP': study / 'gap'}.get(a, a)
             for a in extra]
    model = 'resnet18' if case == 'update card' else study / 'gcp'
    assert _run(model, '--data-dir', data, '--output', tmp_path / 'out', *extra) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('timm-gcp robustness: ')
    assert re.search(message, err), err
    assert not (tmp_path / 'out').exists()
