from .registry import (
    ExportAccuracyError, MetaLayer, create_meta_layer, is_meta_layer, list_meta_layers, register_meta_layer)
from .newton_schulz import ISqrt, newton_schulz_sqrt
from .spectral import MatrixPower, SpectralPower, SvdPade, SvdPowerIteration, SvdTaylor, SvdTrunc
from .lyapunov import MpaLya, MtpLya, solve_lyapunov
from .dropcov import Covariance
from .isice import ISice, sparse_inverse_covariance
