"""hub/catalogue.yaml, every published, converted or planned GCP-trained weight: its check against timm's registry
and the README's model table."""
import os
from typing import Any, Dict, List, Union

import timm
import yaml

from .._text import preview

STATUSES = ('published', 'converted', 'planned')
TABLE_BEGIN, TABLE_END = '<!-- model-table -->\n', '<!-- /model-table -->'


_REQUIRED = ('arch', 'tag', 'meta_layer', 'dataset', 'resolution', 'num_classes', 'recipe', 'status')
# hub_id, metrics (measured top-1/top-5 %) and sha256 (as timm-gcp push printed them): published entries only
_OPTIONAL = ('hub_id', 'metrics', 'paper_top1', 'sha256', 'note')


def _entry(raw: Dict[str, Any], index: int) -> Dict[str, Any]:
    """A checked entry with all fields (absent optional ones None) and its timm `name`, arch.tag."""
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        raise ValueError(f'catalogue entry {index} ({raw.get("arch")}.{raw.get("tag")}): missing {missing}, '
                         f'unknown fields {unknown}')
    e = {**dict.fromkeys(_OPTIONAL), **raw, 'name': f"{raw['arch']}.{raw['tag']}"}
    if e['status'] not in STATUSES:
        raise ValueError(f"{e['name']}: status must be one of {STATUSES}, got {e['status']!r}")
    if e['status'] == 'published' and not (e['metrics'] and e['sha256'] and e['hub_id']):
        raise ValueError(f"{e['name']}: a published entry records its hub_id, measured metrics and sha256")
    if e['status'] != 'published' and e['hub_id']:
        raise ValueError(f"{e['name']}: a {e['status']} entry is not on the Hub; drop its hub_id")
    return e


def _planned(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The `planned` block's entries: every architecture of `archs` on every data set of `datasets`."""
    try:
        rows = []
        for arch in spec['archs']:
            for d in spec['datasets']:
                model = f"{arch}.{d['start']} --pretrained" if d.get('start') else arch
                rows.append(dict(arch=arch, tag=d['tag'], meta_layer=spec['meta_layer'], dataset=d['dataset'],
                                 resolution=d['resolution'], num_classes=d['num_classes'], status='planned',
                                 recipe=f"accelerate launch train.py --recipe {d['recipe']} --model {model} "
                                        f"--data-dir {d['data_dir']}",
                                 paper_top1=(d.get('paper_top1') or {}).get(arch)))
        return rows
    except (KeyError, TypeError) as e:
        raise ValueError(f'catalogue `planned` block: expected archs, meta_layer and datasets with tag, dataset, '
                         f'resolution, num_classes, recipe and data_dir; missing or malformed {e}') from e


def load_catalogue(path: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """The entries of a catalogue file (`models`, and those generated from `planned`); ValueError if malformed."""
    if not os.path.isfile(path):
        raise ValueError(f'no catalogue at {path}: it is hub/catalogue.yaml of a timm-gcp checkout (run from its root)')
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get('models'), list):
        raise ValueError(f'{path}: expected a mapping with a `models` list')
    raw = doc['models'] + (_planned(doc['planned']) if 'planned' in doc else [])
    entries = [_entry(r, i) for i, r in enumerate(raw)]
    names = [e['name'] for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f'{path}: {twice} listed twice')
    return entries


def check_registry(entries: List[Dict[str, Any]]) -> None:
    """ValueError unless the published entries are exactly the GCP tags timm registers with GCP-trained weights
    (a Hub repo outside `timm/`), each with the entry's Hub id, and no converted or planned entry is registered."""
    registered = set(timm.list_pretrained())
    for e in entries:
        if e['status'] == 'published':
            hub_id = timm.models.get_pretrained_cfg(e['name']).hf_hub_id if e['name'] in registered else None
            if hub_id != e['hub_id']:
                raise ValueError(f"{e['name']} is published as {e['hub_id']} but timm registers "
                                 f'{hub_id or "no such tag"}: register the tag with that hf_hub_id')
        elif e['name'] in registered:
            raise ValueError(f"{e['name']} is {e['status']}, not on the Hub, yet registered with timm: "
                             f'`pretrained=True` would fail; register it only once its weights are published')
    published = {e['name'] for e in entries if e['status'] == 'published'}
    unlisted = [name for name in timm.list_pretrained(['gcp_*', 'gsop_*']) if name not in published
                and not (timm.models.get_pretrained_cfg(name).hf_hub_id or '').startswith('timm/')]
    if unlisted:
        raise ValueError(f'{preview(unlisted)} are registered with GCP-trained weights but not published in the '
                         f'catalogue: add a published entry (hub_id, metrics, sha256) for each')


def recorded_sha256(entries: List[Dict[str, Any]], hub_id: str) -> Dict[str, str]:
    """{file: sha256} the catalogue records for the published repo `hub_id`; ValueError when it records none."""
    found = next((e['sha256'] for e in entries if e['hub_id'] == hub_id and e['sha256']), None)
    if not found:
        raise ValueError(f'the catalogue records no sha256 for {hub_id} (only published entries have them)')
    return dict(found)


def render_table(entries: List[Dict[str, Any]]) -> str:
    """The README's Markdown model table."""
    lines = ['| weights | meta-layer | dataset | res. | top-1 / top-5 (measured) | paper top-1 | how to get them |',
             '|---|---|---|---|---|---|---|']
    for e in entries:
        measured = f"{e['metrics']['top1']:.2f} / {e['metrics']['top5']:.2f}" if e['metrics'] else '—'
        paper = f"{e['paper_top1']:.2f}" if e['paper_top1'] is not None else '—'
        how = {'published': f"`timm.create_model('{e['name']}', pretrained=True)` (Hub: `{e['hub_id']}`)",
               'converted': f"not on the Hub; convert it yourself: `{e['recipe']}`"}.get(
            e['status'], f"not trained yet; train it yourself: `{e['recipe']}`")
        lines.append(f"| `{e['name']}` | {e['meta_layer']} | {e['dataset']} | {e['resolution']} | {measured} | "
                     f'{paper} | {how} |')
    return '\n'.join(lines) + '\n'


def replace_table(text: str, table: str) -> str:
    """`text` (a README) with its one `<!-- model-table -->` ... `<!-- /model-table -->` block holding `table`."""
    if text.count(TABLE_BEGIN) != 1 or text.count(TABLE_END) != 1 or text.index(TABLE_BEGIN) > text.index(TABLE_END):
        raise ValueError(f'expected exactly one {TABLE_BEGIN.strip()} ... {TABLE_END} block')
    head, rest = text.split(TABLE_BEGIN)
    return head + TABLE_BEGIN + table + TABLE_END + rest.split(TABLE_END)[1]
