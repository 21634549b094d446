"""Matrix functions of symmetric PSD matrices from matrix products alone: the export paths of meta-layers whose exact
forward needs an eigendecomposition or a linear solve, which ONNX does not have. Each runs a fixed number of
iterations, chosen from the scalar recurrence every eigenvalue follows; the error analysis: docs/models.md#deploying.
"""
import functools
import math
from fractions import Fraction
from typing import List, Optional, Tuple

import torch

__all__ = ['spectral_radius_bound', 'newton_power', 'newton_inverse', 'power_fraction', 'root_iterations',
           'inverse_iterations']

MAX_ROOT_DENOMINATOR = 32  # an iteration costs about 2 + 2·log2 p products


def _trace(m: torch.Tensor) -> torch.Tensor:
    # not diagonal(): TorchScript's ONNX export of a float64 diagonal declares a wrong element type
    return (m * _identity(m)).sum(dim=(-2, -1))


def _identity(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def _scaled(m: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return m / scale[:, None, None]


def spectral_radius_bound(cov: torch.Tensor, squarings: int = 6) -> torch.Tensor:
    """(B,) upper bounds of max|λ| of (B, d, d) symmetric matrices with a positive trace, at most
    rank^(2^-squarings) times it (1.09 for rank 256 and 6 squarings): tr(Σ^(2^s))^(2^-s), from s squarings each
    rescaled to unit trace."""
    tiny = torch.finfo(cov.dtype).tiny
    trace = _trace(cov).clamp_min(tiny)
    log_bound = trace.log()
    power = _scaled(cov, trace)
    for step in range(1, squarings + 1):
        power = power @ power
        trace = _trace(power).clamp_min(tiny)
        log_bound = log_bound + trace.log() * 2.0 ** -step
        power = _scaled(power, trace)
    return log_bound.exp()


def power_fraction(power: float) -> Optional[Tuple[int, int]]:
    """(q, p) with q/p = `power` and p <= MAX_ROOT_DENOMINATOR, or None."""
    fraction = Fraction(power).limit_denominator(MAX_ROOT_DENOMINATOR)
    return (fraction.numerator, fraction.denominator) if abs(fraction - power) <= 1e-12 * power else None


@functools.lru_cache(maxsize=None)
def root_iterations(q: int, p: int, low: float, tol: float) -> int:
    """Iterations after which `newton_power`'s iteration reaches relative error `tol` on every eigenvalue of a
    matrix whose spectrum lies in [low, 1]: with m_0 = λ, m_(k+1) = m_k·((p + 1 − m_k)/p)^p (monotone in λ,
    increasing to 1), the k-th iterate is λ^(q/p)·m_k^(n − q/p), n = ceil(q/p)."""
    if not 0 < low <= 1:
        raise ValueError(f'root_iterations needs a spectrum floor in (0, 1], got {low}')
    exponent = math.ceil(q / p) - q / p
    m, k = low, 0
    while 1 - m ** exponent > tol:
        m *= ((p + 1 - m) / p) ** p
        k += 1
    return k


def _matrix_powers(m: torch.Tensor, *exponents: int) -> List[torch.Tensor]:
    """M^e for each exponent e >= 1, sharing the repeated squares."""
    squares = [m]
    while 2 ** len(squares) <= max(exponents):
        squares.append(squares[-1] @ squares[-1])
    powers = []
    for exponent in exponents:
        factors = [square for bit, square in enumerate(squares) if exponent >> bit & 1]
        power = factors[0]
        for factor in factors[1:]:
            power = power @ factor
        powers.append(power)
    return powers


def newton_power(cov: torch.Tensor, alpha: float, floor: float) -> torch.Tensor:
    """(Σ² + (floor·λ̂)²·I)^(alpha/2) of (B, d, d) symmetric matrices, λ̂ >= max|λ| (`spectral_radius_bound`): each
    eigenvalue λ becomes (λ² + floor²·λ̂²)^(alpha/2), |λ|^alpha with a smooth floor, the stand-in for an exact
    layer's clamp max(λ, floor·λ_max)^alpha that rounding noise (slightly negative eigenvalues) cannot break.
    alpha/2 = q/p (`power_fraction`, p <= 16); computed in `cov`'s dtype (float64 resolves floor² = 1.4e-14).

    Coupled Newton iteration for the inverse p-th root (Guo & Higham, SIAM J. Matrix Anal. Appl. 28(3), 2006; for
    p = 2 it is iSQRT-COV's): with A = (Σ²/λ̂² + floor²·I)/(1 + floor²), Y_0 = A^n, M_0 = A, T = ((p + 1)I − M)/p,
    Y ← Y·T^(np − q), M ← M·T^p; Y -> A^(q/p). `root_iterations` steps (41 for alpha = ½ and floor 1.2e-7) reach
    the dtype's precision on every eigenvalue.
    """
    if power_fraction(alpha / 2) is None:
        raise ValueError(f'newton_power computes powers alpha with alpha/2 = q/p, p <= {MAX_ROOT_DENOMINATOR}, '
                         f'got alpha={alpha}')
    q, p = power_fraction(alpha / 2)
    n = math.ceil(q / p)
    eye = _identity(cov)
    radius = spectral_radius_bound(cov)
    unit = _scaled(cov, radius)
    a = (unit @ unit + floor ** 2 * eye) / (1 + floor ** 2)
    y, m = _matrix_powers(a, n)[0], a
    for _ in range(root_iterations(q, p, floor ** 2 / (1 + floor ** 2), torch.finfo(cov.dtype).eps)):
        t_root, t_p = _matrix_powers(((p + 1) * eye - m) / p, n * p - q, p)
        y, m = y @ t_root, m @ t_p
    scale = (radius * math.sqrt(1 + floor ** 2)) ** alpha
    return 0.5 * (y + y.transpose(-1, -2)) * scale[:, None, None]


@functools.lru_cache(maxsize=None)
def inverse_iterations(low: float, tol: float) -> int:
    """Iterations after which `newton_inverse` reaches relative error `tol` on a spectrum in [low, 1]: the error
    e_k = ((1 − low)/(1 + low))^(2^k) squares at each step."""
    error, k = (1 - low) / (1 + low), 0
    while error > tol:
        error, k = error * error, k + 1
    return k


def newton_inverse(m: torch.Tensor, low: float) -> torch.Tensor:
    """M⁻¹ of (B, d, d) symmetric matrices whose eigenvalues lie in [`low`, 1] (known in advance), by the
    Newton–Schulz iteration X ← X(2I − M X) from X_0 = 2/(1 + low)·I, to the dtype's precision."""
    eye = _identity(m)
    x = 2 / (1 + low) * eye.expand_as(m)
    for _ in range(inverse_iterations(low, torch.finfo(m.dtype).eps)):
        x = x @ (2 * eye - m @ x)
    return x
