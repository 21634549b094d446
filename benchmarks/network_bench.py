"""Whole-network training-step throughput and peak memory: gcp_ARCH per meta-layer against timm's ARCH (GAP),
by default gcp_resnet50 against resnet50.

One step = bf16 autocast forward, cross-entropy, backward, SGD update, on random channels_last images.
"""
import gc
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F

from timing import guarded, median_ms, peak_memory_mib, ratio, reset_peak_memory


def measure_training(model_name: str, device: torch.device, batch: int, image_size: int, warmup: int, reps: int,
                     **model_kwargs) -> Dict[str, Optional[float]]:
    """{'img_per_s', 'step_ms', 'peak_mib'} of training steps of a freshly built model."""
    gc.collect()
    reset_peak_memory(device)
    model = timm.create_model(model_name, **model_kwargs).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images = torch.randn(batch, 3, image_size, image_size, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step_ms = median_ms(step, device, warmup, reps, budget_s=10.0)
    return {'img_per_s': batch / step_ms * 1e3, 'step_ms': step_ms, 'peak_mib': peak_memory_mib(device)}


def is_baseline_head(row: Dict[str, object], meta_layer: str) -> bool:
    """`row` is gcp_ARCH with `meta_layer` in its default configuration."""
    return row['meta_layer'] == meta_layer and not row['options']


def training_throughput(arch: str, names: Sequence[str], device: torch.device, batch: int, image_size: int,
                        warmup: int, reps: int, variants: Sequence[Tuple[str, Dict[str, object], bool]] = ()
                        ) -> Dict[str, object]:
    """`arch` (GAP) baseline, then gcp_`arch` with each meta-layer, then each (meta-layer, options, slow) of
    `variants` (slow ones with 1 warm-up and 2 steps). Ratios: throughput and memory against GAP, throughput against
    the iSQRT head."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    gcp_model = f'gcp_{arch}'
    rows: List[Dict[str, object]] = [{'model': arch, 'meta_layer': None, 'options': '', **guarded(
        lambda: measure_training(arch, device, batch, image_size, warmup, reps))}]
    skipped = None
    if not timm.list_models(gcp_model):
        skipped = f'{gcp_model} is not registered by timm_gcp'
    else:
        runs = [(name, {}, False) for name in names] + [v for v in variants if v[0] in names]
        for name, options, slow in runs:
            rows.append({'model': gcp_model, 'meta_layer': name,
                         'options': ', '.join(f'{k}={v}' for k, v in options.items()),
                         **guarded(lambda: measure_training(gcp_model, device, batch, image_size,
                                                            1 if slow else warmup, 2 if slow else reps,
                                                            meta_layer=name, meta_layer_kwargs=options))})
    gap = rows[0]
    isqrt = next((r for r in rows if is_baseline_head(r, 'isqrt')), {})
    for row in rows:
        row['throughput_vs_gap'] = ratio(row.get('img_per_s'), gap.get('img_per_s'))
        row['memory_vs_gap'] = ratio(row.get('peak_mib'), gap.get('peak_mib'))
        row['throughput_vs_isqrt'] = ratio(row.get('img_per_s'), isqrt.get('img_per_s'))
    return {'batch': batch, 'image_size': image_size, 'rows': rows, 'skipped': skipped}
