"""per_sample.group_gradients against a loop over groups with ordinary autograd (float64)."""
from __future__ import annotations

import pytest
import torch

from diffattr import per_sample
from diffattr.featurize import batch_gradients

GROUPS, PER_GROUP = 3, 4


class Net(torch.nn.Module):
    """Every rule's cases: 3x3, strided unpadded and 1x1 convolutions, a GroupNorm, a Linear on a
    sequence (as attention's projections) and one on vectors, a layer called twice, a frozen bias, a
    GroupNorm on a channels-last (non-contiguous) input, as some of the UNet's GroupNorms get."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 6, 3, padding=1)
        self.down = torch.nn.Conv2d(6, 6, 3, stride=2)
        self.norm = torch.nn.GroupNorm(3, 6)
        self.mix = torch.nn.Conv2d(6, 4, 1)
        self.proj = torch.nn.Linear(4, 4)
        self.seq_norm = torch.nn.GroupNorm(2, 4)
        self.head = torch.nn.Linear(4, 3)
        self.head.bias.requires_grad_(False)

    def forward(self, x):
        h = self.mix(torch.nn.functional.silu(self.norm(self.down(self.conv(x)))))
        seq = h.flatten(2).transpose(1, 2).contiguous()  # (N, positions, 4)
        seq = self.seq_norm(seq.transpose(1, 2)).transpose(1, 2)
        seq = self.proj(torch.tanh(self.proj(seq)))  # shared weights
        return self.head(seq.mean(1))


def featurized(net):
    return [(name, p) for name, p in net.named_parameters() if p.requires_grad]


def objective_of(net, x):
    return lambda: net(x).square().sum(1).sin().sum()


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().double()


@pytest.mark.parametrize("groups", [GROUPS, 1])
def test_group_gradients_match_a_loop_over_groups(net, groups):
    x = torch.randn(groups * PER_GROUP, 2, 9, 9, dtype=torch.float64)
    got = per_sample.group_gradients(net, featurized(net), objective_of(net, x), groups)
    assert set(got) == {name for name, _ in featurized(net)} and "head.bias" not in got
    for g in range(groups):
        items = x[g::groups]
        ref = torch.autograd.grad(objective_of(net, items)(), [p for _, p in featurized(net)])
        for (name, _), expected in zip(featurized(net), ref):
            assert expected.abs().max() > 0, name
            torch.testing.assert_close(got[name][g], expected, rtol=1e-10, atol=1e-12)


def test_hooks_are_removed_and_no_batch_gradient_is_left(net):
    x = torch.randn(GROUPS, 2, 9, 9, dtype=torch.float64)
    per_sample.group_gradients(net, featurized(net), objective_of(net, x), GROUPS)
    assert all(not module._forward_hooks for module in net.modules())
    assert all(p.grad is None for p in net.parameters())


def test_a_layer_the_objective_does_not_reach_gets_zeros(net):
    net.spare = torch.nn.Linear(4, 2).double()
    x = torch.randn(GROUPS, 2, 9, 9, dtype=torch.float64)
    got = per_sample.group_gradients(net, featurized(net), objective_of(net, x), GROUPS)
    assert torch.equal(got["spare.weight"], torch.zeros(GROUPS, 2, 4, dtype=torch.float64))
    assert torch.equal(got["spare.bias"], torch.zeros(GROUPS, 2, dtype=torch.float64))


def test_unsupported_layers_are_named_and_refused(net):
    net.norm = torch.nn.LayerNorm([6, 4, 4]).double()
    net.mix = torch.nn.Conv2d(6, 4, 1, padding_mode="reflect").double()
    net.conv = torch.nn.Conv2d(2, 6, 3, padding=1, groups=2).double()
    missing = per_sample.unsupported(net, featurized(net))
    assert missing == ["conv.weight", "conv.bias", "norm.weight", "norm.bias", "mix.weight", "mix.bias"]
    x = torch.randn(GROUPS, 2, 9, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="no per-group gradient rule for the layers of: conv.weight, conv.bias"):
        per_sample.group_gradients(net, featurized(net), objective_of(net, x), GROUPS)


def test_unequal_groups_are_refused(net):
    x = torch.randn(GROUPS * PER_GROUP + 1, 2, 9, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="a batch of 13 items cannot be split into 3 equal groups"):
        per_sample.group_gradients(net, featurized(net), objective_of(net, x), GROUPS)
    assert all(not module._forward_hooks for module in net.modules())


@pytest.mark.parametrize("function", ["simple", "linf"])
def test_featurize_engines_agree_and_vmap_takes_over_where_a_rule_is_missing(make_tiny_model, tiny_images,
                                                                             monkeypatch, function):
    model = make_tiny_model(3, torch.float64).for_per_sample_gradients().train(False)
    images, timesteps = torch.from_numpy(tiny_images[:3]).double(), [5, 500, 990]
    hooks = batch_gradients(model, images, [0, 1, 2], function, timesteps, 1, engine="hooks")
    vmap = batch_gradients(model, images, [0, 1, 2], function, timesteps, 1, engine="vmap")
    torch.testing.assert_close(hooks, vmap, rtol=1e-6, atol=1e-6 * vmap.abs().max().item())
    assert torch.equal(batch_gradients(model, images, [0, 1, 2], function, timesteps, 1), hooks)
    monkeypatch.delitem(per_sample.RULES, torch.nn.GroupNorm)
    assert torch.equal(batch_gradients(model, images, [0, 1, 2], function, timesteps, 1), vmap)
