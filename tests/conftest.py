"""Shared fixtures: the read-only sample data beside the checkout, and deterministic seeds."""
from pathlib import Path

import pytest
import torch

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
