from .covariance import check_square_batch, compute_dtype, covariance, fp32_island, triu_vec
from .eigh import create_eigh_backend, eigh, get_eigh_backend, list_eigh_backends, register_eigh_backend, set_eigh_backend
