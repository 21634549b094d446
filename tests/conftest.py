"""Shared fixtures: the read-only sample data beside the checkout, deterministic seeds, and a meta-layer registry
that every test leaves as it found it."""
from pathlib import Path

import pytest
import torch

from timm_gcp.meta_layers import registry

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """`../shared/data` (read-only: copy before changing anything)."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f'expected the sample data at {SHARED_DATA} (../shared/data beside the checkout)')
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
