"""Shared fixtures: the image data every test can count on (the bundled pets sample, in the repository), the larger
optional sets beside the checkout, deterministic seeds, and a meta-layer registry that every test leaves as it found
it."""
import shutil
from pathlib import Path
from typing import Sequence

import pytest
import torch

from timm_gcp.meta_layers import registry

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = ROOT / 'data' / 'pets-mini'  # 37 classes, 8 train / 2 val images each, CC BY-SA 4.0
SHARED_DATA = ROOT.parent / 'shared' / 'data'


def image_subset(src: Path, dst: Path, classes: int, train: int, val: Sequence[int]) -> Path:
    """Copy the first `classes` classes of the image folder `src`: `train` images each and `val[i]` validation images
    of class i."""
    for c, name in enumerate(sorted(p.name for p in (src / 'train').iterdir())[:classes]):
        for split, count in (('train', train), ('val', val[c])):
            (dst / split / name).mkdir(parents=True)
            for f in sorted((src / split / name).iterdir())[:count]:
                shutil.copy(f, dst / split / name / f.name)
    return dst


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """`../shared/data` (read-only: copy before changing anything); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'needs the larger sample sets at {SHARED_DATA} (../shared/data beside the checkout, as on the '
                    f"project's CI machines); a clone elsewhere runs every test that the bundled data/pets-mini serves")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_meta_layer_registry():
    """Meta-layers a test registers are forgotten after it: no test sees another's."""
    registered = dict(registry._META_LAYERS)
    yield
    registry._META_LAYERS.clear()
    registry._META_LAYERS.update(registered)
