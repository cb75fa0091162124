import math

import pytest
import torch

from tnkd.feature_maps import (
    FEATURE_MAPS,
    LearnableFeatureMap,
    PolynomialFeatureMap,
    build_feature_map,
    linear_features,
    trig_features,
)


def test_linear_map_is_one_and_x():
    x = torch.tensor([[0.0, 0.25, 1.0]])
    phi = linear_features(x)
    assert phi.shape == (1, 3, 2)
    assert torch.equal(phi[..., 0], torch.ones(1, 3))
    assert torch.equal(phi[..., 1], x)


def test_trig_map_closed_form_and_unit_norm():
    x = torch.linspace(0, 1, 11)
    phi = trig_features(x)
    assert torch.allclose(phi[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(phi[-1], torch.tensor([0.0, 1.0]), atol=1e-7)
    assert torch.allclose(phi[5], torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert torch.allclose(phi.norm(dim=-1), torch.ones(11))


def test_polynomial_map_powers():
    phi = PolynomialFeatureMap(3)(torch.tensor([2.0]))
    assert torch.equal(phi, torch.tensor([[1.0, 2.0, 4.0, 8.0]]))
    with pytest.raises(ValueError, match="degree must be an integer >= 1, but got 0"):
        PolynomialFeatureMap(0)


@pytest.mark.parametrize("name", ["linear", "trig", "poly"])
def test_neutral_weights_give_one_at_zero_and_one(name):
    fmap = build_feature_map(name)
    w = fmap.neutral()
    for value in (0.0, 1.0):
        assert torch.allclose(fmap(torch.tensor([value])) @ w, torch.ones(1), atol=1e-6)


def test_learnable_map_shapes_constant_channel_and_gradients():
    shared = LearnableFeatureMap(dim=4)
    x = torch.rand(3, 5)
    phi = shared(x)
    assert phi.shape == (3, 5, 4)
    assert torch.equal(phi[..., 0], torch.ones(3, 5))
    per_site = LearnableFeatureMap(dim=3, in_features=4, num_sites=5)
    patches = torch.rand(2, 5, 4)
    out = per_site(patches)
    assert out.shape == (2, 5, 3)
    out.sum().backward()
    assert per_site.weight.grad is not None and per_site.weight.grad.abs().sum() > 0
    # per-site weights differ: same patch at two sites maps differently
    same = patches[:, :1].expand(2, 5, 4)
    o = per_site(same)
    assert not torch.allclose(o[:, 0], o[:, 1])


def test_registry_names_and_build_forms():
    assert {"linear", "trig", "cos_sin", "poly", "learnable"} <= set(FEATURE_MAPS.names())
    assert build_feature_map({"name": "poly", "degree": 4}).dim == 5
    with pytest.raises(ValueError, match="unknown feature map 'fourier'"):
        build_feature_map("fourier")
