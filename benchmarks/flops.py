"""Matrix-product flop counts: a device-independent measure of the work a meta-layer does."""
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode


def _batched_product_flops(input_shape: Sequence[int], left: Sequence[int], right: Sequence[int], *args,
                           **kwargs) -> int:
    """2·B·n·m·p for input + (B, n, m) @ (B, m, p)."""
    batch, rows, inner = left
    return 2 * batch * rows * inner * right[-1]


# torch's counter knows the out-of-place baddbmm only; the in-place one costs the same
IN_PLACE_PRODUCTS = {torch.ops.aten.baddbmm_: _batched_product_flops}


def matmul_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of the matrix products `fn` runs (forward and any backward it calls)."""
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE_PRODUCTS) as counter:
        fn()
    return counter.get_total_flops()
