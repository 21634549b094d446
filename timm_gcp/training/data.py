"""Datasets and loaders: image folders and Hugging Face datasets behind one checked, fault-tolerant interface.

Every sample is `(image, target, unreadable)`. An unreadable image (corrupt, truncated, a decompression bomb, or more
pixels than `max_image_pixels`) is logged with its path and, in training, replaced by the next readable one; in
evaluation it becomes a blank placeholder flagged `unreadable=1` that the evaluation leaves out, so every readable
validation image is still counted exactly once. Training augmentations are seeded per (seed, epoch, index): a resumed
run sees exactly the images and crops an uninterrupted one would.
"""
import io
import logging
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset

__all__ = ['IMG_EXTENSIONS', 'MAX_IMAGE_PIXELS', 'to_rgb', 'find_classes', 'ImageFolderDataset', 'HfImageDataset',
           'DataBundle', 'create_datasets', 'create_eval_dataset', 'create_transforms', 'create_dataloader']

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm')
_MAX_SUBSTITUTIONS = 16
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb warning threshold (about 9459 x 9459)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette and alpha images as RGB; transparent areas become white."""
    if img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        rgba = img.convert('RGBA')
        rgb = Image.new('RGB', rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel('A'))
        return rgb
    return img if img.mode == 'RGB' else img.convert('RGB')


def _open_rgb(source: Any, max_pixels: Optional[int] = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image as RGB; ValueError if its header declares more than `max_pixels` (None: no limit beyond
    PIL's own, which refuses over twice `PIL.Image.MAX_IMAGE_PIXELS`, about 179 M pixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # `max_pixels` is the limit that applies
        with Image.open(source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ValueError(f'{img.width} x {img.height} pixels exceed the limit of {max_pixels} '
                                 f'(--max-image-pixels)')
            img.load()
            return to_rgb(img)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the body with python's, numpy's (timm's RandAugment) and torch's global RNGs seeded, then put all back."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class _ImageDataset(Dataset):
    """Shared behaviour: transform, unreadable-image policy, per-sample augmentation seeds."""

    def __init__(self, class_names: Sequence[str], transform: Optional[Callable] = None, is_training: bool = False,
                 seed: int = 0, max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS):
        self.class_names = list(class_names)
        self.max_image_pixels = max_image_pixels
        self.transform = transform
        self.is_training = is_training
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int) -> Tuple[Image.Image, int]:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError

    def _try_load(self, index: int) -> Tuple[Optional[Image.Image], int]:
        try:
            return self._load(index)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises for bad files
            _logger.warning('skipping unreadable image %s: %s', self._describe(index), err)
            return None, -1

    def _apply(self, img: Image.Image, index: int) -> Any:
        if self.transform is None:
            return img
        if not self.is_training:
            return self.transform(img)
        with _seeded((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index):
            return self.transform(img)

    def __getitem__(self, index: int) -> Tuple[Any, int, int]:
        img, target = self._try_load(index)
        if img is not None:
            return self._apply(img, index), target, 0
        if not self.is_training:
            return self._apply(Image.new('RGB', (32, 32)), index), -1, 1
        for step in range(1, _MAX_SUBSTITUTIONS + 1):
            img, target = self._try_load((index + step) % len(self))
            if img is not None:
                return self._apply(img, index), target, 1
        raise RuntimeError(f'{_MAX_SUBSTITUTIONS + 1} consecutive unreadable images from {self._describe(index)} on')


def find_classes(split_dir: Path) -> List[str]:
    """Sorted class folder names of an image-folder split, checked to be non-empty."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f'expected an image folder at {split_dir} (<data-dir>/<split>/<class>/<image>)')
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith('.'))
    if not classes:
        raise ValueError(f'{split_dir} holds no class folders; expected <split>/<class>/<image> files')
    for name in classes:
        if not any(_is_image(path) for path in (split_dir / name).rglob('*')):
            raise ValueError(f'class folder {split_dir / name} holds no images ({", ".join(IMG_EXTENSIONS)})')
    return classes


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and path.is_file()


class ImageFolderDataset(_ImageDataset):
    """`root/<class>/**/<image>` with the given class order."""

    def __init__(self, root: Path, class_names: Sequence[str], **kwargs):
        super().__init__(class_names, **kwargs)
        self.root = Path(root)
        self.samples = [
            (path, target)
            for target, name in enumerate(self.class_names)
            for path in sorted(p for p in (self.root / name).rglob('*') if _is_image(p))  # none if absent
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Tuple[Image.Image, int]:
        path, target = self.samples[index]
        return _open_rgb(path, self.max_image_pixels), target

    def _describe(self, index: int) -> str:
        return str(self.samples[index][0])


class HfImageDataset(_ImageDataset):
    """A split of a Hugging Face `datasets.Dataset` with one Image and one ClassLabel column."""

    def __init__(self, hf_split: Any, **kwargs):
        import datasets
        image_key = _column_of_type(hf_split, datasets.Image)
        label_key = _column_of_type(hf_split, datasets.ClassLabel)
        super().__init__(hf_split.features[label_key].names, **kwargs)
        self.data = hf_split.cast_column(image_key, datasets.Image(decode=False))
        self.image_key, self.label_key = image_key, label_key

    def __len__(self) -> int:
        return len(self.data)

    def _load(self, index: int) -> Tuple[Image.Image, int]:
        row = self.data[index]
        image = row[self.image_key]
        source = io.BytesIO(image['bytes']) if image.get('bytes') else image['path']
        return _open_rgb(source, self.max_image_pixels), int(row[self.label_key])

    def _describe(self, index: int) -> str:
        return f'row {index} of {self.data.info.dataset_name or "the Hugging Face dataset"}'


def _column_of_type(hf_split: Any, feature_type: type) -> str:
    for key, feature in hf_split.features.items():
        if isinstance(feature, feature_type):
            return key
    raise ValueError(f'dataset columns {dict(hf_split.features)} include no {feature_type.__name__} column')


def _load_hf_splits(name: str, splits: Sequence[str], cache_dir: Optional[str]) -> List[Any]:
    """Splits of `name`: a `save_to_disk` folder, a local data folder, or a Hub id from the (offline) cache."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError('--dataset hfds/NAME needs the `datasets` package: pip install "timm-gcp[hfds]"') from err
    path = Path(name)
    if (path / 'dataset_dict.json').is_file():
        dataset_dict = datasets.load_from_disk(str(path))
    else:
        dataset_dict = datasets.load_dataset(name, cache_dir=cache_dir)
    found = []
    for split in splits:
        key = 'validation' if split == 'val' and 'val' not in dataset_dict and 'validation' in dataset_dict else split
        if key not in dataset_dict:
            raise ValueError(f'dataset {name!r} has no split {split!r}; it has {sorted(dataset_dict)}')
        found.append(dataset_dict[key])
    return found


@dataclass
class DataBundle:
    """Train and validation datasets and the class names they share."""
    train: _ImageDataset
    val: _ImageDataset
    class_names: List[str]


def create_datasets(data_dir: Optional[str], dataset: str = '', train_split: str = 'train', val_split: str = 'val',
                    seed: int = 0, max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS) -> DataBundle:
    """Check and index the data (before any model is built); transforms are attached later. Images over
    `max_image_pixels` (None: no limit) count as unreadable."""
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ValueError(f'--max-image-pixels must be a positive number of pixels, got {max_image_pixels}')
    limit = {'max_image_pixels': max_image_pixels}
    if dataset.startswith('hfds/'):
        train, val = _load_hf_splits(dataset[len('hfds/'):], (train_split, val_split), data_dir)
        train_ds = HfImageDataset(train, is_training=True, seed=seed, **limit)
        val_ds = HfImageDataset(val, **limit)
    elif dataset:
        raise ValueError(f'unsupported --dataset {dataset!r}: use "" (image folders) or hfds/NAME')
    else:
        if not data_dir:
            raise ValueError('no --data-dir given: expected a folder holding train/ and val/ image folders')
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f'--data-dir {root} does not exist')
        train_classes = find_classes(root / train_split)
        val_classes = find_classes(root / val_split)
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train_classes))
            raise ValueError(f'class folders differ between {root / train_split} and {root / val_split}: '
                             f'only in {train_split}: {only_train}, only in {val_split}: {only_val}')
        train_ds = ImageFolderDataset(root / train_split, train_classes, is_training=True, seed=seed, **limit)
        val_ds = ImageFolderDataset(root / val_split, val_classes, **limit)
    if train_ds.class_names != val_ds.class_names:
        raise ValueError(f'train and val class names differ: {train_ds.class_names} vs {val_ds.class_names}')
    return DataBundle(train_ds, val_ds, train_ds.class_names)


def create_eval_dataset(data_dir: Union[str, Path], label_names: Optional[Sequence[str]] = None,
                        max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS) -> ImageFolderDataset:
    """The validation images of `data_dir` (its `val/` or `validation/` folder, else `data_dir` itself), targets in
    the order of `label_names` (a model's classes; default: the sorted class folders), unreadable images flagged."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f'data dir {data_dir} does not exist')
    root = next((data_dir / name for name in ('val', 'validation') if (data_dir / name).is_dir()), data_dir)
    classes = find_classes(root)
    if label_names is not None:
        unknown = sorted(set(classes) - set(label_names))
        if unknown:
            raise ValueError(f'{root} has classes the model does not know: {unknown[:10]}')
        classes = list(label_names)
    return ImageFolderDataset(root, classes, max_image_pixels=max_image_pixels)


def create_transforms(model: torch.nn.Module, args: Dict[str, Any]) -> Tuple[Callable, Callable, Dict[str, Any]]:
    """timm train and eval transforms from the model's data config and the flags that override it."""
    data_config = resolve_data_config(
        {key: args.get(key) or None for key in ('img_size', 'crop_pct', 'interpolation')}, model=model)
    train_tf = create_transform(
        **data_config, is_training=True, scale=args.get('scale'), ratio=args.get('ratio'),
        hflip=args.get('hflip', 0.5), color_jitter=args.get('color_jitter', 0.4), auto_augment=args.get('aa'),
        re_prob=args.get('reprob', 0.))
    eval_tf = create_transform(**data_config)
    return train_tf, eval_tf, data_config


def create_dataloader(dataset: Dataset, batch_size: int, is_training: bool, workers: int,
                      seed: int = 0) -> DataLoader:
    """A plain DataLoader for `accelerate.prepare` (training: shuffled, full batches only).

    It draws its seeds from its own generator, never from the global RNG that dropout and mixup use, so starting an
    epoch part-way (resume) leaves the global RNG exactly where an uninterrupted run has it.
    """
    if is_training and len(dataset) < batch_size:
        raise ValueError(f'the training set has {len(dataset)} images, fewer than one batch of {batch_size}')
    return DataLoader(dataset, batch_size=batch_size, shuffle=is_training, drop_last=is_training,
                      num_workers=workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))
