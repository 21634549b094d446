"""Image folders (indexed by timm) and Hugging Face datasets behind one fault-tolerant dataset of
`(image, target, unreadable)` samples (policies: docs/training.md, Data); transforms and loaders."""
import io
import logging
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.data.readers.reader_image_folder import find_images_and_targets
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, Dataset

from .._text import first_not_utf8, preview

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm')
_MAX_SUBSTITUTIONS = 16


def _open_rgb(source: Any, max_pixels: Optional[int]) -> Image.Image:
    """Decode an image of any mode as RGB, transparent areas on white; ValueError if its header declares more than
    `max_pixels` (None: PIL's limit only)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # `max_pixels` is the limit that applies
        with Image.open(source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ValueError(f'{img.width} x {img.height} pixels exceed the limit of {max_pixels} '
                                 f'(--max-image-pixels)')
            if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info:
                return Image.alpha_composite(Image.new('RGBA', img.size, 'white'), img.convert('RGBA')).convert('RGB')
            return img.convert('RGB')  # decoded now, a copy even when RGB already: the file can close


@dataclass(eq=False)  # hashed by identity, as torch datasets are
class ImageDataset(Dataset):
    """`samples[i]` -> (path or file object, target), decoded under our policies (docs/training.md, Data)."""
    samples: Sequence[Tuple[Any, int]]
    class_names: List[str]
    name: str
    is_training: bool = False
    seed: int = 0
    max_image_pixels: Optional[int] = Image.MAX_IMAGE_PIXELS
    transform: Optional[Callable] = None
    epoch: int = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Tuple[Any, int, int]:
        """(image, target, unreadable): an unreadable image is logged and replaced by the next readable one in
        training, by a blank placeholder (target -1) in evaluation; augmentations seeded per (seed, epoch, index)."""
        for step in range(_MAX_SUBSTITUTIONS + 1 if self.is_training else 1):
            source, target = self.samples[(index + step) % len(self)]
            try:
                img, unreadable = _open_rgb(source, self.max_image_pixels), int(step > 0)
                break
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's errors on bad files
                where = source if isinstance(source, str) else f'row {(index + step) % len(self)} of {self.name}'
                _logger.warning('skipping unreadable image %s: %s', where, err)
        else:
            if self.is_training:
                raise RuntimeError(f'{step + 1} consecutive unreadable images in {self.name} from {index} on')
            img, target, unreadable = Image.new('RGB', (32, 32)), -1, 1
        seed = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):  # python's, numpy's (timm's RandAugment) and torch's RNGs: put back
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            img = self.transform(img) if self.transform else img
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        return img, target, unreadable


def _check_no_symlink_loop(top: Path) -> None:
    """ValueError naming the first symlink under `top` that leads back to a folder on its own path (or above it):
    timm's scan (os.walk following links, which data sets made of linked folders need) would follow it dozens of
    levels deep, counting every image again at each. Links to folders elsewhere are fine."""
    for root, dirs, _ in os.walk(top, followlinks=True):  # top-down: a loop is seen before it is entered
        dirs.sort()  # the same link named on every run
        for name in dirs:
            link = Path(root, name)
            if not link.is_symlink():
                continue
            parts, target = link.relative_to(top).parts, link.resolve()
            path = [top.joinpath(*parts[:depth]).resolve() for depth in range(len(parts))]  # top down to `root`
            if any(target == folder or target in folder.parents for folder in path):
                raise ValueError(f'symlink loop in the data: {link} points to {target}, which holds it; remove the '
                                 f'link (its images would be counted again at every level)')


def _index_folder(split_dir: Path, class_names: Optional[Sequence[str]] = None) -> Tuple[List, List[str]]:
    """timm's (path, target) samples of `split_dir/<class>/<image>` and the classes (`class_names`, default: the class
    folders in timm's natural order), each class folder checked to hold images and to be named in UTF-8 (Python
    decodes file names with os.fsdecode: a byte that is not UTF-8 becomes a lone surrogate), no symlink loop."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f'{split_dir} does not exist; expected <data-dir>/<split>/<class>/<image>')
    folders = sorted((p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith('.')),
                     key=natural_key)
    if not folders:
        raise ValueError(f'{split_dir} holds no class folders; expected <split>/<class>/<image> files')
    bad = first_not_utf8(folders)
    if bad is not None:
        raise ValueError(f'class folder name {os.fsencode(bad)!r} in {split_dir} is not valid UTF-8: class names are '
                         f'published in config.json and the model card; rename the folder')
    _check_no_symlink_loop(split_dir)
    unknown = sorted(set(folders) - set(class_names or folders))
    if unknown:
        raise ValueError(f'{split_dir} has classes the model does not know: {preview(unknown)}')
    class_names = list(class_names or folders)
    class_to_idx = {name: index for index, name in enumerate(class_names)}
    samples, _ = find_images_and_targets(str(split_dir), IMG_EXTENSIONS, class_to_idx)
    found = {target for _, target in samples}
    empty = [name for name in folders if class_to_idx[name] not in found]
    if empty:
        raise ValueError(f'class folder {split_dir / empty[0]} holds no images ({", ".join(IMG_EXTENSIONS)})')
    return samples, class_names


class _HfSamples:
    """(image bytes or path, label) rows of a split (`val` falls back to `validation`) of a Hugging Face dataset."""

    def __init__(self, dataset_dict: Any, name: str, split: str):
        key = 'validation' if split == 'val' and 'val' not in dataset_dict else split
        if key not in dataset_dict:
            raise ValueError(f'dataset {name!r} has no split {split!r}; it has {sorted(dataset_dict)}')
        features = dataset_dict[key].features
        kinds = {type(feature).__name__: column for column, feature in features.items()}
        if not {'Image', 'ClassLabel'} <= set(kinds):
            raise ValueError(f'dataset columns {dict(features)} need one Image and one ClassLabel column')
        self.image_key, self.label_key = kinds['Image'], kinds['ClassLabel']
        self.class_names = features[self.label_key].names
        self.rows = dataset_dict[key].cast_column(self.image_key, type(features[self.image_key])(decode=False))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        row = self.rows[index]
        image = row[self.image_key]
        return io.BytesIO(image['bytes']) if image.get('bytes') else image['path'], int(row[self.label_key])


DataBundle = NamedTuple('DataBundle', [('train', ImageDataset), ('val', ImageDataset), ('class_names', List[str])])


def create_datasets(data_dir: Optional[str], dataset: str = '', train_split: str = 'train', val_split: str = 'val',
                    seed: int = 0, max_image_pixels: Optional[int] = Image.MAX_IMAGE_PIXELS) -> DataBundle:
    """Check and index the data (before any model is built); transforms are attached later. Images over
    `max_image_pixels` (None: no limit) count as unreadable."""
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ValueError(f'--max-image-pixels must be a positive number of pixels, got {max_image_pixels}')
    if dataset.startswith('hfds/'):
        try:
            import datasets
        except ImportError as err:
            raise ImportError('--dataset hfds/NAME needs the `datasets` package: pip install "timm-gcp[hfds]"') from err
        name = dataset[len('hfds/'):]  # a `save_to_disk` folder, a local data folder, or a Hub id from the cache
        splits = (datasets.load_from_disk(name) if (Path(name) / 'dataset_dict.json').is_file()
                  else datasets.load_dataset(name, cache_dir=data_dir))
        train, val = (_HfSamples(splits, name, split) for split in (train_split, val_split))
        train_classes, val_classes = train.class_names, val.class_names
    elif dataset:
        raise ValueError(f'unsupported --dataset {dataset!r}: use "" (image folders) or hfds/NAME')
    elif not data_dir:
        raise ValueError('no --data-dir given: expected a folder holding train/ and val/ image folders')
    else:
        name = data_dir
        train, train_classes = _index_folder(Path(data_dir) / train_split)
        val, val_classes = _index_folder(Path(data_dir) / val_split)
    if train_classes != val_classes:
        raise ValueError(f'classes differ between {train_split} and {val_split} of {name}: only in {train_split}: '
                         f'{sorted(set(train_classes) - set(val_classes))}, only in {val_split}: '
                         f'{sorted(set(val_classes) - set(train_classes))}')
    limit = {'max_image_pixels': max_image_pixels}
    return DataBundle(ImageDataset(train, train_classes, name, is_training=True, seed=seed, **limit),
                      ImageDataset(val, val_classes, name, **limit), train_classes)


def create_eval_dataset(data_dir: Union[str, Path], label_names: Optional[Sequence[str]] = None,
                        max_image_pixels: Optional[int] = Image.MAX_IMAGE_PIXELS) -> ImageDataset:
    """The validation images of `data_dir` (its `val/` or `validation/` folder, else `data_dir` itself), targets in
    the order of `label_names` (a model's classes; default: the class folders), unreadable images flagged."""
    data_dir = Path(data_dir)
    root = next((data_dir / name for name in ('val', 'validation') if (data_dir / name).is_dir()), data_dir)
    return ImageDataset(*_index_folder(root, label_names), str(root), max_image_pixels=max_image_pixels)


def create_transforms(model: torch.nn.Module, args: Dict[str, Any]) -> Tuple[Callable, Callable, Dict[str, Any]]:
    """timm train and eval transforms from the model's data config and the flags that override it."""
    data_config = resolve_data_config(
        {key: args.get(key) or None for key in ('img_size', 'crop_pct', 'interpolation')}, model=model)
    train_tf = create_transform(
        **data_config, is_training=True, scale=args.get('scale'), ratio=args.get('ratio'),
        hflip=args.get('hflip', 0.5), color_jitter=args.get('color_jitter', 0.4), auto_augment=args.get('aa'),
        re_prob=args.get('reprob', 0.))
    return train_tf, create_transform(**data_config), data_config


def create_dataloader(dataset: Dataset, batch_size: int, is_training: bool, workers: int,
                      seed: int = 0) -> DataLoader:
    """A plain DataLoader for `accelerate.prepare` (training: shuffled, full batches only). Its own seeded generator
    leaves the global RNG (dropout, mixup) where an uninterrupted run has it when a resumed epoch starts part-way."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=is_training, drop_last=is_training,
                      num_workers=workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))
