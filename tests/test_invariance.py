"""IDCCP's group invariance on every GCP model: logits of an image and of each of its group transforms agree, the
backbone runs once per transform, test-time averaging as the cheaper mode, bad input."""
import pytest
import timm
import torch

from timm_gcp.layers import GROUPS, GroupInvariance, group_transforms

NUM_CLASSES = 5
GCP_DIM = 8
IMG = 32


def create(name: str = 'gcp_resnet18', **kwargs) -> torch.nn.Module:
    return timm.create_model(name, num_classes=NUM_CLASSES, gcp_dim=GCP_DIM, **kwargs).eval()


def reference_transforms(x: torch.Tensor, group: str) -> list:
    """The group's transforms of (B, C, H, W) images written out with transposes and flips: quarter turns, then (D4)
    the quarter turns of the mirror image."""
    rot = lambda t: t.transpose(-2, -1).flip(-2)  # 90° anticlockwise, as torch.rot90(t, 1, (-2, -1))
    turns = lambda t: [t, rot(t), rot(rot(t)), rot(rot(rot(t)))]
    return {'flip': [x, x.flip(-1)], 'c4': turns(x), 'd4': turns(x) + turns(x.flip(-1))}[group]


@pytest.mark.parametrize('group', sorted(GROUPS))
def test_group_transforms(group):
    x = torch.randn(2, 3, 5, 5)
    expected = reference_transforms(x, group)
    torch.testing.assert_close(group_transforms(x, group), torch.cat(expected), rtol=0, atol=0)
    images = {tuple(t[0].flatten().tolist()) for t in expected}
    assert len(images) == len(GROUPS[group])  # distinct transforms: the group's order


@pytest.mark.parametrize('name, kwargs', [
    ('gcp_resnet18', dict(invariance='d4', gaussian=True, compress_dim=4)),
    ('gcp_resnet18', dict(invariance='d4', invariance_mode='test')),
    ('gcp_resnet18', dict(invariance='d4', global_pool='avg')),  # any pooling over positions: GAP too
    ('gcp_test_vit', dict(invariance='d4', group_conv=2, img_size=32)),  # tokens: the class token stays out
    ('gcp_test_convnext', dict(invariance='c4')),
    ('idccp_resnet18', dict(compress_dim=4)),
])
def test_logits_are_invariant_to_every_transform(name, kwargs):
    model = create(name, **kwargs)
    x = torch.randn(1, 3, 32, 32)  # random weights, a random square image
    with torch.no_grad():
        logits = model(x)
        transformed = model(torch.cat(reference_transforms(x, model.group_invariance.group)))
    torch.testing.assert_close(transformed, logits.expand_as(transformed), rtol=1e-5, atol=1e-5 * logits.abs().max())


def test_invariant_in_training_mode_too():
    """The transforms of a batch are one batch for the backbone's BatchNorm: transforming the input permutes it."""
    model = create(invariance='flip', gaussian=True).train()
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(model(x.flip(-1)), model(x), rtol=1e-4, atol=1e-5)


def test_the_backbone_runs_once_per_transform():
    model = create(invariance='d4')
    calls = []
    model.layer1.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        final, intermediates = model.forward_intermediates(x)
    assert calls == [16, 16] and feats.shape[0] == 16  # |G| x batch, transform-major
    torch.testing.assert_close(final, feats)
    torch.testing.assert_close(model.global_pool(model.group_invariance.union(feats)), pooled)
    union = model.group_invariance.union(feats)
    assert union.shape == (2, 512, 8 * feats.shape[-2], feats.shape[-1])
    torch.testing.assert_close(union[1, :, 3 * feats.shape[-2]:4 * feats.shape[-2]], feats[3 * 2 + 1])


def test_test_time_mode_trains_on_the_image_and_averages_at_inference():
    model = create(invariance='d4', invariance_mode='test')
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert model.train().forward_features(x).shape[0] == 2  # training: one pass
    plain = create()
    plain.load_state_dict(model.state_dict())
    model.eval()
    with torch.no_grad():
        expected = torch.stack([plain(t) for t in reference_transforms(x, 'd4')]).mean(0)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), expected, rtol=1e-5, atol=1e-6)


def test_features_only_gives_the_features_of_the_image_as_given():
    plain = timm.create_model('gcp_resnet18', features_only=True).eval()
    invariant = timm.create_model('gcp_resnet18', features_only=True, invariance='d4', gaussian=True).eval()
    invariant.load_state_dict(plain.state_dict())
    vit = timm.create_model('gcp_test_vit', features_only=True, invariance='d4', compress_dim=4)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        for got, expected in zip(invariant(x), plain(x), strict=True):
            torch.testing.assert_close(got, expected)
        assert all(f.shape[0] == 1 for f in vit(torch.randn(1, 3, 160, 160)))


@pytest.mark.parametrize('kwargs, match', [
    (dict(invariance='d8'), r"invariance must be one of 'flip', 'c4', 'd4' or None, got 'd8'"),
    (dict(invariance='D4'), r'invariance must be one of'),
    (dict(invariance='d4', invariance_mode='always'), r"invariance_mode must be one of 'train', 'test'"),
    (dict(invariance_mode='test'), r"invariance_mode='test' needs an invariance group"),
])
def test_bad_invariance_options(kwargs, match):
    with pytest.raises(ValueError, match=r'^gcp_resnet18: ' + match):
        create(**kwargs)
    with pytest.raises(ValueError, match=match), torch.device('meta'):
        timm.create_model('gcp_test_convnext', **kwargs)


def test_rotations_need_square_images_flips_do_not():
    x = torch.randn(1, 3, 64, 48)
    with pytest.raises(ValueError, match=r"invariance='c4' rotates images by 90°, so they must be square; got 64 x 4"):
        create(invariance='c4')(x)
    with torch.no_grad():
        model = create(invariance='flip').double()
        x = x.double()
        torch.testing.assert_close(model(x.flip(-1)), model(x), rtol=1e-9, atol=1e-10)


def test_group_invariance_module():
    module = GroupInvariance('c4', 'test')
    assert module.size == 4 and module.active is False  # a new module is in training mode
    assert module.eval().active and 'mode=' in repr(module)
    pooled = torch.arange(8.).view(8, 1)  # 4 transforms x 2 images
    torch.testing.assert_close(module.average(pooled), torch.tensor([[3.], [4.]]))


def test_without_pooling_the_stacked_maps_are_returned():
    model = create(invariance='c4', invariance_mode='test')
    model.reset_classifier(0, '')  # what prune_intermediate_layers leaves
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x))
    assert model(x).shape == (4, 512, 2, 2) and model.group_invariance.group == 'c4'
