"""The GCP head's options beyond DropCov against float64 references: the global Gaussian embedding (G2DeNet / MPN-COV
journal), the compact heads (progressive reduction, row-wise group convolution) and IDCCP's orthonormal compression;
their model kwargs, bad values and checkpoints saved with other options."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.autograd import gradcheck

import timm_gcp
from timm_gcp.layers import (
    GCPPool, ProgressiveReduction, RowGroupConv, StiefelCompression, gaussian_embedding, head_option_defaults,
    orthonormal_columns,
)

NUM_CLASSES = 5
GCP_DIM = 8


def create(**kwargs) -> torch.nn.Module:
    return timm.create_model('gcp_resnet18', num_classes=NUM_CLASSES, gcp_dim=GCP_DIM, **kwargs).eval()


def reference_embedding(x: torch.Tensor) -> torch.Tensor:
    """[[Σ + μμᵀ, μ], [μᵀ, 1]] written out from each sample's mean and (biased) covariance, float64."""
    out = []
    for sample in x.double().flatten(2):
        mu = sample.mean(1)
        sigma = torch.cov(sample, correction=0)
        top = torch.cat([sigma + torch.outer(mu, mu), mu[:, None]], 1)
        out.append(torch.cat([top, torch.cat([mu, mu.new_ones(1)])[None]], 0))
    return torch.stack(out)


def reference_power(m: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(m.double())
    return (evecs * evals.clamp_min(0).pow(alpha).unsqueeze(-2)) @ evecs.transpose(-1, -2)


def gram_schmidt(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning a's leading columns, classical Gram-Schmidt twice (float64 reference)."""
    q = []
    for column in a.double().T:
        for _ in range(2):
            for basis in q:
                column = column - (basis @ column) * basis
        q.append(column / column.norm())
    return torch.stack(q, 1)


# ---------------------------------------------------------------- Gaussian embedding

@pytest.mark.parametrize('shape', [(3, 6, 5, 4), (2, 6, 3), (2, 9, 2, 2)], ids=['M>d', 'M<d', 'rank-deficient'])
def test_gaussian_embedding_matches_its_definition(shape):
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(gaussian_embedding(x), reference_embedding(x), rtol=1e-12, atol=1e-12)


def test_gaussian_embedding_of_constant_features_is_rank_one():
    x = torch.full((2, 4, 3, 3), 2.0, dtype=torch.float64)  # Σ = 0: the embedding is [μ; 1][μ; 1]ᵀ
    mu1 = torch.tensor([2., 2., 2., 2., 1.], dtype=torch.float64)
    torch.testing.assert_close(gaussian_embedding(x)[0], torch.outer(mu1, mu1))


@pytest.mark.parametrize('meta_layer, kwargs, tol', [('eig', {}, 1e-9), ('isqrt', {'num_iter': 30}, 1e-5)])
def test_normalised_gaussian_squares_back_to_the_embedding(meta_layer, kwargs, tol):
    pool = GCPPool(6, dim=None, meta_layer=meta_layer, meta_layer_kwargs=kwargs, gaussian=True).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    root = pool.meta_layer(pool.second_order(x))
    embedding = reference_embedding(x)
    torch.testing.assert_close(root @ root, embedding, rtol=tol, atol=tol * embedding.abs().max().item())
    torch.testing.assert_close(root, reference_power(embedding), rtol=tol, atol=tol)
    rows, cols = torch.triu_indices(7, 7)
    torch.testing.assert_close(pool(x), root[:, rows, cols])  # then vectorised (triu)


def test_gaussian_head_under_autocast_and_in_pure_bf16():
    pool = GCPPool(8, dim=4, gaussian=True).eval()
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        reference = pool(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert pool(x.bfloat16()).dtype == torch.float32
        low = copy.deepcopy(pool).bfloat16()(x.bfloat16())
    assert low.dtype == torch.bfloat16 and reference.shape == (2, 15)
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


# ---------------------------------------------------------------- IDCCP compression

def test_compression_is_wt_sigma_w_with_orthonormal_w():
    layer = StiefelCompression(7, 3).double()
    with torch.no_grad():
        layer.factor.normal_()  # a general full-rank factor, not the orthonormal initialisation
    cov = torch.randn(2, 7, 20, dtype=torch.float64)
    cov = cov @ cov.transpose(1, 2) / 20
    w = gram_schmidt(layer.factor)  # the same span and orientation, computed independently
    expected = torch.einsum('ia,bij,jc->bac', w, cov, w)
    torch.testing.assert_close(layer.weight, w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer(cov), expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        layer.factor.mul_(1e-3)  # weight decay rescales the factor: W does not move
    torch.testing.assert_close(layer.weight, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_w_stays_orthonormal_through_training_and_reloads_exactly(optimizer):
    layer = StiefelCompression(32, 6)
    opt = (torch.optim.SGD(layer.parameters(), lr=10.0, momentum=0.9, weight_decay=0.1) if optimizer == 'sgd' else
           torch.optim.AdamW(layer.parameters(), lr=1.0, weight_decay=0.5))
    target = torch.randn(6, 6)
    for _ in range(100):
        cov = torch.randn(4, 32, 40)
        loss = (layer(cov @ cov.transpose(1, 2) / 40) - target).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = layer.weight.detach()
    assert layer.factor.grad.abs().sum() > 0 and not torch.allclose(w, StiefelCompression(32, 6).weight)
    assert torch.linalg.matrix_norm(w.T @ w - torch.eye(6)) < 1e-5
    reloaded = StiefelCompression(32, 6)
    reloaded.load_state_dict(layer.state_dict())
    assert torch.equal(reloaded.weight, w)


def test_gradcheck_through_compression_and_embedding():
    layer = StiefelCompression(5, 3).double()
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    factor = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    cov = lambda t: t @ t.transpose(1, 2) / t.shape[-1]
    assert gradcheck(lambda t: layer(cov(t)), (x,))
    assert gradcheck(orthonormal_columns, (factor,))
    assert gradcheck(gaussian_embedding, (torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True),))


# ---------------------------------------------------------------- compact heads

def test_row_group_conv_is_a_per_row_linear_map():
    layer = RowGroupConv(5, 3).double()
    m = torch.randn(2, 5, 5, dtype=torch.float64)
    conv = torch.nn.Conv1d(5, 15, kernel_size=5, groups=5).double()  # output channel 3i + e filters row i
    with torch.no_grad():
        conv.weight.copy_(layer.weight.reshape(15, 1, 5))
        conv.bias.copy_(layer.bias.reshape(15))
    torch.testing.assert_close(layer(m), conv(m).flatten(1))
    assert gradcheck(layer, (m.requires_grad_(True),))


def test_progressive_reduction_chain():
    pool = GCPPool(64, dim=8, progressive_widths=[32, 16])
    assert [type(s).__name__ for s in pool.progressive] == ['ConvNormAct', 'ConvNormAct']
    assert [s.conv.weight.shape[:2] for s in pool.progressive] == [(32, 64), (16, 32)]
    assert pool.conv.weight.shape == (8, 16, 1, 1)  # the final reduction keeps its name: official keys still map
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    pool = pool.double().eval()
    chain = x
    for stage in pool.progressive:
        chain = F.relu(stage.bn(F.conv2d(chain, stage.conv.weight)))
    torch.testing.assert_close(pool.reduce(x), pool.act(pool.bn(pool.conv(chain))))
    small = GCPPool(6, dim=3, progressive_widths=[5, 4]).double().eval()
    assert gradcheck(small, (torch.randn(1, 6, 3, 3, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize('options, size, features', [
    ({}, 8, 36),
    (dict(gaussian=True), 9, 45),
    (dict(compress_dim=4), 4, 10),
    (dict(gaussian=True, compress_dim=4), 4, 10),
    (dict(group_conv=3), 8, 24),
    (dict(gaussian=True, group_conv=2), 9, 18),
    (dict(compress_dim=5, group_conv=2, progressive_widths=[32]), 5, 10),
])
def test_options_set_the_representation(options, size, features):
    model = create(**options)
    assert (model.global_pool.matrix_size, model.head_hidden_size, model.fc.in_features) == (size, features, features)
    assert model.global_pool.options == {**head_option_defaults(), **options}
    assert {k: model.gcp_model_args()[k] for k in options} == options
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, NUM_CLASSES)


def test_every_option_trains_every_parameter():
    model = create(gaussian=True, compress_dim=4, group_conv=2, progressive_widths=[32], dropcov=True,
                   meta_layer='eig').train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize('kwargs, match', [
    (dict(compress_dim=0), r'compress_dim must be an int from 1 to 8 .*got 0'),
    (dict(compress_dim=-3), r'compress_dim must be an int from 1 to 8'),
    (dict(compress_dim=9), r'^gcp_resnet18: compress_dim must be an int from 1 to 8 .*got 9'),
    (dict(compress_dim=10, gaussian=True), r'compress_dim must be an int from 1 to 9'),
    (dict(compress_dim=4.0), r'compress_dim must be an int'),
    (dict(compress_dim=True), r'compress_dim must be an int'),
    (dict(gaussian='yes'), r'gaussian must be True or False'),
    (dict(group_conv=0), r'group_conv must be a positive int'),
    (dict(progressive_widths=[]), r'progressive_widths must be a non-empty list of positive int'),
    (dict(progressive_widths=[64, 0]), r'progressive_widths must be a non-empty list'),
    (dict(progressive_widths=512), r'progressive_widths must be a non-empty list'),
    (dict(gaussian=True, global_pool='avg'), r"gaussian=True: an option of the GCP head, .*global_pool='avg'"),
    (dict(compress_dim=4, global_pool=''), r"compress_dim=4: an option of the GCP head"),
])
def test_bad_head_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create(**kwargs)


def test_head_options_need_a_gcp_head_on_every_family():
    with pytest.raises(ValueError, match=r"gaussian=True: an option of the GCP head"), torch.device('meta'):
        timm.create_model('gsop_resnet50', gsop_net=1, gaussian=True)  # GSoP-Net1 pools by averaging
    with pytest.raises(ValueError, match=r'^gcp_test_vit: group_conv=2: an option of the GCP head'):
        timm.create_model('gcp_test_vit', global_pool='avg', group_conv=2)


def test_replacing_the_gcp_head_resets_its_options():
    model = create(gaussian=True, compress_dim=4)
    model.reset_classifier(3, 'avg')
    assert model.head_options == head_option_defaults()
    model.reset_classifier(3, 'gcp')
    assert model.head_hidden_size == 36 and not model.global_pool.gaussian
    assert timm.create_model('gcp_resnet18', **model.gcp_model_args()).head_hidden_size == 36  # rebuilds as it is


# ---------------------------------------------------------------- checkpoints saved with other options

@pytest.mark.parametrize('saved, loaded, match', [
    ({}, dict(compress_dim=4), r'1 missing \(e\.g\. global_pool\.compression\.factor\)'),
    (dict(compress_dim=4), {}, r'1 unexpected \(e\.g\. global_pool\.compression\.factor\)'),
    ({}, dict(gaussian=True), r'fc\.weight: given \(5, 36\) vs expected \(5, 45\)'),
    (dict(gaussian=True, compress_dim=4), dict(compress_dim=4), r'global_pool\.compression\.factor: given \(9, 4\)'),
    (dict(progressive_widths=[32]), {}, r'unexpected \(e\.g\. global_pool\.progressive\.0'),
    ({}, dict(group_conv=2), r'missing \(e\.g\. global_pool\.row_conv\.bias, global_pool\.row_conv\.weight'),
])
def test_a_checkpoint_saved_with_other_head_options_is_refused_untouched(saved, loaded, match, tmp_path):
    source, target = create(**saved), create(**loaded)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r'does not fit the head of this gcp_resnet18 .*' + match):
        target.load_state_dict(source.state_dict())
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())  # nothing half-written
    path = tmp_path / 'saved.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    from_file = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=NUM_CLASSES,
                     gcp_dim=GCP_DIM, **loaded)
    if set(saved) | set(loaded) == {'gaussian'}:  # no parameters of its own: only fc differs, which timm replaces
        timm.create_model('gcp_resnet18', **from_file)  # for another num_classes than the tag's 1000
        return
    with pytest.raises(ValueError, match=r'saved\.safetensors does not fit the head of this gcp_resnet18'):
        timm.create_model('gcp_resnet18', **from_file)


def test_a_checkpoint_with_the_same_options_loads():
    source = create(gaussian=True, compress_dim=4, group_conv=2)
    target = create(gaussian=True, compress_dim=4, group_conv=2)
    target.load_state_dict(source.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
