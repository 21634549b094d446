"""Range checks for meta-layer options (they may come from a downloaded config): one ValueError naming the layer,
the option, the accepted range and the value given."""
import math
from numbers import Integral, Real
from typing import Any, Optional

__all__ = ['MAX_MATRIX_ITER', 'MAX_SERIES_TERMS', 'int_option', 'float_option', 'bool_option', 'optional']

MAX_MATRIX_ITER = 100  # matrix iterations and polynomial degrees: each step costs batched d x d products (and memory)
MAX_SERIES_TERMS = 1000  # scalar series of the svd_* backward: O(log n) elementwise steps


def int_option(layer: str, name: str, value: Any, low: int, high: int) -> int:
    """`value` if it is an int (not a bool or float) from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
        raise ValueError(f'{layer} option {name} must be an int from {low} to {high}, got {value!r}')
    return int(value)


def float_option(layer: str, name: str, value: Any, low: float, high: float, include_low: bool = False) -> float:
    """`value` as a float if it is a real number (not a bool) in (`low`, `high`] ([`low`, `high`] if `include_low`)."""
    valid = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
    if not valid or not (low <= value if include_low else low < value) or value > high:
        interval = f'{"[" if include_low else "("}{low}, {high}]'
        raise ValueError(f'{layer} option {name} must be a number in {interval}, got {value!r}')
    return float(value)


def bool_option(layer: str, name: str, value: Any) -> bool:
    """`value` if it is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f'{layer} option {name} must be True or False, got {value!r}')
    return value


def optional(check, layer: str, name: str, value: Optional[Any], *args, **kwargs) -> Optional[Any]:
    """None, or `check(layer, name, value, *args, **kwargs)`."""
    return None if value is None else check(layer, name, value, *args, **kwargs)
