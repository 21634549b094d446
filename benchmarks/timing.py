"""Timing and memory helpers: CUDA events after warm-up on GPU, perf_counter on CPU; medians, never single runs."""
import statistics
import time
from typing import Callable, Dict, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int,
              budget_s: float = 0.5, warmup_s: float = 0.05) -> float:
    """Median wall time of `fn` in milliseconds: untimed calls (at least `warmup` of them and `warmup_s` seconds,
    so the device is at its working clock), then up to `reps` timed ones (fewer once `budget_s` is spent, at least 3).
    """
    started, done = time.perf_counter(), 0
    while done < warmup or time.perf_counter() - started < warmup_s:
        fn()
        synchronize(device)
        done += 1
    times = []
    spent = time.perf_counter()
    for _ in range(reps):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - spent > budget_s:
            break
    return statistics.median(times)


def spin_up(device: torch.device, seconds: float = 1.0) -> None:
    """Keep the device busy with matrix products for a while, so the first measurement runs at working clocks."""
    a = torch.randn(64, 512, 512, device=device)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.bmm(a, a)
        synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> Optional[float]:
    """Peak allocated device memory since the last reset (None on CPU, where it is not tracked)."""
    if device.type != 'cuda':
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    """value / base, None when either is missing."""
    return value / base if value and base else None


def guarded(measure: Callable[[], Dict[str, Optional[float]]]) -> Dict[str, object]:
    """Run one measurement; a failure is recorded as the result (with its error), not fatal to the suite."""
    try:
        return dict(measure())
    except Exception as e:  # noqa: BLE001 - any failure is a result to report
        return {'error': f'{type(e).__name__}: {e}'[:300]}
