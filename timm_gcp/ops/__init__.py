from .covariance import (
    IndefiniteCovarianceError, NonFiniteCovarianceError, autocast_enabled, batch_elements, check_covariance,
    check_square_batch, compute_dtype, covariance, flat_features, fp32_backward, fp32_island, is_tracing, psd_shifted,
    refuse_torchscript, triu_flat_index, triu_vec)
from .cusolver_eigh import check_cusolver_failures
from .eigh_backends import EIGH_BACKENDS, auto_eigh_backend, check_eigh_backend, eigh
from .newton import newton_inverse, newton_power, power_fraction
