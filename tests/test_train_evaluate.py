"""The evaluation shared by train.py and Hub verification: flip-averaged logits, and `evaluate` without an
accelerator against an independent count (top-1 per image, top-5 capped at the number of classes)."""
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from timm_gcp.training.data import create_dataloader, create_eval_dataset
from timm_gcp.training.evaluate import evaluate


class _LeftHalfSum(nn.Module):
    """bfloat16 logits (sum of the left half of the image, 0); a parameter only to tell evaluate the device."""

    def __init__(self):
        super().__init__()
        self.device_marker = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = x[..., : x.shape[-1] // 2].sum(dim=(1, 2, 3))
        return torch.stack([left, torch.zeros_like(left)], 1).to(torch.bfloat16)


def test_evaluate_averages_mirror_logits_in_float32():
    x = torch.arange(8.).reshape(1, 1, 1, 8) / 4          # left half sums to 1.5, right half to 5.5
    batches = [(x, torch.tensor([1]), torch.tensor([0]))]
    plain = evaluate(_LeftHalfSum(), batches)
    assert plain['val_loss'] == pytest.approx(math.log1p(math.exp(1.5)), rel=1e-6)  # float32 loss of logits (1.5, 0)
    flipped = evaluate(_LeftHalfSum(), batches, flip_test=True)                      # (1.5 + 5.5) / 2 = 3.5
    assert flipped['val_loss'] == pytest.approx(math.log1p(math.exp(3.5)), rel=1e-6)
    assert plain['top1'] == flipped['top1'] == 0.0 and plain['top5'] == 100.0


def _write_images(root, classes, per_class=2):
    """32 px images: the size of the blank placeholder an unreadable image becomes, so ToTensor batches them."""
    gen = torch.Generator().manual_seed(3)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f'{i}.png')


def test_eval_dataset_takes_the_models_class_order_and_flags_unreadable_images(tmp_path):
    _write_images(tmp_path / 'val', ['a', 'b'])
    (tmp_path / 'val' / 'b' / 'broken.png').write_bytes(b'not an image')
    data = create_eval_dataset(tmp_path, label_names=['c', 'b', 'a'])      # val/ found inside the data dir
    assert {Path(p).parents[1] for p, _ in data.samples} == {tmp_path / 'val'}
    samples = [data[i] for i in range(len(data))]
    assert sorted((Path(p).parent.name, t) for p, t in data.samples) == [('a', 2), ('a', 2), ('b', 1), ('b', 1),
                                                                         ('b', 1)]
    assert sum(flag for _, _, flag in samples) == 1
    assert create_eval_dataset(tmp_path / 'val').class_names == ['a', 'b']  # a split folder itself; sorted default
    with pytest.raises(ValueError, match=r"classes the model does not know: a$"):
        create_eval_dataset(tmp_path, label_names=['b'])


def test_evaluate_without_an_accelerator_counts_each_readable_image_once(tmp_path):
    _write_images(tmp_path / 'val', ['a', 'b', 'c'], per_class=3)
    (tmp_path / 'val' / 'a' / 'broken.png').write_bytes(b'\x89PNG truncated')
    data = create_eval_dataset(tmp_path)
    data.transform = T.ToTensor()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    result = evaluate(model, create_dataloader(data, 4, False, 0))
    # independent count: one image at a time, the unreadable one left out
    hits, losses = [], []
    for path, target in data.samples:
        if path.endswith('broken.png'):
            continue
        with torch.no_grad():
            logits = model(T.ToTensor()(Image.open(path).convert('RGB'))[None])
        hits.append(logits.argmax(1).item() == target)
        losses.append(nn.functional.cross_entropy(logits, torch.tensor([target])).item())
    assert (result['val_images'], result['unreadable_val']) == (9, 1)
    assert result['top1'] == pytest.approx(100 * sum(hits) / 9)
    assert result['top5'] == 100.0                                      # 3 classes: always among the top 5
    assert result['val_loss'] == pytest.approx(sum(losses) / 9, rel=1e-5)
    wide = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))
    wide[-1].bias.data[3:] += 100                  # top-5 of 7: classes 3-6 and the best of 0-2, some targets out
    with torch.no_grad():
        top5 = [target in wide(T.ToTensor()(Image.open(path).convert('RGB'))[None]).topk(5).indices
                for path, target in data.samples if not path.endswith('broken.png')]
    assert 0 < sum(top5) < 9
    assert evaluate(wide, create_dataloader(data, 4, False, 0))['top5'] == pytest.approx(100 * sum(top5) / 9)


def test_hub_verification_reevaluates_with_the_training_reader(tmp_path):
    """verify_folder counts like train.py: the model's class order (not sorted), an unreadable image left out."""
    import timm
    from timm.data import create_transform

    import timm_gcp  # noqa: F401
    from timm_gcp.hub import export_model
    from timm_gcp.hub.verify import verify_folder

    labels = ['zebra', 'ant', 'mole']
    _write_images(tmp_path / 'data' / 'val', labels, per_class=3)
    (tmp_path / 'data' / 'val' / 'ant' / 'broken.jpg').write_bytes(b'junk')
    torch.manual_seed(0)
    model = timm.create_model('gcp_resnet18', num_classes=3, gcp_dim=8).eval()
    data_config = {'input_size': (3, 32, 32), 'crop_pct': 1.0}
    transform = create_transform(**data_config)
    with torch.no_grad():  # independent count over the readable images, targets in the model's label order
        hits = [model(transform(Image.open(path).convert('RGB'))[None]).argmax(1).item() == target
                for target, label in enumerate(labels) for path in (tmp_path / 'data' / 'val' / label).glob('*.png')]
    accuracy = 100 * sum(hits) / len(hits)
    export_model(model, tmp_path / 'model', label_names=labels, metrics={'top1': accuracy, 'top5': 100.0},
                 dataset='toy', data_config=data_config)
    report = verify_folder(tmp_path / 'model', data_dir=tmp_path / 'data', tolerance=1e-6)
    assert report.measured['count'] == 9 and report.measured['top1'] == pytest.approx(accuracy)
