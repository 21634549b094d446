"""iSICE (`isice`) in float64 against references independent of its code: scikit-learn's graphical lasso (a second
solver), the KKT conditions, the paper's update written out literally, and gradcheck through the unrolled steps."""
import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import timm_gcp
from timm_gcp.meta_layers.isice import sparse_inverse_covariance

sklearn_covariance = pytest.importorskip('sklearn.covariance', reason='scikit-learn (the test extra) is not installed')

D = 8


def sparse_precision_covariances(batch: int = 2, positions: int = 400, seed: int = 0) -> torch.Tensor:
    """float64 (batch, D, D) sample covariances of Gaussian features with a tridiagonal precision, scaled so that their
    traces are not 1 (the layer normalises by the trace and scales back)."""
    generator = torch.Generator().manual_seed(seed)
    neighbours = torch.diag(torch.ones(D - 1, dtype=torch.float64), 1)
    precision = 2 * torch.eye(D, dtype=torch.float64) - 0.8 * (neighbours + neighbours.T)
    factor = torch.linalg.cholesky(torch.linalg.inv(precision))
    x = factor @ torch.randn(batch, D, positions, dtype=torch.float64, generator=generator)
    x = x - x.mean(-1, keepdim=True)
    return 3.7 * x @ x.transpose(1, 2) / positions


def trace_normalised(cov: torch.Tensor) -> torch.Tensor:
    return cov / cov.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]


def objective(c: torch.Tensor, p: torch.Tensor, lam: float) -> float:
    """The graphical lasso objective with every entry penalised: tr(CP) − log det P + λ Σ|P_ij|."""
    return ((c * p).sum() - torch.logdet(p) + lam * p.abs().sum()).item()


def converged(cov: torch.Tensor, lam: float) -> torch.Tensor:
    """The layer's P for the trace-normalised C (its output times tr Σ), after 100 steps of size 30."""
    out = timm_gcp.create_meta_layer('isice', lam=lam, steps=100, lr=30.0)(cov)
    return out * cov.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]


@pytest.mark.parametrize('lam', [0.02, 0.05])
def test_many_steps_solve_the_graphical_lasso_as_scikit_learn_does(lam):
    """scikit-learn penalises the off-diagonal only; for positive-definite P, λ Σ_i |P_ii| = tr(λI·P), so the problem
    with every entry penalised on C is scikit-learn's on C + λI with alpha = λ: both solve the same problem."""
    cov = sparse_precision_covariances()
    precision = converged(cov, lam)
    for c, p in zip(trace_normalised(cov), precision):
        _, reference = sklearn_covariance.graphical_lasso(
            (c + lam * torch.eye(D, dtype=torch.float64)).numpy(), alpha=lam, tol=1e-12, enet_tol=1e-12,
            max_iter=10_000)
        reference = torch.from_numpy(reference)
        assert objective(c, p, lam) <= objective(c, reference, lam) + 1e-10  # as low as the second solver's
        assert abs(objective(c, p, lam) - objective(c, reference, lam)) < 1e-9
        assert torch.equal(p != 0, torch.from_numpy(np.abs(reference.numpy()) > 1e-8))  # the same sparsity pattern
        assert 0 < (p == 0).sum() < D * D - D  # the pattern is neither dense nor diagonal
        torch.testing.assert_close(p, reference, rtol=0, atol=1e-4)  # scikit-learn's own tolerance bounds this


@pytest.mark.parametrize('lam', [0.02, 0.05])
def test_many_steps_satisfy_the_kkt_conditions(lam):
    """At the solution G = C − P⁻¹ has G_ij = −λ sign(P_ij) where P_ij ≠ 0 and |G_ij| ≤ λ where P_ij = 0."""
    cov = sparse_precision_covariances(seed=1)
    precision = converged(cov, lam)
    gradient = trace_normalised(cov) - torch.linalg.inv(precision)
    support = precision != 0
    on_support = (gradient + lam * precision.sign())[support].abs().max()
    off_support = (gradient.abs() - lam)[~support].max()
    assert on_support < 1e-7 and off_support < 1e-9, (on_support, off_support)
    assert torch.linalg.eigvalsh(precision).min() > 0


def paper_update(cov: torch.Tensor, lam: float, steps: int, lr: float) -> torch.Tensor:
    """iSICE as the CVPR 2023 paper writes it, every step literally (float64): C = Σ/tr Σ, P = (C + λI)⁻¹, then for
    i < steps: G = sym(C) − P⁻¹, P± = relu(±P), P± ← relu(P± − η(1 − i/(steps − 1))(±G + λ)), P = sym(P⁺ − P⁻);
    out = P/tr Σ."""
    trace = cov.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    c = cov / trace
    p = torch.linalg.inv(c + lam * torch.eye(cov.shape[-1], dtype=cov.dtype))
    for i in range(steps):
        decay = 1.0 if steps == 1 else 1 - i / (steps - 1)
        g = 0.5 * (c + c.transpose(1, 2)) - torch.linalg.inv(p)
        plus = torch.relu(torch.relu(p) - lr * decay * (g + lam))
        minus = torch.relu(torch.relu(-p) - lr * decay * (-g + lam))
        p = 0.5 * ((plus - minus) + (plus - minus).transpose(1, 2))
    return p / trace


@pytest.mark.parametrize('options', [{}, {'lam': 0.05, 'steps': 3, 'lr': 2.0}, {'lam': 0.05, 'steps': 1},
                                     {'steps': 20, 'lr': 5.0}])
def test_few_steps_follow_the_paper_update(options):
    cov = timm_gcp.covariance(torch.randn(3, 16, 40, dtype=torch.float64))
    lam, steps, lr = options.get('lam', 0.01), options.get('steps', 5), options.get('lr', 1.0)
    out = timm_gcp.create_meta_layer('isice', **options)(cov)
    torch.testing.assert_close(out, paper_update(cov, lam, steps, lr), rtol=1e-10, atol=1e-12)
    assert (out == 0).any()  # the threshold zeroes entries from the first step on


def test_float32_default_on_rank_deficient_covariances_matches_float64():
    features = torch.randn(2, 64, 49, dtype=torch.float64)  # 49 positions < 64 channels: C is singular
    cov = timm_gcp.covariance(features)
    out = timm_gcp.create_meta_layer('isice')(cov.float())
    reference = paper_update(cov, 0.01, 5, 1.0)
    assert out.dtype == torch.float32
    assert ((out.double() - reference).abs().max() / reference.abs().max()) < 1e-4


def test_a_step_leaving_the_positive_definite_cone_is_skipped():
    """With too large a step the literal update makes one matrix indefinite (its P⁻¹ is then meaningless); the layer
    keeps that matrix's last positive-definite P and the other matrix's full update."""
    cov = sparse_precision_covariances(batch=2)
    lam, lr = 0.01, 100.0  # steps of size 100, then 50
    literal = paper_update(cov, lam, 3, lr)
    assert torch.linalg.eigvalsh(literal[0]).min() > 0 > torch.linalg.eigvalsh(literal[1]).min()
    out = timm_gcp.create_meta_layer('isice', lam=lam, steps=3, lr=lr)(cov)
    torch.testing.assert_close(out[0], literal[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[1], paper_update(cov, lam, 2, lr)[1], rtol=1e-10, atol=1e-12)  # the first step
    assert torch.linalg.eigvalsh(out).min() > 0


def test_output_scales_as_the_inverse_of_the_covariance():
    cov = sparse_precision_covariances(batch=1)
    layer = timm_gcp.create_meta_layer('isice')
    torch.testing.assert_close(layer(1e3 * cov), layer(cov) / 1e3, rtol=1e-12, atol=0)


@pytest.mark.parametrize('options', [{}, {'lam': 0.1, 'steps': 8, 'lr': 5.0}])
def test_gradcheck_through_the_unrolled_steps(options):
    cov = timm_gcp.covariance(torch.randn(2, 6, 30, dtype=torch.float64)).requires_grad_()
    assert gradcheck(lambda c: sparse_inverse_covariance(c, **options), (cov,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_through_a_skipped_step():
    cov = sparse_precision_covariances(batch=2)[1:].requires_grad_()  # the skipping matrix of the test above
    assert gradcheck(lambda c: sparse_inverse_covariance(c, lam=0.01, steps=3, lr=100.0), (cov,), eps=1e-7,
                     atol=1e-6, rtol=1e-5)
