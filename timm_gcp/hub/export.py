"""Write a Hub-ready folder (model.safetensors, config.json, README.md) for any timm model, atomically, and check one
before publishing: nothing non-finite, no local path or user name, a card timm's Hub loading accepts."""
import copy
import getpass
import glob
import inspect
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open
from timm.models import save_for_hf
from torch import nn

from .. import __version__
from .._text import first_not_utf8, preview
from ..layers import GCPPool
from ..training.model import nonfinite_tensors
from .manifest import MANIFEST_NAME, build_manifest

EXPORT_FILES = ('model.safetensors', 'config.json', 'README.md')
REPO_ID_PLACEHOLDER = '<repo-id>'  # push_model writes the real repo id into the uploaded card
_TOP_K = {'top-1 accuracy': 'top1', 'top-5 accuracy': 'top5'}  # the card's model-index metric names
_DATA_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
_SOURCE_KEYS = ('tag', 'notes', 'origin_url', 'paper_ids', 'paper_name')  # they describe the weights a run starts from


def _check_finite_tensors(tensors: Iterable[Tuple[str, torch.Tensor]], what: str) -> None:
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f'{what} has {len(bad)} non-finite tensors (NaN/Inf): {preview(bad)}; the run diverged; '
                         f'refusing to publish it')


def _check_finite_metrics(metrics: Mapping[str, Any], what: str) -> None:
    bad = {k: v for k, v in metrics.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise ValueError(f'{what} must be finite numbers, got {bad}: refusing to publish them')


def _check_label_names(label_names: Any, what: str) -> None:
    """TypeError unless a sequence of str; ValueError naming the first that is not valid UTF-8 text (a file name in
    another encoding, decoded by Python with surrogate escapes)."""
    if isinstance(label_names, str) or not all(isinstance(n, str) for n in label_names):
        raise TypeError(f'{what} must be a sequence of str, got {type(label_names).__name__}')
    bad = first_not_utf8(label_names)
    if bad is not None:
        raise ValueError(f'{what} holds {ascii(bad)}, which is not valid UTF-8 text (a class folder named in another '
                         f'encoding?): rename it')


def _check_no_local_paths(name: str, text: str) -> None:
    """Refuse an absolute path under a top-level folder of this machine, a Windows drive path or the login name
    ('root' names no person and is a word of cards: "matrix square root")."""
    roots = sorted((p.name for p in Path('/').iterdir() if p.is_dir()), key=len, reverse=True)
    patterns = [r'\b[A-Za-z]:\\[^\s"\'`]*',
                r'(?<![\w.:/~-])/(?:%s)(?![\w.-])[^\s"\'`),\]]*' % '|'.join(map(re.escape, roots))]
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name in the environment nor in the password database
        user = 'root'
    if user != 'root':
        patterns.append(r'(?<![\w-])%s(?![\w-])' % re.escape(user))
    found = re.search('|'.join(patterns), text)
    if found:
        raise ValueError(f'{name} would publish {found[0]!r}: published files must not hold absolute paths, the home '
                         f'directory or the user name of this machine (name data sets by their folder name or Hub id)')


def citations(model: nn.Module) -> List[str]:
    """BibTeX of the papers behind the modules of `model` (the `papers` of its GCP pooling, meta-layer, GSoP
    blocks), in model order, each once."""
    return list(dict.fromkeys(paper for module in model.modules() for paper in getattr(module, 'papers', ())))


def card_metrics(card: ModelCard) -> Dict[str, float]:
    """{'top1': .., 'top5': ..} from a card's model-index (what verify compares against)."""
    results = card.data.eval_results or []
    return {_TOP_K[r.metric_name]: float(r.metric_value) for r in results if r.metric_name in _TOP_K}


def _model_card(model: nn.Module, config: Dict[str, Any], args: Dict[str, Any], dataset: Optional[str],
                metrics: Mapping[str, Any], recipe: Optional[Mapping[str, Any]], command: Optional[str],
                base_model: Optional[str], repo_id: str) -> ModelCard:
    """The card: YAML metadata (library_name timm, base_model, model-index top-1/top-5), details, results, training
    recipe and command, usage and the citations of the papers that apply."""
    arch = config['architecture']
    pool = next((m for m in model.modules() if isinstance(m, GCPPool)), None)
    meta_layer = pool.meta_layer_name if pool else None
    results = [EvalResult(task_type='image-classification', dataset_type=dataset or 'unknown',
                          dataset_name=dataset or 'unknown', dataset_split='validation', metric_type='accuracy',
                          metric_name=name, metric_value=round(float(metrics[key]), 2))
               for name, key in _TOP_K.items() if metrics.get(key) is not None]
    data = ModelCardData(library_name='timm', pipeline_tag='image-classification',
                         tags=['image-classification', 'timm', 'timm-gcp'],
                         license=model.pretrained_cfg.get('license') or 'apache-2.0', base_model=base_model,
                         datasets=[dataset] if dataset else None,
                         model_name=repo_id.split('/')[-1] if results else None, eval_results=results or None)
    gcp_dim = args.get('gcp_dim')
    details = {
        'architecture': f'`{arch}`',
        'started from': f'[`{base_model}`](https://huggingface.co/{base_model})' if base_model
        else 'no Hub weights (from scratch or a local file)',
        'meta-layer': f'`{meta_layer}`' if meta_layer else 'none (no covariance pooling head)',
        'GCP dimension': f'{gcp_dim} ({pool.out_features:,} features)' if pool else None,
        'input size': ' x '.join(map(str, config['pretrained_cfg']['input_size'])),
        'classes': str(model.num_classes),
        'parameters': f'{sum(p.numel() for p in model.parameters()):,}',
        'model_args': f'`{json.dumps(args, sort_keys=True)}`',
    }
    lines = [f'# {arch}' + (f' on {dataset}' if dataset else ''), '',
             'Image classification model' + (' with global covariance pooling' if meta_layer else '')
             + ', exported with timm-gcp.', '', '## Model details', '', '| | |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in details.items() if v is not None]
    if metrics:
        lines += ['', '## Results', '', f'Measured on the validation split of `{dataset or "unknown"}` '
                  '(accuracy in %).', '', '| metric | value |', '|---|---|']
        lines += [f'| {k} | {v:.2f} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in metrics.items()]
    if recipe or command:
        lines += ['', '## Training', '']
        if command:
            lines += ['Exact command:', '', '```bash', command, '```', '']
        if recipe:
            lines += ['Full recipe:', '', '```yaml', yaml.safe_dump(dict(recipe), sort_keys=True).rstrip(), '```']
    lines += ['', '## How to use', '', f"""timm has no plugin entry points, so import `timm_gcp` first: it registers the GCP
architectures.

```python
import timm
import timm_gcp  # registers gcp_* / gsop_*

model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
# logits = model(transform(image).unsqueeze(0))
```

Fine-tune on another dataset: `timm.create_model('hf-hub:{repo_id}', pretrained=True, num_classes=N)` replaces only
the classifier."""]
    bibtex = citations(model)
    if bibtex:
        lines += ['', '## Citation', '', '```bibtex', '\n\n'.join(bibtex), '```']
    return ModelCard(f'---\n{data.to_yaml()}\n---\n\n' + '\n'.join(lines) + '\n')  # ValueError if YAML is bad


def _replace_dir(staged: Path, output_dir: Path) -> None:
    """Move `staged` to `output_dir`; an earlier export there is swapped out only after the new one is complete."""
    old = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f'.{output_dir.name}.old-')) / 'export'
    if output_dir.exists():
        os.replace(output_dir, old)
    try:
        os.replace(staged, output_dir)
    except BaseException:
        if old.exists():
            os.replace(old, output_dir)  # the earlier export goes back
        raise
    finally:
        shutil.rmtree(old.parent)


def remove_staging(output_dir: Union[str, os.PathLike]) -> None:
    """Remove what an interrupted export to `output_dir` left beside it (`.NAME.tmp-*`, `.NAME.old-*`); an earlier
    export caught between its two renames goes back in place first. One export per folder at a time."""
    output_dir = Path(output_dir)
    name = glob.escape(output_dir.name)
    for old in sorted(output_dir.parent.glob(f'.{name}.old-*')):
        if (old / 'export').is_dir() and not output_dir.exists():
            os.replace(old / 'export', output_dir)
        shutil.rmtree(old)
    for staged in output_dir.parent.glob(f'.{name}.tmp-*'):
        shutil.rmtree(staged)


def record_manifest(folder: Union[str, os.PathLike]) -> None:
    """Write the folder's timm_gcp_manifest.json: the sha256 and size of its EXPORT_FILES, which `timm-gcp verify`
    checks (export_model calls it; so should a tool that changes an export's file on purpose)."""
    folder = Path(folder)
    architecture = json.loads((folder / 'config.json').read_text())['architecture']
    (folder / MANIFEST_NAME).write_bytes(build_manifest({name: folder / name for name in EXPORT_FILES},
                                                        architecture=architecture, timm_gcp_version=__version__))


def export_model(model: nn.Module, output_dir: Union[str, os.PathLike], *, label_names: Sequence[str],
                 metrics: Optional[Mapping[str, Any]] = None, recipe: Optional[Mapping[str, Any]] = None,
                 command: Optional[str] = None, dataset: Optional[str] = None,
                 data_config: Optional[Mapping[str, Any]] = None, repo_id: str = REPO_ID_PLACEHOLDER,
                 base_model: Optional[str] = None) -> Path:
    """Write model.safetensors, config.json (timm format, label names, model_args), README.md and the sha256 manifest
    of the three, complete or not at all (an earlier export stays intact on any failure; what an interrupted export
    left beside the folder is removed first). `data_config` overrides the recorded preprocessing;
    `base_model` is the Hub id of the weights the run started from."""
    output_dir = Path(output_dir)
    _check_label_names(label_names, 'label_names')
    if len(label_names) != model.num_classes:
        raise ValueError(f'label_names has {len(label_names)} entries but the model has {model.num_classes} classes')
    _check_finite_tensors(model.state_dict().items(), f'{type(model).__name__} state dict')
    _check_finite_metrics(metrics or {}, 'metrics')
    written = (*EXPORT_FILES, MANIFEST_NAME)
    foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in written) if output_dir.exists() else []
    if foreign:
        raise ValueError(f'export target {output_dir} holds files an export would lose: {foreign}')
    # timm 1.0.29 records no model_args by itself; 1.0.31 adds what create_model recorded, explicit values winning
    model_args = {**(model.gcp_model_args() if hasattr(model, 'gcp_model_args') else {}),
                  'num_classes': model.num_classes}
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_staging(output_dir)
    staged = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f'.{output_dir.name}.tmp-'))
    try:
        if not all(t.is_contiguous() for t in model.state_dict().values()):  # channels_last: safetensors needs a copy
            model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        native = 'data_config' in inspect.signature(save_for_hf).parameters  # timm >= 1.0.31
        save_for_hf(model, staged, model_config={'label_names': list(label_names)}, model_args=model_args,
                    safe_serialization=True, **({'data_config': dict(data_config)} if native and data_config else {}))
        config = json.loads((staged / 'config.json').read_text())
        cfg = config['pretrained_cfg']  # it describes this run, not the weights the run started from
        if data_config and not native:  # timm 1.0.29: record the preprocessing overrides ourselves
            cfg.update({k: v for k, v in data_config.items() if k in _DATA_KEYS})
            cfg.pop('test_input_size', None)
        for key in _SOURCE_KEYS:
            cfg.pop(key, None)
        tag = re.sub(r'[^a-z0-9]+', '_', (dataset or '').split('/')[-1].lower()).strip('_')  # 'org/My Pets': my_pets
        if tag:
            cfg['tag'] = tag
        start = f'fine-tuned from {base_model}' if base_model else 'trained'
        cfg['description'] = (f'{start} on {dataset or "an unnamed data set"} ({model.num_classes} classes) at '
                              f'{cfg["input_size"][-1]} px')
        (staged / 'config.json').write_text(json.dumps(config, indent=2))
        card = _model_card(model, config, model_args, dataset, metrics or {}, recipe, command, base_model, repo_id)
        card.save(staged / 'README.md')
        for name in ('config.json', 'README.md'):
            _check_no_local_paths(name, (staged / name).read_text())
        record_manifest(staged)
        umask = os.umask(0o022)  # mkdtemp makes 0700, safetensors 0600: give the modes mkdir() and open() would
        os.umask(umask)
        staged.chmod(0o777 & ~umask)
        for path in staged.iterdir():
            path.chmod(0o666 & ~umask)
        _replace_dir(staged, output_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return output_dir


def check_export_dir(folder: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Validate an export folder with no network call (what push and verify publish or accept); returns config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f'{folder} is not a directory: expected an exported model folder (e.g. RUN_DIR/model)')
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f'{folder} lacks {missing}; an export holds {list(EXPORT_FILES)} (see export_model)')
    config_text = (folder / 'config.json').read_text()
    try:
        config = json.loads(config_text)
        json.dumps(config, allow_nan=False)
    except ValueError as e:  # not JSON, or holds NaN/Infinity
        raise ValueError(f'{folder / "config.json"} is not valid JSON (no NaN or Infinity is published): {e}') from e
    absent = [k for k in ('architecture', 'num_classes', 'pretrained_cfg') if k not in config]
    if absent:
        raise ValueError(f'{folder / "config.json"} lacks {absent}: not a timm config.json')
    if not timm.is_model(config['architecture']):
        raise ValueError(f"architecture {config['architecture']!r} is not registered with timm, so "
                         f"'hf-hub:' loading of this folder would fail (did the export come from timm_gcp?)")
    classes = config['num_classes']
    if 'label_names' in config:
        _check_label_names(config['label_names'], f'{folder / "config.json"} label_names')
    if len(config.get('label_names', [None] * classes)) != classes:
        raise ValueError(f"config.json has {len(config['label_names'])} label_names for {classes} classes")
    weights = folder / 'model.safetensors'
    try:
        with safe_open(str(weights), 'pt') as f:
            classifier = f"{config['pretrained_cfg'].get('classifier', 'fc')}.weight"
            rows = f.get_slice(classifier).get_shape()[0] if classifier in f.keys() else classes
            if rows != classes:
                raise ValueError(f'{classifier} has {rows} rows but config.json says num_classes={classes}')
            _check_finite_tensors(((k, f.get_tensor(k)) for k in f.keys()), str(weights))
    except (OSError, RuntimeError) as e:  # safetensors raises these for unreadable or truncated headers
        raise ValueError(f'{weights} is not a readable safetensors file: {e}') from e
    card_text = (folder / 'README.md').read_text()
    card = ModelCard(card_text)
    if card.data.library_name != 'timm':
        raise ValueError(f'{folder / "README.md"} metadata must say library_name: timm '
                         f'(found {card.data.library_name!r})')
    _check_finite_metrics(card_metrics(card), f'the model-index metrics of {folder / "README.md"}')
    _check_no_local_paths('config.json', config_text)
    _check_no_local_paths('README.md', card_text)
    return config
