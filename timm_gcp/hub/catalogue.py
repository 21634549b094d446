"""The catalogue of every published, converted or planned GCP-trained weight (hub/catalogue.yaml), its check
against timm's registry and its README table."""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import timm
import yaml

__all__ = ['CatalogueEntry', 'check_registry', 'load_catalogue', 'recorded_sha256', 'render_table', 'replace_table',
           'STATUSES']

STATUSES = ('published', 'converted', 'planned')
TABLE_BEGIN, TABLE_END = '<!-- model-table -->\n', '<!-- /model-table -->'
_FIELDS = ('arch', 'tag', 'meta_layer', 'dataset', 'resolution', 'num_classes', 'recipe', 'status')


@dataclass(frozen=True)
class CatalogueEntry:
    arch: str
    tag: str
    meta_layer: str
    dataset: str
    resolution: int
    num_classes: int
    recipe: str  # the command that produces the weights
    status: str
    hub_id: Optional[str] = None  # published entries only
    metrics: Optional[Dict[str, float]] = None  # measured top-1/top-5 (%) of the published weights
    paper_top1: Optional[float] = None  # what the papers report for this architecture and data
    sha256: Optional[Dict[str, str]] = None  # of the published files, as timm-gcp push printed them
    note: str = ''

    @property
    def name(self) -> str:
        return f'{self.arch}.{self.tag}'


def _entry(raw: dict, index: int) -> CatalogueEntry:
    missing = [k for k in _FIELDS if raw.get(k) is None]
    unknown = sorted(set(raw) - set(CatalogueEntry.__dataclass_fields__))
    if missing or unknown:
        raise ValueError(f'catalogue entry {index} ({raw.get("arch")}.{raw.get("tag")}): missing {missing}, '
                         f'unknown fields {unknown}')
    entry = CatalogueEntry(**raw)
    if entry.status not in STATUSES:
        raise ValueError(f'{entry.name}: status must be one of {STATUSES}, got {entry.status!r}')
    if entry.status == 'published' and not (entry.metrics and entry.sha256 and entry.hub_id):
        raise ValueError(f'{entry.name}: a published entry records its hub_id, measured metrics and sha256')
    if entry.status != 'published' and entry.hub_id:
        raise ValueError(f'{entry.name}: a {entry.status} entry is not on the Hub; drop its hub_id')
    return entry


def _planned_entries(spec: dict) -> List[dict]:
    """Raw planned entries of the catalogue's `planned` block: every architecture on every data set."""
    try:
        rows = []
        for arch in spec['archs']:
            for d in spec['datasets']:
                model = f"{arch}.{d['start']} --pretrained" if d.get('start') else arch
                recipe = f"accelerate launch train.py --recipe {d['recipe']} --model {model} --data-dir {d['data_dir']}"
                rows.append(dict(arch=arch, tag=d['tag'], meta_layer=spec['meta_layer'], dataset=d['dataset'],
                                 resolution=d['resolution'], num_classes=d['num_classes'], recipe=recipe,
                                 status='planned', paper_top1=(d.get('paper_top1') or {}).get(arch)))
        return rows
    except (KeyError, TypeError) as e:
        raise ValueError(f'catalogue `planned` block: expected archs, meta_layer and datasets with tag, dataset, '
                         f'resolution, num_classes, recipe and data_dir; missing or malformed {e}') from e


def load_catalogue(path: Union[str, os.PathLike]) -> List[CatalogueEntry]:
    """Entries of a catalogue YAML file (a `models` list and an optional `planned` block that generates planned
    entries); ValueError on a malformed entry."""
    if not os.path.isfile(path):
        raise ValueError(f'no catalogue at {path}: it is hub/catalogue.yaml of a timm-gcp checkout (run from its root)')
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get('models'), list):
        raise ValueError(f'{path}: expected a mapping with a `models` list')
    raw = doc['models'] + (_planned_entries(doc['planned']) if 'planned' in doc else [])
    entries = [_entry(r, i) for i, r in enumerate(raw)]
    seen = set()
    for entry in entries:
        if entry.name in seen:
            raise ValueError(f'{path}: {entry.name} is listed twice')
        seen.add(entry.name)
    return entries


def check_registry(entries: List[CatalogueEntry]) -> None:
    """ValueError unless the catalogue's published entries are exactly the GCP tags timm knows with GCP-trained
    weights (any Hub repo outside `timm/`), each with the entry's Hub id, and no converted or planned entry is
    registered (timm would announce weights that cannot load)."""
    registered = set(timm.list_pretrained())
    for e in entries:
        if e.status == 'published':
            hub_id = timm.models.get_pretrained_cfg(e.name).hf_hub_id if e.name in registered else None
            if hub_id != e.hub_id:
                raise ValueError(f'{e.name} is published as {e.hub_id} but timm registers '
                                 f'{hub_id or "no such tag"}: register the tag with that hf_hub_id')
        elif e.name in registered:
            raise ValueError(f'{e.name} is {e.status}, not on the Hub, yet registered with timm: '
                             f'`pretrained=True` would fail; register it only once its weights are published')
    published = {e.name for e in entries if e.status == 'published'}
    unlisted = [name for name in timm.list_pretrained(['gcp_*', 'gsop_*']) if name not in published
                and not (timm.models.get_pretrained_cfg(name).hf_hub_id or '').startswith('timm/')]
    if unlisted:
        raise ValueError(f'{unlisted[:5]} are registered with GCP-trained weights but not published in the '
                         f'catalogue: add a published entry (hub_id, metrics, sha256) for each')


def recorded_sha256(entries: List[CatalogueEntry], hub_id: str) -> Dict[str, str]:
    """{file: sha256} the catalogue records for the published repo `hub_id`; ValueError when it records none."""
    for entry in entries:
        if entry.hub_id == hub_id and entry.sha256:
            return dict(entry.sha256)
    raise ValueError(f'the catalogue records no sha256 for {hub_id} (only published entries have them)')


def _accuracy(entry: CatalogueEntry) -> str:
    if not entry.metrics:
        return '—'
    return f"{entry.metrics['top1']:.2f} / {entry.metrics['top5']:.2f}"


def _how_to_get(entry: CatalogueEntry) -> str:
    if entry.status == 'published':
        return f"`timm.create_model('{entry.name}', pretrained=True)` (Hub: `{entry.hub_id}`)"
    if entry.status == 'converted':
        return f'not on the Hub; convert it yourself: `{entry.recipe}`'
    return f'not trained yet; train it yourself: `{entry.recipe}`'


def render_table(entries: List[CatalogueEntry]) -> str:
    """The README's Markdown model table."""
    lines = ['| weights | meta-layer | dataset | res. | top-1 / top-5 (measured) | paper top-1 | how to get them |',
             '|---|---|---|---|---|---|---|']
    for e in entries:
        paper = f'{e.paper_top1:.2f}' if e.paper_top1 is not None else '—'
        lines.append(f'| `{e.name}` | {e.meta_layer} | {e.dataset} | {e.resolution} | {_accuracy(e)} | {paper} | '
                     f'{_how_to_get(e)} |')
    return '\n'.join(lines) + '\n'


def replace_table(text: str, table: str) -> str:
    """`text` (a README) with its one `<!-- model-table -->` ... `<!-- /model-table -->` block holding `table`."""
    if text.count(TABLE_BEGIN) != 1 or text.count(TABLE_END) != 1 or text.index(TABLE_BEGIN) > text.index(TABLE_END):
        raise ValueError(f'expected exactly one {TABLE_BEGIN.strip()} ... {TABLE_END} block')
    head, rest = text.split(TABLE_BEGIN)
    return head + TABLE_BEGIN + table + TABLE_END + rest.split(TABLE_END)[1]
