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

Split of k (documented choice): with L factorized layers, every layer gets the same s = floor(sqrt(
k / (L + 1))), so s^2 columns each, and the dense part gets the rest, k - L s^2 >= s^2. Each part is
scaled by sqrt(k / its columns), so that E[f(g) . f(g')] = k g . g' as for a dense Normal projection
of the whole gradient: the lambda grids of the kernel methods keep their meaning.
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
    weight gradient of each factorizable layer by its (s x s) block. Matrices are drawn on the CPU
    (float64, then cast), so they are the same on every device."""

    def __init__(self, network: torch.nn.Module, featurized: list[tuple[str, torch.nn.Parameter]],
                 proj_dim: int, seed: int, device: torch.device, dense_factory, dtype=torch.float32):
        names = {id(p): name for name, p in featurized}
        layers = [m for m in network.modules() if _factorizable(m) and id(m.weight) in names]
        self.side = math.isqrt(proj_dim // (len(layers) + 1))
        if self.side < 1:
            raise ValueError(f"proj_dim {proj_dim}: too small to factorize {len(layers)} layers "
                             f"(expected at least {len(layers) + 1})")
        self.proj_dim, self.device = proj_dim, torch.device(device)
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(module) -> (P_out, P_in)
        for index, module in enumerate(layers):
            inputs = module.weight[0].numel()
            generator = torch.Generator().manual_seed(seed + 1000 * (index + 1))
            p_out = torch.randn(module.weight.shape[0], self.side, generator=generator, dtype=torch.float64)
            p_in = torch.randn(inputs, self.side, generator=generator, dtype=torch.float64)
            self.factors[id(module)] = (p_out.to(self.device, dtype), p_in.to(self.device, dtype))
        factorized = {names[id(m.weight)] for m in layers}
        # the columns of a gradient row, in the featurized order: a block or a parameter's gradient
        self.widths = [(name in factorized, self.side ** 2 if name in factorized else p.numel())
                       for name, p in featurized]
        self.rest_dim = sum(width for is_block, width in self.widths if not is_block)
        self.block_cols = len(layers) * self.side ** 2
        self.dense_dim = proj_dim - self.block_cols
        if not self.rest_dim:
            raise ValueError("a factorized projection needs featurized parameters besides the factorized "
                             "weights (biases, norms) for its dense part")
        self.dense, self.dense_info = dense_factory(self.rest_dim, self.dense_dim)
        self.input_dim = self.block_cols + self.rest_dim

    @property
    def info(self) -> dict:
        """What identifies the projection (features of different projections never mix)."""
        return {"projector": "FactorizedProjector", "proj_type": "factorized", "factor_side": self.side,
                "factorized_layers": len(self.factors), "dense_dim": self.dense_dim,
                "dense": {key: value for key, value in self.dense_info.items() if key != "grad_dim"}}

    def layer_rule(self, module: torch.nn.Module):
        """per_sample's rule for `module` when it is factorized here, else None: (input, output
        gradient, G) -> ((G, s, s) weight block, (G, out) bias gradient or None)."""
        if id(module) not in self.factors:
            return None
        p_out, p_in = self.factors[id(module)]

        def rule(module, x, grad, groups):
            if isinstance(module, torch.nn.Conv2d):
                # P_in^T times the unfolded patches is a convolution with s output channels: the
                # patches (C_in kh kw values per position) are never formed either
                kernel = p_in.to(x.dtype).T.reshape(self.side, *module.weight.shape[1:])
                a = F.conv2d(x, kernel, None, module.stride, module.padding, module.dilation).flatten(2)
                g = grad.flatten(2)
                b = torch.einsum("ok,nol->nkl", p_out.to(x.dtype), g)
                bias = g.sum(2)
            else:  # Linear: (N, ..., features) -> (N, s, positions)
                a = (x @ p_in.to(x.dtype)).reshape(len(x), -1, self.side).transpose(1, 2)
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
        for is_block, width in self.widths:
            (blocks if is_block else rest).append(grads[:, start:start + width])
            start += width
        # E[block . block'] = s^2 g . g' for each layer, E[dense . dense'] = dense_dim g . g'
        parts = [torch.cat(blocks, 1).to(self.device) * (math.sqrt(self.proj_dim) / self.side)]
        dense = self.dense.project(torch.cat(rest, 1).to(self.device), model_id=model_id)
        parts.append(dense.to(parts[0].dtype) * math.sqrt(self.proj_dim / self.dense_dim))
        return torch.cat(parts, 1)
