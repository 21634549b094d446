"""Write a Hub-ready folder (model.safetensors, config.json, README.md) for any timm model, atomically."""
import copy
import inspect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import timm
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from timm.models import save_for_hf
from torch import nn

from ..layers import GCPPool
from .model_card import CardInfo, build_model_card, card_metrics
from .publishable import check_finite_metrics, check_finite_tensors, check_no_local_paths

__all__ = ['export_model', 'export_model_args', 'check_export_dir', 'EXPORT_FILES', 'WEIGHTS_NAME', 'CONFIG_NAME',
           'CARD_NAME']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
_DATA_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
_SOURCE_KEYS = ('tag', 'notes', 'origin_url', 'paper_ids', 'paper_name')  # they describe the weights a run starts from


def export_model_args(model: nn.Module) -> Dict[str, Any]:
    """Explicit constructor kwargs that rebuild `model`: a GCP model's own, and `num_classes` (timm 1.0.29 records
    none by itself; 1.0.31 adds what create_model recorded, explicit values winning)."""
    return {**(model.gcp_model_args() if hasattr(model, 'gcp_model_args') else {}), 'num_classes': model.num_classes}


def _meta_layer_name(model: nn.Module) -> Optional[str]:
    """The meta-layer of the model's covariance pooling head, None without one (e.g. a GAP head)."""
    return next((m.meta_layer_name for m in model.modules() if isinstance(m, GCPPool)), None)


def _check_label_names(model: nn.Module, label_names: Sequence[str]) -> None:
    if isinstance(label_names, str) or not all(isinstance(n, str) for n in label_names):
        raise TypeError(f'label_names must be a sequence of str, got {type(label_names).__name__}')
    if len(label_names) != model.num_classes:
        raise ValueError(f'label_names has {len(label_names)} entries but the model has {model.num_classes} classes')


def _check_target(output_dir: Path) -> None:
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ValueError(f'export target {output_dir} exists and is not a directory')
        foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in EXPORT_FILES)
        if foreign:
            raise ValueError(f'export target {output_dir} holds files an export would lose: {foreign}')


def _replace_dir(staged: Path, output_dir: Path) -> None:
    """Move `staged` to `output_dir`; an earlier export there is swapped out only after the new one is complete."""
    if not output_dir.exists():
        os.replace(staged, output_dir)
        return
    old = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f'.{output_dir.name}.old-'))
    os.replace(output_dir, old / output_dir.name)
    try:
        os.replace(staged, output_dir)
    except BaseException:
        os.replace(old / output_dir.name, output_dir)  # the earlier export goes back
        old.rmdir()
        raise
    shutil.rmtree(old)


def _contiguous(model: nn.Module) -> nn.Module:
    """`model`, or a contiguous-format copy of it when some tensor is not (channels_last): safetensors needs that."""
    if all(t.is_contiguous() for t in model.state_dict().values()):
        return model
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)


def _run_description(dataset: Optional[str], num_classes: int, img_size: int, base_model: Optional[str]) -> str:
    """What an export's pretrained cfg says about the run that produced it."""
    start = f'fine-tuned from {base_model}' if base_model else 'trained'
    return f'{start} on {dataset or "an unnamed data set"} ({num_classes} classes) at {img_size} px'


def _dataset_tag(dataset: Optional[str]) -> Optional[str]:
    """timm-style tag of a data set name or Hub id ('org/Oxford-IIIT Pet' -> 'oxford_iiit_pet')."""
    if not dataset:
        return None
    return re.sub(r'[^a-z0-9]+', '_', dataset.split('/')[-1].lower()).strip('_') or None


def _save_weights_and_config(model: nn.Module, folder: Path, label_names: List[str], model_args: Dict[str, Any],
                             data_config: Optional[Mapping[str, Any]], dataset: Optional[str],
                             base_model: Optional[str]) -> Dict[str, Any]:
    """save_for_hf, then a pretrained cfg that describes this run instead of the weights it started from."""
    model = _contiguous(model)
    native = 'data_config' in inspect.signature(save_for_hf).parameters  # timm >= 1.0.31
    save_for_hf(model, folder, model_config={'label_names': label_names}, model_args=model_args,
                safe_serialization=True, **({'data_config': dict(data_config)} if native and data_config else {}))
    config = json.loads((folder / CONFIG_NAME).read_text())
    cfg = config['pretrained_cfg']
    if data_config and not native:  # older timm: record the preprocessing overrides ourselves
        cfg.update({k: v for k, v in data_config.items() if k in _DATA_KEYS})
        cfg.pop('test_input_size', None)
    for key in _SOURCE_KEYS:
        cfg.pop(key, None)
    tag = _dataset_tag(dataset)
    if tag:
        cfg['tag'] = tag
    cfg['description'] = _run_description(dataset, model.num_classes, cfg['input_size'][-1], base_model)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return config


def _honour_umask(folder: Path) -> None:
    """Give `folder` and its files the modes mkdir() and open() would (mkdtemp and some writers use 0700/0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def export_model(
        model: nn.Module,
        output_dir: Union[str, os.PathLike],
        *,
        label_names: Sequence[str],
        metrics: Optional[Mapping[str, Any]] = None,
        recipe: Optional[Mapping[str, Any]] = None,
        command: Optional[str] = None,
        dataset: Optional[str] = None,
        data_config: Optional[Mapping[str, Any]] = None,
        repo_id: Optional[str] = None,
        base_model: Optional[str] = None,
) -> Path:
    """Write model.safetensors, config.json (timm format, label names, explicit model_args) and README.md.

    The folder appears complete or not at all; non-finite weights or metrics, and a local path or the user name in
    a published text, are refused (ValueError) and leave an earlier export intact. `data_config` overrides the
    preprocessing recorded in config.json (e.g. the 448 px fine-tuning size); `repo_id` fills the card's loading
    snippet (push_model fills it otherwise); `base_model` is the Hub id of the weights the run started from.
    """
    output_dir = Path(output_dir)
    _check_label_names(model, label_names)
    check_finite_tensors(model.state_dict().items(), f'{type(model).__name__} state dict')
    check_finite_metrics(metrics or {}, 'metrics')
    _check_target(output_dir)
    model_args = export_model_args(model)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f'.{output_dir.name}.tmp-'))
    try:
        config = _save_weights_and_config(model, staged, list(label_names), model_args, data_config, dataset,
                                          base_model)
        info = CardInfo(
            architecture=model.pretrained_cfg.get('architecture') or type(model).__name__.lower(),
            num_classes=model.num_classes,
            num_params=sum(p.numel() for p in model.parameters()),
            input_size=tuple(config['pretrained_cfg']['input_size']),
            model_args=model_args,
            meta_layer=_meta_layer_name(model),
            license=model.pretrained_cfg.get('license') or 'apache-2.0',
            dataset=dataset,
            metrics=metrics,
            recipe=recipe,
            command=command,
            base_model=base_model,
            **({'repo_id': repo_id} if repo_id else {}),
        )
        build_model_card(info).save(staged / CARD_NAME)
        for name in (CONFIG_NAME, CARD_NAME):
            check_no_local_paths(name, (staged / name).read_text())
        _honour_umask(staged)
        _replace_dir(staged, output_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return output_dir


def _reject_constant(name: str) -> float:
    raise ValueError(f'{CONFIG_NAME} holds the non-finite number {name}: refusing to publish it')


def check_export_dir(folder: Union[str, Path]) -> dict:
    """Validate an export folder without any network call (files, config, finite weights and metrics, no local
    paths in the texts); returns its config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f'{folder} is not a directory: expected an exported model folder (e.g. RUN_DIR/model)')
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f'{folder} lacks {missing}; an export holds {list(EXPORT_FILES)} (see export_model)')
    try:
        config_text = (folder / CONFIG_NAME).read_text()
        config = json.loads(config_text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{folder / CONFIG_NAME} is not valid JSON: {e}') from e
    absent = [k for k in ('architecture', 'num_classes', 'pretrained_cfg') if k not in config]
    if absent:
        raise ValueError(f'{folder / CONFIG_NAME} lacks {absent}: not a timm config.json')
    if not timm.is_model(config['architecture']):
        raise ValueError(f"architecture {config['architecture']!r} is not registered with timm, so "
                         f"'hf-hub:' loading of this folder would fail (did the export come from timm_gcp?)")
    labels = config.get('label_names')
    if labels is not None and len(labels) != config['num_classes']:
        raise ValueError(f"config.json has {len(labels)} label_names for {config['num_classes']} classes")
    try:
        with safe_open(str(folder / WEIGHTS_NAME), 'pt') as f:
            classifier = f"{config['pretrained_cfg'].get('classifier', 'fc')}.weight"
            if classifier in f.keys() and f.get_slice(classifier).get_shape()[0] != config['num_classes']:
                raise ValueError(f"{classifier} has {f.get_slice(classifier).get_shape()[0]} rows but config.json "
                                 f"says num_classes={config['num_classes']}")
            check_finite_tensors(((k, f.get_tensor(k)) for k in f.keys()), str(folder / WEIGHTS_NAME))
    except (OSError, RuntimeError) as e:  # safetensors raises these for unreadable / truncated headers
        raise ValueError(f'{folder / WEIGHTS_NAME} is not a readable safetensors file: {e}') from e
    card_text = (folder / CARD_NAME).read_text()
    card = ModelCard(card_text)
    if card.data.library_name != 'timm':
        raise ValueError(f'{folder / CARD_NAME} metadata must say library_name: timm '
                         f'(found {card.data.library_name!r})')
    check_finite_metrics(card_metrics(card), f'the model-index metrics of {folder / CARD_NAME}')
    for name, text in ((CONFIG_NAME, config_text), (CARD_NAME, card_text)):
        check_no_local_paths(name, text)
    return config
