"""Corruption robustness (Hendrycks & Dietterich, ICLR 2019) of any timm model on the validation images of an image
folder: the 15 ImageNet-C corruptions (the `imagecorruptions` package) applied at the model's input resolution,
the error per corruption and severity, CE and mCE normalised by a baseline model's errors, and relative mCE."""
import inspect
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from PIL import Image
from timm.data import ImageNetInfo, MaybeToTensor, create_transform, infer_imagenet_subset, resolve_model_data_config
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader
from torchvision import transforms
from tqdm.auto import tqdm

from ..training.data import ImageDataset, create_eval_dataset
from ..training.evaluate import evaluate

HENDRYCKS_DIETTERICH_BIBTEX = """@inproceedings{hendrycks2019benchmarking,
  title={Benchmarking Neural Network Robustness to Common Corruptions and Perturbations},
  author={Hendrycks, Dan and Dietterich, Thomas},
  booktitle={International Conference on Learning Representations},
  year={2019}
}"""
papers = (HENDRYCKS_DIETTERICH_BIBTEX,)

CORRUPTION_FAMILIES: Dict[str, Tuple[str, ...]] = {  # ImageNet-C's 15 test corruptions, in its order
    'noise': ('gaussian_noise', 'shot_noise', 'impulse_noise'),
    'blur': ('defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur'),
    'weather': ('snow', 'frost', 'fog', 'brightness'),
    'digital': ('contrast', 'elastic_transform', 'pixelate', 'jpeg_compression'),
}
CORRUPTIONS = tuple(name for names in CORRUPTION_FAMILIES.values() for name in names)
SEVERITIES = (1, 2, 3, 4, 5)
MIN_IMAGE_SIDE = 32  # imagecorruptions refuses smaller images
Errors = Dict[str, Any]  # {'clean': E_clean, 'corruptions': {name: {severity: E}}}, errors in %
Condition = Optional[Tuple[str, int]]  # None: the clean images


def _imagecorruptions() -> Any:
    try:
        import imagecorruptions
    except ImportError as err:
        raise ImportError('corruption robustness needs the imagecorruptions-imaug package: '
                          'pip install "timm-gcp[robustness]"') from err
    return imagecorruptions


def corruption_library() -> str:
    """The corruption package and its version, as results record it."""
    from importlib.metadata import version
    _imagecorruptions()
    return f'imagecorruptions-imaug {version("imagecorruptions-imaug")}'


def check_conditions(corruptions: Optional[Sequence[str]] = None,
                     severities: Optional[Sequence[int]] = None) -> Tuple[List[str], List[int]]:
    """The corruptions and severities to measure, in ImageNet-C's order (default: all 15 x 5); ValueError for an
    unknown corruption or a severity outside 1-5."""
    corruptions = list(CORRUPTIONS if corruptions is None else corruptions)
    severities = list(SEVERITIES if severities is None else severities)
    unknown = [name for name in corruptions if name not in CORRUPTIONS]
    if unknown or not corruptions:
        raise ValueError(f'unknown corruption(s) {unknown or corruptions}; expected names from ImageNet-C: '
                         f'{", ".join(CORRUPTIONS)}')
    bad = [s for s in severities if isinstance(s, bool) or s not in SEVERITIES]
    if bad or not severities:
        raise ValueError(f'severities must be integers from 1 to 5, got {bad or severities}')
    return [c for c in CORRUPTIONS if c in corruptions], sorted(set(severities))


class Corruption:
    """PIL image -> the image under one ImageNet-C corruption, drawn from numpy's global RNG (which `ImageDataset`
    seeds per image): the same image is corrupted the same way for the same seed, whatever the worker count."""

    def __init__(self, name: str, severity: int):
        check_conditions([name], [severity])
        self.name, self.severity = name, severity
        function = _imagecorruptions().corruption_dict[name]
        self.seeded = 'seed' in inspect.signature(function).parameters  # these ignore numpy's global RNG

    def __call__(self, img: Image.Image) -> Image.Image:
        kwargs = {'seed': np.random.randint(2 ** 31)} if self.seeded else {}
        corrupted = _imagecorruptions().corrupt(np.asarray(img.convert('RGB')), severity=self.severity,
                                                corruption_name=self.name, **kwargs)
        return Image.fromarray(corrupted)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.name!r}, {self.severity})'


def corruption_transform(data_config: Mapping[str, Any], condition: Condition) -> transforms.Compose:
    """timm's eval transform of `data_config` with the corruption applied after the resize and crop, before the
    tensor conversion (ImageNet-C corrupts 224 px crops); `condition` None: the transform itself."""
    if min(data_config['input_size'][1:]) < MIN_IMAGE_SIDE:
        raise ValueError(f'input size {tuple(data_config["input_size"])}: the corruptions need images of at least '
                         f'{MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE} px')
    steps = list(create_transform(**data_config).transforms)
    if condition is None:
        return transforms.Compose(steps)
    at = next(i for i, step in enumerate(steps) if isinstance(step, (MaybeToTensor, transforms.ToTensor)))
    return transforms.Compose(steps[:at] + [Corruption(*condition)] + steps[at:])


def model_label_names(model: nn.Module) -> Optional[List[str]]:
    """The class names of `model`: its config's `label_names` (exports, Hub models), ImageNet's synsets for timm's
    ImageNet classifiers, else None."""
    names = model.pretrained_cfg.get('label_names')
    if names:
        return list(names)
    subset = infer_imagenet_subset(model)
    return list(ImageNetInfo(subset).label_names()) if subset else None


def check_class_names(model: nn.Module, what: str, data_classes: Sequence[str]) -> List[str]:
    """The class order targets follow: `model`'s names (the data's folders must be among them) or, for a model
    without names, the data's folders when their count matches the model's classes; ValueError otherwise."""
    names = model_label_names(model)
    if names is None:
        if len(data_classes) != model.num_classes:
            raise ValueError(f'{what} has {model.num_classes} classes and no class names, the data {len(data_classes)} '
                             f'class folders')
        return list(data_classes)
    if len(names) != model.num_classes:
        raise ValueError(f'{what} names {len(names)} classes but has {model.num_classes} outputs')
    unknown = sorted(set(data_classes) - set(names))
    if unknown:
        raise ValueError(f'the data has classes {what} does not know: {unknown[:10]}'
                         f'{" ..." if len(unknown) > 10 else ""} ({len(unknown)} of {len(data_classes)})')
    return names


def process_state() -> PartialState:
    """accelerate's process state (one process, or those `accelerate launch` started), on the CPU when
    ACCELERATE_USE_CPU says so, as an Accelerator reads it."""
    return PartialState(cpu=parse_flag_from_env('ACCELERATE_USE_CPU'))


def _conditions(corruptions: Sequence[str], severities: Sequence[int]) -> List[Condition]:
    return [None] + [(c, s) for c in corruptions for s in severities]


@torch.no_grad()
def measure_errors(models: Mapping[str, nn.Module], dataset: ImageDataset, corruptions: Sequence[str],
                   severities: Sequence[int], *, batch_size: int = 64, workers: int = 4,
                   progress: bool = True) -> Dict[str, Any]:
    """Top-1 error (%) of each model on the clean and the corrupted images of `dataset` (targets in the models' class
    order); models with the same data config share each corrupted batch. Under `accelerate launch` each process
    measures a share of the corruptions. Returns {'errors': {name: Errors}, 'images', 'unreadable',
    'images_per_s' (decoded and corrupted images per second per process)}."""
    corruptions, severities = check_conditions(corruptions, severities)
    groups: Dict[str, List[str]] = {}
    for name, model in models.items():
        config = resolve_model_data_config(model)
        corruption_transform(config, None)  # checks the input size before any work
        groups.setdefault(json.dumps(config, sort_keys=True), []).append(name)
    state = process_state()
    with state.split_between_processes(_conditions(corruptions, severities)) as mine:
        mine = list(mine)
    counts: Dict[Tuple[str, Condition], List[float]] = {}  # (model, condition) -> [correct, readable, unreadable]
    images, start = 0, time.perf_counter()
    for key, names in groups.items():
        config = json.loads(key)
        parts = [replace(dataset, transform=corruption_transform(config, condition)) for condition in mine]
        offsets = np.cumsum([0] + [len(dataset)] * len(parts))
        batches = [list(range(lo, min(lo + batch_size, hi))) for first, hi in zip(offsets[:-1], offsets[1:])
                   for lo in range(first, hi, batch_size)]
        loader = DataLoader(ConcatDataset(parts) if parts else [], batch_sampler=batches, num_workers=workers)
        bar = tqdm(loader, total=len(batches), desc='robustness', unit='batch', dynamic_ncols=True,
                   disable=not (progress and state.is_main_process))
        for index, batch in zip(batches, bar):
            condition = mine[index[0] // len(dataset)]
            bar.set_postfix_str('clean' if condition is None else f'{condition[0]} {condition[1]}', refresh=False)
            for name in names:
                result = evaluate(models[name], [batch])
                total = counts.setdefault((name, condition), [0., 0., 0.])
                total[0] += result['top1'] * result['val_images'] / 100
                total[1] += result['val_images']
                total[2] += result['unreadable_val']
            images += len(index)
    rate = images / max(time.perf_counter() - start, 1e-9)
    gathered = gather_object([(list(counts.items()), rate)]) if state.num_processes > 1 else [(counts.items(), rate)]
    merged = {key: value for items, _ in gathered for key, value in items}

    def error(name: str, condition: Condition) -> float:
        correct, readable, _ = merged[(name, condition)]
        return 100. - 100. * round(correct) / max(readable, 1.)

    errors = {name: {'clean': error(name, None),
                     'corruptions': {c: {s: error(name, (c, s)) for s in severities} for c in corruptions}}
              for name in models}
    _, readable, unreadable = merged[(next(iter(models)), None)]
    return {'errors': errors, 'images': int(readable), 'unreadable': int(unreadable),
            'images_per_s': sum(r for _, r in gathered) / len(gathered)}


def summarize(errors: Errors, baseline: Optional[Errors] = None) -> Dict[str, Any]:
    """Hendrycks & Dietterich's summary of `errors` (E in %). With `baseline`: CE_c = 100 * sum_s E_{s,c} /
    sum_s E^base_{s,c}, mCE = mean_c CE_c, relative CE_c = 100 * sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} -
    E^base_clean), relative mCE = its mean (None where a denominator is not positive). Without: the unnormalised
    mean error over severities per corruption, its mean over corruptions, and the same relative to the clean error."""
    clean, table = errors['clean'], errors['corruptions']
    if baseline is None:
        mean = {c: float(np.mean(list(row.values()))) for c, row in table.items()}
        relative = {c: value - clean for c, value in mean.items()}
        return {'normalized': False, 'mean_error': mean, 'mean_corruption_error': float(np.mean(list(mean.values()))),
                'relative_mean_error': relative,
                'relative_mean_corruption_error': float(np.mean(list(relative.values())))}
    if set(baseline['corruptions']) != set(table) or any(
            set(baseline['corruptions'][c]) != set(row) for c, row in table.items()):
        raise ValueError('the baseline was measured on other corruptions or severities')

    def ratio(numerator: float, denominator: float) -> Optional[float]:
        return 100. * numerator / denominator if denominator > 0 else None

    def mean(values: Sequence[Optional[float]]) -> Optional[float]:
        return None if any(v is None for v in values) else float(np.mean(values))

    base_clean = baseline['clean']
    ce = {c: ratio(sum(row.values()), sum(baseline['corruptions'][c].values())) for c, row in table.items()}
    relative = {c: ratio(sum(e - clean for e in row.values()),
                         sum(e - base_clean for e in baseline['corruptions'][c].values())) for c, row in table.items()}
    return {'normalized': True, 'ce': ce, 'mce': mean(list(ce.values())), 'relative_ce': relative,
            'relative_mce': mean(list(relative.values()))}


def resolve_model(spec: str, pretrained: bool = False) -> Tuple[str, Optional[Path]]:
    """(what `timm.create_model` loads, the local export folder or None) for a model given as an export folder, a
    train.py run folder, `hf-hub:` / `local-dir:` or a timm name (with `pretrained`)."""
    path = Path(spec)
    if spec.startswith('local-dir:'):
        path = Path(spec[len('local-dir:'):])
        return spec, path if (path / 'README.md').is_file() else None
    if spec.startswith('hf-hub:'):
        return spec, None
    if path.is_dir():
        if (path / 'model' / 'config.json').is_file():
            path = path / 'model'  # a train.py run folder
        elif not (path / 'config.json').is_file():
            unfinished = ' (a train.py run that has not finished: resume it)' if (path / 'checkpoints').is_dir() \
                else ''
            raise ValueError(f'{spec} holds no exported model{unfinished}; expected an export folder (config.json, '
                             f'model.safetensors), a train.py run folder (RUN/model), hf-hub:ORG/NAME or a timm name')
        return f'local-dir:{path}', path
    if timm.is_model(spec):
        if not pretrained:
            raise ValueError(f'{spec} is a timm architecture: add --pretrained to measure its published weights '
                             f'(randomly initialised weights measure nothing)')
        return spec, None
    raise ValueError(f'{spec} is neither a folder, hf-hub:ORG/NAME, local-dir:PATH nor a timm model name')


def load_model(spec: str, pretrained: bool = False) -> nn.Module:
    """The model `spec` names (see `resolve_model`), in eval mode on this process's device."""
    return timm.create_model(resolve_model(spec, pretrained)[0], pretrained=True).eval().to(process_state().device)


def evaluate_robustness(model: str, data_dir: Union[str, Path], *, baseline: Optional[str] = None,
                        pretrained: bool = False, corruptions: Optional[Sequence[str]] = None,
                        severities: Optional[Sequence[int]] = None, seed: int = 0, batch_size: int = 64,
                        workers: int = 4, progress: bool = True) -> Dict[str, Any]:
    """Measure `model` (and `baseline`) on the clean and corrupted validation images of `data_dir`; the result that
    `timm-gcp robustness` writes (write_robustness_report)."""
    corruptions, severities = check_conditions(corruptions, severities)
    models = {role: load_model(spec, pretrained) for role, spec in (('model', model), ('baseline', baseline))
              if spec is not None}
    data = create_eval_dataset(data_dir)  # indexed once to learn the data's classes
    names = {role: check_class_names(m, role, data.class_names) for role, m in models.items()}
    if baseline is not None and names['baseline'] != names['model']:
        only = sorted(set(names['baseline']) ^ set(names['model']))
        raise ValueError(f'the baseline has another class list than the model: {len(names["baseline"])} vs '
                         f'{len(names["model"])} classes' + (f', differing in {only[:10]}' if only
                                                            else ', in another order'))
    dataset = replace(create_eval_dataset(data_dir, names['model']), seed=seed)
    measured = measure_errors(models, dataset, corruptions, severities, batch_size=batch_size, workers=workers,
                              progress=progress)
    config = resolve_model_data_config(models['model'])
    result = {
        'model': model, 'baseline': baseline, 'dataset': Path(data_dir).resolve().name, 'split': Path(dataset.name).name,
        'images': measured['images'], 'unreadable': measured['unreadable'], 'classes': len(data.class_names),
        'input_size': list(config['input_size']), 'seed': seed, 'corruption_library': corruption_library(),
        'corruptions': corruptions, 'severities': severities, 'images_per_s': measured['images_per_s'],
        'results': {},
    }
    for role in models:
        errors = measured['errors'][role]
        entry = {'errors': errors, 'unnormalized': summarize(errors)}
        if baseline is not None:
            entry['normalized'] = summarize(errors, measured['errors']['baseline'])
        result['results'][role] = entry
    return result
