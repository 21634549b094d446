from .covariance import (
    IndefiniteCovarianceError, NonFiniteCovarianceError, autocast_enabled, check_covariance, check_square_batch,
    compute_dtype, covariance, fp32_backward, fp32_island, refuse_torchscript, triu_vec)
from .cusolver_eigh import check_cusolver_failures
from .eigh_backends import (
    EIGH_BACKEND_ENV, create_eigh_backend, differentiable_eigh, eigh, get_eigh_backend, list_eigh_backends,
    register_eigh_backend, select_eigh_backend, set_eigh_backend, use_eigh_backend)
