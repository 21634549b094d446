"""hub/catalogue.yaml agrees with the tags timm_gcp registers, with convert's sources, and with the README table."""
import re
import runpy
from pathlib import Path

import pytest
import timm
from timm.models import get_pretrained_cfg

import timm_gcp  # noqa: F401  registers the GCP models
from timm_gcp.hub.catalogue import load_catalogue, recorded_sha256, render_table, replace_table
from timm_gcp.hub.convert import SOURCES
from timm_gcp.models import HUB_ORG, PRETRAINED_TAGS

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = load_catalogue(ROOT / 'hub' / 'catalogue.yaml')
TRAINED = [e for e in CATALOGUE if e.status != 'converted']


def test_catalogue_lists_exactly_the_registered_tags():
    registered = set(timm.list_pretrained('gcp_*')) | set(timm.list_pretrained('gsop_*'))
    assert {e.name for e in TRAINED} == registered


@pytest.mark.parametrize('entry', TRAINED, ids=lambda e: e.name)
def test_default_cfg_agrees(entry):
    cfg = get_pretrained_cfg(entry.name)
    assert (cfg.architecture, cfg.tag) == (entry.arch, entry.tag)
    assert cfg.input_size[1:] == (entry.resolution, entry.resolution)
    assert cfg.num_classes == entry.num_classes
    org, repo = entry.hub_id.split('/')
    assert cfg.hf_hub_id == f'{HUB_ORG}/{repo}' and repo == entry.name
    assert org == 'timm-gcp'  # the catalogue documents the project organisation (TIMM_GCP_HUB_ORG overrides cfgs)
    spec = PRETRAINED_TAGS[entry.tag]
    assert (spec.meta_layer, spec.dataset, spec.recipe) == (entry.meta_layer, entry.dataset, entry.recipe)
    assert (ROOT / entry.recipe).is_file()


@pytest.mark.parametrize('entry', [e for e in CATALOGUE if e.status == 'converted'], ids=lambda e: e.name)
def test_converted_entries_match_convert(entry):
    assert timm.is_model(entry.arch) and entry.recipe.startswith('python hub/convert.py ')
    assert f'--model {entry.arch}' in entry.recipe
    source = re.search(r'--source (\S+)', entry.recipe)
    assert SOURCES[source[1] if source else 'fast-mpn-cov'].meta_layer == entry.meta_layer


def test_readme_table_is_generated_from_the_catalogue():
    readme = (ROOT / 'README.md').read_text()
    assert replace_table(readme, render_table(CATALOGUE)) == readme, 'run: python hub/model_table.py --write'


def test_model_table_cli_rewrites_only_the_table(tmp_path):
    main = runpy.run_path(str(ROOT / 'hub' / 'model_table.py'))['main']
    readme = tmp_path / 'README.md'
    readme.write_text('intro\n<!-- model-table -->\n| stale |\n<!-- /model-table -->\noutro\n')
    assert main(['--readme', str(readme), '--write']) == 0
    assert readme.read_text() == ('intro\n<!-- model-table -->\n' + render_table(CATALOGUE) +
                                  '<!-- /model-table -->\noutro\n')
    for broken in ('no markers\n', '<!-- /model-table -->\n<!-- model-table -->\n'):
        readme.write_text(broken)
        assert main(['--readme', str(readme), '--write']) == 1 and readme.read_text() == broken


@pytest.mark.parametrize('change, message', [
    ("status: planned", "status must be one of"),
    ("hub_id: timm-gcp/x", "missing \\['hub_id'\\]"),
    ("status: published", "records its measured metrics and sha256"),
])
def test_malformed_catalogue(tmp_path, change, message):
    entry = ('{arch: a, tag: t, meta_layer: isqrt, dataset: d, resolution: 224, num_classes: 2, recipe: r, '
             'hub_id: timm-gcp/x, status: planned}')
    broken = {'status: planned': entry.replace('status: planned', 'status: unknown'),
              'hub_id: timm-gcp/x': entry.replace('hub_id: timm-gcp/x, ', ''),
              'status: published': entry.replace('status: planned', 'status: published')}[change]
    path = tmp_path / 'catalogue.yaml'
    path.write_text(f'models:\n  - {broken}\n')
    with pytest.raises(ValueError, match=message):
        load_catalogue(path)
    path.write_text(f'models:\n  - {entry}\n  - {entry}\n')
    with pytest.raises(ValueError, match='listed twice'):
        load_catalogue(path)


def test_recorded_sha256(tmp_path):
    path = tmp_path / 'catalogue.yaml'
    path.write_text('models:\n  - {arch: a, tag: t, meta_layer: isqrt, dataset: d, resolution: 224, num_classes: 2, '
                    'recipe: r, hub_id: org/a.t, status: published, metrics: {top1: 70.0, top5: 90.0}, '
                    'sha256: {model.safetensors: abc}}\n')
    entries = load_catalogue(path)
    assert recorded_sha256(entries, 'org/a.t') == {'model.safetensors': 'abc'}
    assert '| 70.00 / 90.00 |' in render_table(entries)
    with pytest.raises(ValueError, match='records no sha256 for org/other'):
        recorded_sha256(entries, 'org/other')
