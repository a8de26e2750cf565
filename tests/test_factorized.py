"""The factorized projection (diffattr.factorized) against an explicit projection, in float64, of
per-sample gradients formed one sample at a time by backward(): (P_out kron P_in)^T vec(G) for each
Linear / Conv2d weight, a dense matrix for the other parameters."""
import math

import numpy as np
import pytest
import torch

from diffattr import per_sample
from diffattr.factorized import FactorizedProjector, norm_sides
from diffattr.provenance import FEATURE_KEYS, ProvenanceError, require_same


class Net(torch.nn.Module):
    """A strided, padded convolution, a GroupNorm, a plain convolution and a Linear layer used twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.conv2 = torch.nn.Conv2d(4, 3, 2)
        self.linear = torch.nn.Linear(3, 3)
        self.double()

    def forward(self, x):
        h = self.conv2(torch.tanh(self.norm(self.conv1(x))))  # (N, 3, 2, 2)
        h = h.flatten(2).transpose(1, 2)  # (N, 4 positions, 3)
        return self.linear(torch.tanh(self.linear(h)))


class DenseMatrix:
    """A dense projection by an explicit float64 matrix (the factorized projector's dense part)."""

    def __init__(self, dim, k):
        self.matrix = torch.randn(dim, k, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def project(self, grads, model_id=0):
        return grads.double() @ self.matrix


def objective_per_item(net, x):
    return (net(x) ** 2).flatten(1).sum(1)  # (N,)


def explicit_features(net, projector, x, groups):
    """Rows of the projection, from each group's gradient formed by backward() (items i mod G)."""
    featurized = list(net.named_parameters())
    rows = []
    for g in range(groups):
        net.zero_grad()
        objective_per_item(net, x[g::groups]).sum().backward()
        blocks, rest = [], []
        for name, p in featurized:
            module = net.get_submodule(name.rsplit(".", 1)[0])
            if name.endswith("weight") and id(module) in projector.factors:
                p_out, p_in = projector.factors[id(module)]
                kron = torch.kron(p_out, p_in)  # (out x in, s^2): column (a, b) = p_out[:, a] kron p_in[:, b]
                blocks.append(p.grad.reshape(-1) @ kron * math.sqrt(projector.proj_dim) / p_out.shape[1])
            else:
                rest.append(p.grad.reshape(-1))
        dense = projector.dense.project(torch.cat(rest)[None])[0] * math.sqrt(projector.proj_dim / projector.dense_dim)
        rows.append(torch.cat([*blocks, dense]))
    return torch.stack(rows)


def factorized_features(net, projector, x, groups):
    featurized = list(net.named_parameters())
    grads = per_sample.group_gradients(net, featurized, lambda: objective_per_item(net, x).sum(), groups,
                                       projector.layer_rule)
    return projector.project(torch.cat([grads[name].reshape(groups, -1) for name, _ in featurized], 1))


# Gradient norms of Net's parameters for the `norm` split (any positive numbers: the split's input)
NORMS = {"conv1.weight": 4.0, "conv1.bias": 0.5, "norm.weight": 0.3, "norm.bias": 0.2, "conv2.weight": 1.0,
         "conv2.bias": 0.1, "linear.weight": 2.0, "linear.bias": 0.4}


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("norms", [None, NORMS], ids=["even", "norm"])
def test_factorized_projection_equals_the_explicit_one(groups, norms):
    net = Net()
    projector = FactorizedProjector(net, list(net.named_parameters()), 40, seed=3, device="cpu",
                                    dense_factory=lambda dim, k: (DenseMatrix(dim, k), {}), dtype=torch.float64,
                                    norms=norms)
    if norms is None:
        assert projector.sides == [math.isqrt(40 // 4)] * 3 == [3] * 3 and projector.dense_dim == 40 - 3 * 9
    else:  # conv1, conv2, linear: sqrt(40 n / 7.74) rounded to 5, 2, 3, conv1's capped at its 4 outputs
        assert projector.sides == [4, 2, 3] and projector.dense_dim == 40 - 16 - 4 - 9
    x = torch.randn(2 * groups, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = factorized_features(net, projector, x, groups)
    assert ours.shape == (groups, 40)
    torch.testing.assert_close(ours, explicit_features(net, projector, x, groups), rtol=1e-10, atol=1e-12)


def test_norm_split_gives_columns_in_proportion_to_the_norms():
    """Columns k n_l / (sum n + n_rest) as squares, the dense part the rest; at least 1, at most the cap;
    shrunk, largest first, when rounding up would leave the dense part nothing."""
    # 800 x (4, 1, 1) / 8 = 400, 100, 100 columns: sides 20, 10, 10, and the dense part's 200
    assert norm_sides([4.0, 1.0, 1.0], 2.0, 800, [100, 100, 100]) == [20, 10, 10]
    assert norm_sides([4.0, 1.0, 1.0], 2.0, 800, [12, 100, 100]) == [12, 10, 10]  # capped
    assert norm_sides([4.0, 1e-9, 1.0], 3.0, 800, [100, 100, 100]) == [20, 1, 10]  # at least 1 x 1
    # 10 / 2 = 5 columns each: sides 2 (4 columns), leaving the dense part 2
    assert norm_sides([1.0, 1.0], 0.0, 10, [9, 9]) == [2, 2]
    assert norm_sides([1.0, 1.0], 0.0, 8, [9, 9]) == [1, 2]  # 2 x 2 twice is all 8 columns: shrink one
    with pytest.raises(ValueError, match="all zero"):
        norm_sides([0.0, 0.0], 0.0, 10, [9, 9])


def test_a_wrong_matrix_is_caught():
    """The comparison would fail with another layer's matrix: swap two layers' P_in of equal shape."""
    net = Net()
    projector = FactorizedProjector(net, list(net.named_parameters()), 40, seed=3, device="cpu",
                                    dense_factory=lambda dim, k: (DenseMatrix(dim, k), {}), dtype=torch.float64)
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = explicit_features(net, projector, x, 1)
    p_out, p_in = projector.factors[id(net.linear)]
    projector.factors[id(net.linear)] = (p_out, p_in.flip(0))
    assert not torch.allclose(factorized_features(net, projector, x, 1), expected)


def test_matrices_depend_on_the_seed_only():
    net = Net()
    make = lambda seed: FactorizedProjector(net, list(net.named_parameters()), 40, seed, "cpu",
                                            lambda dim, k: (DenseMatrix(dim, k), {}), torch.float64)
    a, b, c = make(3), make(3), make(4)
    assert all(torch.equal(a.factors[key][1], b.factors[key][1]) for key in a.factors)
    assert not torch.equal(a.factors[id(net.conv1)][1], c.factors[id(net.conv1)][1])


def test_provenance_refuses_mixing_with_dense_features():
    net = Net()
    projector = FactorizedProjector(net, list(net.named_parameters()), 40, 3, "cpu",
                                    lambda dim, k: (DenseMatrix(dim, k), {"projector": "BasicProjector"}))
    shared = {"proj_dim": 40, "proj_seed": 3, "grad_dim": 100}
    dense = {**shared, "projector": "BasicProjector", "proj_type": "normal", "block_size": 40}
    with pytest.raises(ProvenanceError, match="projector: 'BasicProjector' vs 'FactorizedProjector'"):
        require_same(FEATURE_KEYS, ("train.zarr", dense), ("val.zarr", {**shared, **projector.info}))


def test_tiny_unet_features_equal_the_kronecker_projection_of_its_gradients(make_tiny_model, tiny_images):
    """On the tiny UNet in float64 (every layer kind it has): the featurize path with the factorized
    projector against the vmap engine's full per-sample gradients projected explicitly."""
    from diffattr.featurize import batch_gradients, make_feature_projector
    model = make_tiny_model(1, torch.float64).for_per_sample_gradients()
    images, timesteps = torch.from_numpy(tiny_images[:3]).double(), [0, 400, 800]
    projector, info = make_feature_projector(model, 96, 5, torch.device("cpu"), 3, "factorized")
    projector.dense = DenseMatrix(projector.rest_dim, projector.dense_dim)  # float64 throughout
    ours = projector.project(batch_gradients(model, images, range(3), "square", timesteps, 2,
                                             layer_rule=projector.layer_rule))
    full = batch_gradients(model, images, range(3), "square", timesteps, 2, engine="vmap").double()
    blocks, rest, start = [], [], 0
    for name, p in model.featurized_parameters():
        g = full[:, start:start + p.numel()]
        start += p.numel()
        module = model.network().get_submodule(name.rsplit(".", 1)[0])
        if name.endswith("weight") and id(module) in projector.factors:
            p_out, p_in = projector.factors[id(module)]
            blocks.append(g @ torch.kron(p_out, p_in).double() * math.sqrt(96) / p_out.shape[1])
        else:
            rest.append(g)
    dense = projector.dense.project(torch.cat(rest, 1)) * math.sqrt(96 / projector.dense_dim)
    expected = torch.cat([*blocks, dense], 1)
    assert info["factorized_layers"] == len(blocks) > 5 and ours.shape == (3, 96)
    # the passes return float32 rows (featurize's dtype); everything else is float64
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_gradient_norms_are_the_rms_over_the_first_train_images(make_tiny_model):
    """featurize.gradient_norms against each of the first 32 images' gradient alone (a batch of one):
    chunking does not change them, and images past the 32nd are not read."""
    from diffattr.featurize import CALIBRATION, batch_gradients, gradient_norms
    from diffattr.protocol import select_timesteps
    model = make_tiny_model(1).for_per_sample_gradients()
    images = np.random.default_rng(4).uniform(-1, 1, (40, 1, 8, 8)).astype(np.float32)
    images[32:] *= 100  # would dominate the norms if read
    timesteps = select_timesteps(CALIBRATION["timesteps"], "uniform")
    squares = sum(batch_gradients(model, torch.from_numpy(images[i:i + 1]), [i], "square", timesteps, 5).double()[0] ** 2
                  for i in range(32))
    ours, start = gradient_norms(model, images, "square", 5), 0
    assert CALIBRATION["images"] == 32 and list(ours) == [name for name, _ in model.featurized_parameters()]
    for name, p in model.featurized_parameters():
        assert ours[name] == pytest.approx(math.sqrt(squares[start:start + p.numel()].sum().item() / 32), rel=1e-5)
        start += p.numel()
