"""Training data: folder checks, RGB conversion, unreadable images (decompression bombs and the pixel limit too),
per-sample augmentation seeds, HF datasets."""
import logging
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from timm_gcp.training.data import create_dataloader, create_datasets


def _make_folder(root: Path, classes=('a', 'b'), per_class=3, size=24):
    for split in ('train', 'val'):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new('RGB', (size, size), (40 * c + 10 * i, 100, 200)).save(root / split / name / f'{i}.png')
    return root


def test_every_image_mode_is_read_as_rgb_with_transparency_on_white(tmp_path):
    palette = Image.new('P', (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((1, 0), 1)
    palette.info['transparency'] = 0
    cases = {
        'L.png': Image.new('L', (4, 4), 128),
        'CMYK.tif': Image.new('CMYK', (4, 4), (0, 255, 255, 0)),        # pure red in CMYK
        'P.png': Image.new('RGB', (4, 4), (0, 0, 255)).convert('P'),
        'RGBA.png': Image.new('RGBA', (4, 4), (255, 0, 0, 0)),         # fully transparent red
        'LA.png': Image.new('LA', (4, 4), (0, 255)),
        'I16.png': Image.new('I;16', (4, 4), 100),
        'palette.png': palette,                                          # colour 0 transparent
    }
    for split in ('train', 'val'):
        (tmp_path / split / 'a').mkdir(parents=True)
        for name, img in cases.items():
            img.save(tmp_path / split / 'a' / name)
    data = create_datasets(str(tmp_path))
    assert {Image.open(path).mode for path, _ in data.val.samples} >= {'L', 'CMYK', 'P', 'RGBA', 'LA', 'I;16'}
    rgb = {Path(path).name: data.val[i] for i, (path, _) in enumerate(data.val.samples)}
    for name, (img, target, unreadable) in rgb.items():
        assert img.mode == 'RGB' and img.size == cases[name].size and (target, unreadable) == (0, 0), name
    assert rgb['CMYK.tif'][0].getpixel((0, 0)) == (255, 0, 0)
    assert rgb['RGBA.png'][0].getpixel((0, 0)) == (255, 255, 255)     # transparent areas become white
    assert rgb['LA.png'][0].getpixel((0, 0)) == (0, 0, 0)
    assert rgb['P.png'][0].getpixel((0, 0)) == (0, 0, 255)
    assert [rgb['palette.png'][0].getpixel((x, 0)) for x in (0, 1)] == [(255, 255, 255), (0, 255, 0)]


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        create_datasets(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match='no --data-dir'):
        create_datasets(None)
    root = _make_folder(tmp_path / 'd')
    shutil.rmtree(root / 'val')
    with pytest.raises(FileNotFoundError, match=r'val'):
        create_datasets(str(root))
    root = _make_folder(tmp_path / 'e')
    (root / 'train' / 'c').mkdir()
    (root / 'train' / 'c' / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match=r'class folder .*train/c holds no images'):
        create_datasets(str(root))
    root = _make_folder(tmp_path / 'f')
    shutil.move(root / 'val' / 'b', root / 'val' / 'z')
    with pytest.raises(ValueError, match=r"only in train: \['b'\], only in val: \['z'\]"):
        create_datasets(str(root))
    with pytest.raises(ValueError, match='unsupported --dataset'):
        create_datasets(str(root), dataset='tfds/x')


def test_classes_in_timms_natural_order_labelled_by_the_folder_holding_the_image(tmp_path):
    root = _make_folder(tmp_path / 'd', classes=('c10', 'c9'), per_class=1)
    (root / 'train' / 'c9' / 'sub').mkdir()
    Image.new('RGB', (4, 4)).save(root / 'train' / 'c9' / 'sub' / 'x.png')  # in leaf folder 'sub': no class, left out
    data = create_datasets(str(root))
    assert data.class_names == ['c9', 'c10']                              # as timm's ImageDataset numbers them
    assert [(Path(p).parent.name, t) for p, t in data.train.samples] == [('c9', 0), ('c10', 1)]


def test_unreadable_images_skipped_and_flagged(tmp_path):
    root = _make_folder(tmp_path / 'd')
    (root / 'train' / 'a' / '1.png').write_bytes(b'not a png at all')
    good = (root / 'val' / 'b' / '0.png').read_bytes()
    (root / 'val' / 'b' / '0.png').write_bytes(good[:len(good) // 2])      # truncated
    data = create_datasets(str(root))
    tf = create_transform(16)
    data.train.transform, data.val.transform = tf, tf
    samples = [data.train[i] for i in range(len(data.train))]
    assert [s[2] for s in samples] == [0, 1, 0, 0, 0, 0]             # substituted by the next readable image
    assert samples[1][1] == 0 and samples[1][0].shape == (3, 16, 16)
    val = [data.val[i] for i in range(len(data.val))]
    assert [s[2] for s in val] == [0, 0, 0, 1, 0, 0]                 # placeholder, flagged for evaluation to skip
    assert val[3][0].shape == (3, 16, 16) and val[3][1] == -1


def _declare_size(png: Path, width: int, height: int) -> None:
    """Rewrite the IHDR chunk of a PNG so that its header declares `width` x `height` (CRC fixed, data unchanged)."""
    data = bytearray(png.read_bytes())
    ihdr = bytearray(data[16:29])  # IHDR payload after the 8-byte signature, length and type
    ihdr[0:8] = struct.pack('>II', width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack('>I', zlib.crc32(b'IHDR' + bytes(ihdr)))
    png.write_bytes(bytes(data))


def test_decompression_bombs_and_images_over_the_pixel_limit_are_skipped(tmp_path, caplog):
    root = _make_folder(tmp_path / 'd')
    bomb = root / 'train' / 'a' / '1.png'
    _declare_size(bomb, 100_000, 100_000)                               # 10 G pixels: PIL's DecompressionBombError
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)
    _declare_size(root / 'val' / 'b' / '0.png', 12_000, 10_000)         # 120 M: over the default limit (89.5 M)
    tf = create_transform(16)
    data = create_datasets(str(root))
    data.train.transform, data.val.transform = tf, tf
    with caplog.at_level(logging.WARNING):
        assert [data.train[i][2] for i in range(len(data.train))] == [0, 1, 0, 0, 0, 0]
        assert [data.val[i][2] for i in range(len(data.val))] == [0, 0, 0, 1, 0, 0]
    assert str(bomb) in caplog.text and str(root / 'val' / 'b' / '0.png') in caplog.text
    # a lower limit (--max-image-pixels) skips the ordinary 24 x 24 images as well; None leaves only PIL's limit
    small = create_datasets(str(root), max_image_pixels=24 * 24 - 1)
    small.val.transform = tf
    assert [small.val[i][2] for i in range(len(small.val))] == [1] * 6
    assert 'exceed the limit of 575 (--max-image-pixels)' in caplog.text
    unlimited = create_datasets(str(root), max_image_pixels=None)
    unlimited.train.transform = tf
    assert unlimited.train[1][2] == 1                                   # PIL's own bomb limit still applies
    with pytest.raises(ValueError, match='--max-image-pixels must be a positive number of pixels, got -1'):
        create_datasets(str(root), max_image_pixels=-1)


def test_training_augmentations_seeded_per_sample(tmp_path):
    root = _make_folder(tmp_path / 'd', size=40)
    tf = create_transform(16, is_training=True)
    ds = create_datasets(str(root), seed=3).train
    ds.transform = tf
    first = ds[2][0]
    torch.rand(100)                                                   # global RNG use elsewhere changes nothing
    assert torch.equal(ds[2][0], first)
    state = torch.get_rng_state()
    ds[4]
    assert torch.equal(torch.get_rng_state(), state)                  # loading leaves the global RNG alone
    ds.transform = create_transform(16, is_training=True, auto_augment='rand-m9-n2-mstd0.5')  # draws from numpy
    augmented = ds[2][0]
    np.random.rand(100)
    assert torch.equal(ds[2][0], augmented)
    _, keys, position, *_ = np.random.get_state()
    ds[4]
    assert np.array_equal(np.random.get_state()[1], keys) and np.random.get_state()[2] == position  # numpy's too
    ds.transform = tf
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], first)                           # a new epoch, new crops
    in_workers = [x for x, _, _ in create_dataloader(ds, 3, is_training=False, workers=2)]
    in_process = [x for x, _, _ in create_dataloader(ds, 3, is_training=False, workers=0)]
    assert all(torch.equal(a, b) for a, b in zip(in_workers, in_process))  # same crops whoever loads them


def test_hf_dataset_from_disk_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip('datasets')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    features = datasets.Features({'img': datasets.Image(), 'label': datasets.ClassLabel(names=['cat', 'dog'])})
    splits = {}
    for split, n in (('train', 4), ('validation', 3)):
        images = [Image.new('L' if i % 2 else 'RGB', (20, 20), 30 * i) for i in range(n)]
        splits[split] = datasets.Dataset.from_dict({'img': images, 'label': [i % 2 for i in range(n)]}, features)
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / 'pets_hf'))
    data = create_datasets(str(tmp_path / 'cache'), dataset=f'hfds/{tmp_path / "pets_hf"}')
    assert data.class_names == ['cat', 'dog']
    assert (len(data.train), len(data.val)) == (4, 3)               # 'val' falls back to the 'validation' split
    data.val.transform = create_transform(16)
    img, target, unreadable = data.val[1]
    assert img.shape == (3, 16, 16) and (target, unreadable) == (1, 0)


def test_hf_dataset_local_parquet_folder_through_the_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip('datasets')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    features = datasets.Features({'image': datasets.Image(), 'breed': datasets.ClassLabel(names=['a', 'b', 'c'])})
    folder = tmp_path / 'pets_parquet'
    folder.mkdir()
    for split, n in (('train', 6), ('validation', 3)):
        rows = {'image': [Image.new('RGB', (12, 12), (20 * i, 0, 0)) for i in range(n)],
                'breed': [i % 3 for i in range(n)]}
        datasets.Dataset.from_dict(rows, features).to_parquet(str(folder / f'{split}.parquet'))
    cache = tmp_path / 'hf_cache'
    data = create_datasets(str(cache), dataset=f'hfds/{folder}')
    assert data.class_names == ['a', 'b', 'c'] and (len(data.train), len(data.val)) == (6, 3)
    assert any(cache.rglob('*.arrow'))                               # prepared into --data-dir, the datasets cache
    data.train.transform = create_transform(8)
    assert [data.train[i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_a_symlink_loop_in_the_data_is_refused_with_its_path(tmp_path):
    """Issue 21, fault 5: `train/a/loop -> ..` made timm's scan (os.walk following links) count every image again at
    each of ~40 levels; links to folders elsewhere still count once."""
    root = _make_folder(tmp_path / 'data')
    (root / 'train' / 'a' / 'loop').symlink_to('..')
    with pytest.raises(ValueError, match=rf"symlink loop in the data: {root / 'train' / 'a' / 'loop'} points to "
                                         rf"{root / 'train'}, which holds it"):
        create_datasets(str(root))
    (root / 'train' / 'a' / 'loop').unlink()
    (root / 'train' / 'a' / 'up').symlink_to('../../..')              # above the split folder: a loop as well
    with pytest.raises(ValueError, match=r'train/a/up points to'):
        create_datasets(str(root))
    (root / 'train' / 'a' / 'up').unlink()
    (root / 'train' / 'a' / 'x').symlink_to('../b')                    # a and b linked into each other
    (root / 'train' / 'b' / 'y').symlink_to('../a')
    with pytest.raises(ValueError, match=r'symlink loop in the data: .*/train/a/x/y points to'):
        create_datasets(str(root))
    for link in ('a/x', 'b/y'):
        (root / 'train' / link).unlink()
    elsewhere = _make_folder(tmp_path / 'more', classes=('c',), per_class=2)
    (root / 'train' / 'c').symlink_to(elsewhere / 'train' / 'c', target_is_directory=True)  # a linked class folder
    (root / 'val' / 'c').symlink_to(elsewhere / 'val' / 'c', target_is_directory=True)
    data = create_datasets(str(root))
    assert data.class_names == ['a', 'b', 'c'] and len(data.train) == 8


def test_a_class_folder_not_named_in_utf8_is_refused_with_its_bytes(tmp_path):
    """Issue 21, fault 10: a folder named b'dais\\xff' became the label 'dais\\udcff' (a lone surrogate)."""
    root = _make_folder(tmp_path / 'data', classes=('a',))
    for split in ('train', 'val'):
        try:
            os.mkdir(os.fsencode(root / split) + b'/dais\xff')
        except OSError as err:  # e.g. a file system that stores names as Unicode
            pytest.skip(f'this file system refuses a name that is not UTF-8: {err}')
        shutil.copy(root / split / 'a' / '0.png', os.fsdecode(os.fsencode(root / split) + b'/dais\xff/0.png'))
    with pytest.raises(ValueError, match=re.escape(rf"class folder name b'dais\xff' in {root / 'train'} is not "
                                                   r'valid UTF-8')):
        create_datasets(str(root))
