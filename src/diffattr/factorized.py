"""A projection of per-sample gradients that never forms the weight gradients of Linear and Conv2d
layers (the factorized projection of LoGra: Choe et al., "What is your data worth to GPT?", 2024).

A Linear or Conv2d layer's per-sample weight gradient is a sum over positions l of outer products
g_l a_l^T of the gradient at its output and its input (unfolded into patches for a convolution).
Projected with the Kronecker product of two small Gaussian matrices P_out (out x s) and P_in (in x s),
    (P_out kron P_in)^T vec(sum_l g_l a_l^T) = vec(sum_l (P_out^T g_l)(P_in^T a_l)^T),
so each side is projected first and only the (s x s) block is summed: the layer's full gradient
(out x in per sample) is never held. The per-sample engine's taps (diffattr.per_sample) hand each
layer's input and output gradient to `layer_rule`, which returns these blocks in place of the weight
gradients; the other featurized parameters (biases, norms) keep their gradients, which `project`
sends through a dense Normal projection (`project.make_projector`) of the remaining dimensions.

Split of k (featurize.factor_split): layer l gets an s_l x s_l block and the dense part the columns
left. `even`: with L factorized layers, every s_l = floor(sqrt(k / (L + 1))), so the dense part gets
k - L s^2 >= s^2. `norm` (`norm_sides`): s_l^2 in proportion to the layer's gradient norm, measured on
a few training images (featurize.gradient_norms). Each part is scaled by sqrt(k / its columns), so
that E[f(g) . f(g')] = k g . g' as for a dense Normal projection of the whole gradient: the lambda
grids of the kernel methods keep their meaning.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .per_sample import _plain_conv


def _factorizable(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Conv2d) and _plain_conv(module))


def _by_group(a: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, s, L) with item i in group i mod G -> (G, s, N / G x L)."""
    n, s, positions = a.shape
    return a.reshape(n // groups, groups, s, positions).permute(1, 2, 0, 3).reshape(groups, s, -1)


class FactorizedProjector:
    """grads -> (B, k) for a model's featurized parameters, where `layer_rule` has already replaced the
    weight gradient of each factorizable layer by its (s_l x s_l) block, its sides split evenly or,
    given the featurized parameters' gradient `norms` (featurize.gradient_norms), by `norm_sides`.
    Matrices are drawn on the CPU (float64, then cast), so they are the same on every device."""

    def __init__(self, network: torch.nn.Module, featurized: list[tuple[str, torch.nn.Parameter]],
                 proj_dim: int, seed: int, device: torch.device, dense_factory, dtype=torch.float32,
                 norms: dict[str, float] | None = None):
        names = {id(p): name for name, p in featurized}
        layers = [m for m in network.modules() if _factorizable(m) and id(m.weight) in names]
        if proj_dim <= len(layers):
            raise ValueError(f"proj_dim {proj_dim}: too small to factorize {len(layers)} layers "
                             f"(expected at least {len(layers) + 1})")
        if norms is None:
            sides = [math.isqrt(proj_dim // (len(layers) + 1))] * len(layers)
        else:
            weights = {names[id(m.weight)] for m in layers}
            sides = norm_sides([norms[names[id(m.weight)]] for m in layers],
                               math.sqrt(sum(norms[name] ** 2 for name, _ in featurized if name not in weights)),
                               proj_dim, [min(m.weight.shape[0], m.weight[0].numel()) for m in layers])
        self.split, self.sides = "even" if norms is None else "norm", sides
        self.proj_dim, self.device = proj_dim, torch.device(device)
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(module) -> (P_out, P_in)
        for index, (module, side) in enumerate(zip(layers, sides)):
            inputs = module.weight[0].numel()
            generator = torch.Generator().manual_seed(seed + 1000 * (index + 1))
            p_out = torch.randn(module.weight.shape[0], side, generator=generator, dtype=torch.float64)
            p_in = torch.randn(inputs, side, generator=generator, dtype=torch.float64)
            self.factors[id(module)] = (p_out.to(self.device, dtype), p_in.to(self.device, dtype))
        side_of = {names[id(m.weight)]: side for m, side in zip(layers, sides)}
        # the columns of a gradient row, in the featurized order: (side, block width) for a block, (0,
        # the parameter's size) for a parameter's gradient
        self.widths = [(side_of[name], side_of[name] ** 2) if name in side_of else (0, p.numel())
                       for name, p in featurized]
        self.rest_dim = sum(width for side, width in self.widths if not side)
        self.block_cols = sum(s * s for s in sides)
        self.dense_dim = proj_dim - self.block_cols
        if not self.rest_dim:
            raise ValueError("a factorized projection needs featurized parameters besides the factorized "
                             "weights (biases, norms) for its dense part")
        self.dense, self.dense_info = dense_factory(self.rest_dim, self.dense_dim)
        self.input_dim = self.block_cols + self.rest_dim

    @property
    def info(self) -> dict:
        """What identifies the projection (features of different projections never mix)."""
        return {"projector": "FactorizedProjector", "proj_type": "factorized", "factor_split": self.split,
                "factor_sides": self.sides, "factorized_layers": len(self.factors), "dense_dim": self.dense_dim,
                "dense": {key: value for key, value in self.dense_info.items() if key != "grad_dim"}}

    def layer_rule(self, module: torch.nn.Module):
        """per_sample's rule for `module` when it is factorized here, else None: (input, output
        gradient, G) -> ((G, s, s) weight block, (G, out) bias gradient or None)."""
        if id(module) not in self.factors:
            return None
        p_out, p_in = self.factors[id(module)]
        side = p_out.shape[1]

        def rule(module, x, grad, groups):
            if isinstance(module, torch.nn.Conv2d):
                # P_in^T times the unfolded patches is a convolution with s output channels: the
                # patches (C_in kh kw values per position) are never formed either
                kernel = p_in.to(x.dtype).T.reshape(side, *module.weight.shape[1:])
                a = F.conv2d(x, kernel, None, module.stride, module.padding, module.dilation).flatten(2)
                g = grad.flatten(2)
                b = torch.einsum("ok,nol->nkl", p_out.to(x.dtype), g)
                bias = g.sum(2)
            else:  # Linear: (N, ..., features) -> (N, s, positions)
                a = (x @ p_in.to(x.dtype)).reshape(len(x), -1, side).transpose(1, 2)
                g = grad.reshape(len(grad), -1, grad.shape[-1])
                b = (g @ p_out.to(x.dtype)).transpose(1, 2)
                bias = g.sum(1)
            block = torch.bmm(_by_group(b, groups), _by_group(a, groups).transpose(1, 2))
            bias = None if module.bias is None else bias.reshape(-1, groups, bias.shape[-1]).sum(0)
            return block, bias

        return rule

    def project(self, grads: torch.Tensor, model_id: int = 0) -> torch.Tensor:
        """(B, input_dim) rows of blocks and remaining gradients, in the featurized order -> (B, k)."""
        if grads.ndim != 2 or grads.shape[1] != self.input_dim:
            raise ValueError(f"grads must have shape (B, {self.input_dim}), got {tuple(grads.shape)}")
        blocks, rest, start = [], [], 0
        for side, width in self.widths:
            # E[block . block'] = side^2 g . g' for each layer, E[dense . dense'] = dense_dim g . g'
            part = grads[:, start:start + width]
            if side:
                blocks.append(part.to(self.device) * (math.sqrt(self.proj_dim) / side))
            else:
                rest.append(part)
            start += width
        parts = [torch.cat(blocks, 1)]
        dense = self.dense.project(torch.cat(rest, 1).to(self.device), model_id=model_id)
        parts.append(dense.to(parts[0].dtype) * math.sqrt(self.proj_dim / self.dense_dim))
        return torch.cat(parts, 1)


def norm_sides(norms: list[float], rest_norm: float, proj_dim: int, caps: list[int]) -> list[int]:
    """The `norm` split: layer l gets about k n_l / (sum_l n_l + n_rest) columns, n_l the root-mean-
    square norm of its per-sample weight gradient and n_rest that of the dense part's gradient, as a
    side s_l >= 1 (rounded, at most `caps[l]`: the smaller side of the weight); the dense part gets
    the columns left, at least one.

    Why norms: c_l columns estimate a layer's share of g . g' with a variance of about
    |g_l|^2 |g'_l|^2 / c_l, which the c_l proportional to the energy |g_l|^2 minimize at a fixed k.
    But that puts the many small layers at 1 x 1, where a Kronecker sketch is much noisier than this
    estimate; on cifar2-mini columns in proportion to the energy lost more LDS than the even split,
    those in proportion to the norm least (benchmarks/README.md)."""
    total = sum(norms) + rest_norm
    if not total > 0:
        raise ValueError("the gradient norms are all zero: nothing to split k by")
    sides = [max(1, min(cap, round(math.sqrt(proj_dim * n / total)))) for n, cap in zip(norms, caps)]
    while sum(s * s for s in sides) >= proj_dim:
        sides[max(range(len(sides)), key=sides.__getitem__)] -= 1
    return sides
