"""Top-1/top-5 of a classifier on an image folder, with the model's own data config."""
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from timm.data import ImageDataset, create_transform, resolve_model_data_config
from torch import nn

from ..metrics import predict, topk_correct

__all__ = ['evaluate_folder', 'find_split_dir']


def find_split_dir(data_dir: Union[str, Path]) -> Path:
    """The validation folder of `data_dir` (`val/` or `validation/` inside it), or `data_dir` itself."""
    data_dir = Path(data_dir)
    for name in ('val', 'validation'):
        if (data_dir / name).is_dir():
            return data_dir / name
    if not data_dir.is_dir():
        raise ValueError(f'data dir {data_dir} does not exist')
    return data_dir


@torch.no_grad()
def evaluate_folder(
        model: nn.Module,
        data_dir: Union[str, Path],
        label_names: Optional[Sequence[str]] = None,
        batch_size: int = 32,
        hflip_average: bool = False,
) -> Dict[str, float]:
    """{'top1', 'top5', 'count'} in % over `<data_dir>/val/<class>/*` (classes mapped through `label_names`)."""
    root = find_split_dir(data_dir)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    class_map = None
    if label_names is not None:
        unknown = sorted(set(classes) - set(label_names))
        if unknown:
            raise ValueError(f'{root} has classes the model does not know: {unknown[:10]}')
        class_map = {name: i for i, name in enumerate(label_names)}
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    dataset = ImageDataset(str(root), class_map=class_map, transform=transform)
    if len(dataset) == 0:
        raise ValueError(f'no images under {root}')
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval()
    hits = torch.cat([topk_correct(predict(model, images, hflip_average), targets) for images, targets in loader])
    top1, top5 = (100.0 * hits.mean(dim=0)).tolist()
    return {'top1': top1, 'top5': top5, 'count': len(dataset)}
