"""A generated image folder for end-to-end tests: `<root>/{train,val}/<class>/*.jpg`, non-square images of several
sizes whose dominant colour channel is the class (so that one epoch learns something)."""
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def image_folder(root: Path, classes: Sequence[str] = ('cat', 'dog'), train: int = 6, val: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (('train', train), ('val', val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 160, (40 + 7 * i, 52, 3), dtype=np.uint8)
                pixels[..., c % 3] = 255
                Image.fromarray(pixels).save(root / split / name / f'{i}.jpg')
    return root
