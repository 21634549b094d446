"""hub/catalogue.yaml against timm's registry (published = a registered tag, converted/planned = not registered),
against convert's sources and train.py's recipes, and the README table generated from it."""
import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import timm
from timm.models import _registry

import timm_gcp  # noqa: F401  registers the GCP models
from timm_gcp.hub.catalogue import check_registry, load_catalogue, recorded_sha256, render_table, replace_table
from timm_gcp.hub.cli import main
from timm_gcp.hub.convert import SOURCES
from train import list_recipes

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = load_catalogue(ROOT / 'hub' / 'catalogue.yaml')
ENTRY = ('{arch: gcp_resnet18, tag: t, meta_layer: isqrt, dataset: d, resolution: 224, num_classes: 2, '
         'recipe: r, status: planned}')
PUBLISHED = ('{arch: gcp_resnet18, tag: TAG, meta_layer: isqrt, dataset: d, resolution: 224, num_classes: 2, '
             'recipe: r, status: published, hub_id: HUB_ID, metrics: {top1: 70.0, top5: 90.0}, '
             'sha256: {model.safetensors: abc}}')


def _catalogue(tmp_path: Path, *entries: str) -> Path:
    path = tmp_path / 'catalogue.yaml'
    path.write_text('models:\n' + ''.join(f'  - {e}\n' for e in entries))
    return path


def test_catalogue_agrees_with_the_registry():
    """Nothing the table lists as not on the Hub is a registered tag, so `pretrained=True` never announces it."""
    check_registry(CATALOGUE)
    registered = set(timm.list_pretrained('gcp_*')) | set(timm.list_pretrained('gsop_*'))
    for entry in CATALOGUE:
        assert (entry['name'] in registered) == (entry['status'] == 'published'), entry['name']
        if entry['status'] != 'published':
            with pytest.raises((RuntimeError, ValueError), match='pretrained tag'):  # timm's or timm_gcp's message
                timm.create_model(entry['name'], pretrained=True)


def test_check_registry_refuses_a_registered_planned_tag_and_an_unregistered_published_one(tmp_path):
    registered = next(t for t in timm.list_pretrained('gcp_resnet18.*'))
    tag = registered.split('.', 1)[1]
    hub_id = timm.models.get_pretrained_cfg(registered).hf_hub_id
    planned = load_catalogue(_catalogue(tmp_path, ENTRY.replace('tag: t', f'tag: {tag}')))
    with pytest.raises(ValueError, match=f'{re.escape(registered)} is planned, not on the Hub, yet registered'):
        check_registry(planned)
    published = load_catalogue(_catalogue(tmp_path, PUBLISHED.replace('TAG', 'not_a_tag').replace('HUB_ID', 'o/x')))
    with pytest.raises(ValueError, match='published as o/x but timm registers no such tag'):
        check_registry(published)
    wrong_repo = load_catalogue(_catalogue(tmp_path, PUBLISHED.replace('TAG', tag).replace('HUB_ID', 'o/x')))
    with pytest.raises(ValueError, match=f'published as o/x but timm registers {re.escape(hub_id)}'):
        check_registry(wrong_repo)
    check_registry(load_catalogue(_catalogue(tmp_path, PUBLISHED.replace('TAG', tag).replace('HUB_ID', hub_id))))


def test_check_registry_refuses_gcp_trained_weights_the_catalogue_does_not_publish(tmp_path, monkeypatch):
    """A tag registered with weights outside `timm/` (trained with a GCP head) must be a published catalogue entry."""
    name, hub_id = 'gcp_resnet18.gcp_in1k', 'timm-gcp/gcp_resnet18.gcp_in1k'
    cfg = dataclasses.replace(timm.models.get_pretrained_cfg('gcp_resnet18'), hf_hub_id=hub_id)
    monkeypatch.setitem(_registry._model_pretrained_cfgs, name, cfg)  # registered for this test only
    monkeypatch.setitem(_registry._model_with_tags, 'gcp_resnet18', _registry._model_with_tags['gcp_resnet18'] + [name])
    monkeypatch.setattr(_registry, '_model_has_pretrained', _registry._model_has_pretrained | {name})
    assert name in timm.list_pretrained('gcp_resnet18.*')
    with pytest.raises(ValueError, match=r"gcp_resnet18.gcp_in1k are registered with GCP-trained weights"):
        check_registry(CATALOGUE)
    check_registry(load_catalogue(_catalogue(tmp_path, PUBLISHED.replace('TAG', 'gcp_in1k').replace('HUB_ID', hub_id))))


@pytest.mark.parametrize('status', ['converted', 'planned'])
def test_table_says_how_to_get_what_is_not_on_the_hub(status):
    entries = [e for e in CATALOGUE if e['status'] == status]
    assert entries
    table = render_table(entries)
    prefix = {'converted': 'not on the Hub; convert it yourself', 'planned': 'not trained yet; train it yourself'}
    for entry in entries:
        row = next(line for line in table.splitlines() if line.startswith(f"| `{entry['name']}` |"))
        assert f"{prefix[status]}: `{entry['recipe']}`" in row and 'Hub:' not in row


def test_published_row_shows_the_loading_call(tmp_path):
    entries = load_catalogue(_catalogue(tmp_path, PUBLISHED.replace('TAG', 'x').replace('HUB_ID', 'org/r')))
    assert "`timm.create_model('gcp_resnet18.x', pretrained=True)` (Hub: `org/r`)" in render_table(entries)


@pytest.mark.parametrize('entry', [e for e in CATALOGUE if e['status'] == 'converted'], ids=lambda e: e['name'])
def test_converted_entries_match_convert(entry):
    assert timm.is_model(entry['arch']) and entry['recipe'].startswith('timm-gcp convert ')
    assert f"--model {entry['arch']}" in entry['recipe'] and '--output ' in entry['recipe']
    source = re.search(r'--source (\S+)', entry['recipe'])
    assert SOURCES[source[1] if source else 'fast-mpn-cov'].meta_layer == entry['meta_layer']


@pytest.mark.parametrize('entry', [e for e in CATALOGUE if e['status'] == 'planned'], ids=lambda e: e['name'])
def test_planned_commands_name_a_recipe_and_a_loadable_start(entry):
    """The command trains with a shipped recipe, from scratch or from a registered pretrained tag."""
    words = shlex.split(entry['recipe'])
    assert words[:3] == ['accelerate', 'launch', 'train.py']
    assert words[words.index('--recipe') + 1] in list_recipes()
    model = words[words.index('--model') + 1]
    assert model.split('.')[0] == entry['arch']
    assert ('--pretrained' in words) == ('.' in model)
    if '--pretrained' in words:
        assert model in timm.list_pretrained(model)


def test_planned_block_generates_every_architecture_on_every_data_set(tmp_path):
    path = tmp_path / 'catalogue.yaml'
    path.write_text('''models: []
planned:
  archs: [gcp_resnet18, gsop_resnet50]
  meta_layer: isqrt
  datasets:
    - {tag: in1k, dataset: ImageNet-1k, resolution: 224, num_classes: 1000, recipe: imagenet_65ep,
       data_dir: IMAGENET, paper_top1: {gsop_resnet50: 78.81}}
    - {tag: ft_cub, dataset: CUB, resolution: 448, num_classes: 200, recipe: finegrained_448, data_dir: CUB,
       start: a1_in1k}
''')
    entries = load_catalogue(path)
    assert [(e['name'], e['status'], e['paper_top1']) for e in entries] == [
        ('gcp_resnet18.in1k', 'planned', None), ('gcp_resnet18.ft_cub', 'planned', None),
        ('gsop_resnet50.in1k', 'planned', 78.81), ('gsop_resnet50.ft_cub', 'planned', None)]
    assert entries[3]['recipe'] == ('accelerate launch train.py --recipe finegrained_448 '
                                    '--model gsop_resnet50.a1_in1k --pretrained --data-dir CUB')
    assert entries[0]['recipe'] == ('accelerate launch train.py --recipe imagenet_65ep --model gcp_resnet18 '
                                    '--data-dir IMAGENET')
    path.write_text('models: []\nplanned: {archs: [gcp_resnet18], meta_layer: isqrt, datasets: [{tag: t}]}\n')
    with pytest.raises(ValueError, match='`planned` block: .* missing or malformed'):
        load_catalogue(path)


def test_readme_table_is_generated_from_the_catalogue():
    readme = (ROOT / 'README.md').read_text()
    assert replace_table(readme, render_table(CATALOGUE)) == readme, 'run: timm-gcp model-table --write'


def test_model_table_cli_rewrites_only_the_table(tmp_path, capsys):
    catalogue = _catalogue(tmp_path, ENTRY)
    readme = tmp_path / 'README.md'
    readme.write_text('intro\n<!-- model-table -->\n| stale |\n<!-- /model-table -->\noutro\n')
    assert main(['model-table', '--catalogue', str(catalogue), '--readme', str(readme), '--write']) == 0
    assert readme.read_text() == ('intro\n<!-- model-table -->\n' + render_table(load_catalogue(catalogue)) +
                                  '<!-- /model-table -->\noutro\n')
    for broken in ('no markers\n', '<!-- /model-table -->\n<!-- model-table -->\n'):
        readme.write_text(broken)
        assert main(['model-table', '--catalogue', str(catalogue), '--readme', str(readme), '--write']) == 1
        assert readme.read_text() == broken
    assert main(['model-table', '--catalogue', str(tmp_path / 'none.yaml')]) == 1
    assert f"no catalogue at {tmp_path / 'none.yaml'}" in capsys.readouterr().err


def test_model_table_cli_refuses_a_catalogue_that_disagrees_with_the_registry(tmp_path, capsys):
    registered = timm.list_pretrained('gcp_resnet18.*')[0]
    catalogue = _catalogue(tmp_path, ENTRY.replace('tag: t', f"tag: {registered.split('.', 1)[1]}"))
    readme = tmp_path / 'README.md'
    readme.write_text('<!-- model-table -->\n| stale |\n<!-- /model-table -->\n')
    assert main(['model-table', '--catalogue', str(catalogue), '--readme', str(readme), '--write']) == 1
    assert 'yet registered with timm' in capsys.readouterr().err
    assert '| stale |' in readme.read_text()


@pytest.mark.parametrize('change, message', [
    ('status: unknown', 'status must be one of'),
    ('no recipe', r"missing \['recipe'\]"),
    ('published without records', 'records its hub_id, measured metrics and sha256'),
    ('planned with a hub_id', 'a planned entry is not on the Hub; drop its hub_id'),
])
def test_malformed_catalogue(tmp_path, change, message):
    broken = {'status: unknown': ENTRY.replace('status: planned', 'status: unknown'),
              'no recipe': ENTRY.replace('recipe: r, ', ''),
              'published without records': ENTRY.replace('status: planned', 'status: published'),
              'planned with a hub_id': ENTRY.replace('status: planned', 'status: planned, hub_id: o/x')}[change]
    with pytest.raises(ValueError, match=message):
        load_catalogue(_catalogue(tmp_path, broken))
    with pytest.raises(ValueError, match='listed twice'):
        load_catalogue(_catalogue(tmp_path, ENTRY, ENTRY))


def test_recorded_sha256(tmp_path):
    entries = load_catalogue(_catalogue(tmp_path, PUBLISHED.replace('TAG', 't').replace('HUB_ID', 'org/a.t')))
    assert recorded_sha256(entries, 'org/a.t') == {'model.safetensors': 'abc'}
    assert '| 70.00 / 90.00 |' in render_table(entries)
    with pytest.raises(ValueError, match='records no sha256 for org/other'):
        recorded_sha256(entries, 'org/other')
