"""Per-group gradients from one ordinary forward and backward pass, without vmap.

The batch's items belong to G groups in turn (item i to group i mod G; featurize puts copy j of
every sample before copy j + 1) and the gradient of each group's share of the objective is wanted:
the gradient of sum_g objective_g with respect to a separate copy of the weights per group. For the
layers whose weights are featurized (Conv2d, Linear, GroupNorm) a weight's gradient is a sum over
items of products of the layer's input and the gradient at its output, so forward hooks keep each
layer's input, an identity autograd function on its output receives the output's gradient during
the backward pass, and the per-group sums are formed there (a grouped convolution's weight gradient
for Conv2d, batched matmuls for Linear, GroupNorm's backward kernel over a grouped view). The
backward pass runs towards a dummy scalar that every tapped output depends on, so autograd computes
no batch weight gradients: the cost is that of an ordinary forward pass and input-gradient backward
pass plus the per-group weight gradients, where vmap's per-sample rules cost more
(benchmarks/README.md). Exact only when the network treats batch items independently (eval mode: no
batch norm, no dropout), as `featurize` requires anyway.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class _Tap(torch.autograd.Function):
    """Identity on `output`; hands the gradient arriving at it to `receive` during the backward pass.
    `anchor` (a scalar leaf) gives every tap a path to one tensor the backward pass is asked for."""

    @staticmethod
    def forward(ctx, output, anchor, receive):
        ctx.receive = receive
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.receive(grad)
        return grad, grad.new_zeros(()), None


def _conv_grads(module: torch.nn.Conv2d, x: torch.Tensor, grad: torch.Tensor, groups: int):
    """Weight and bias gradients per group: the groups become the channel groups of one grouped
    convolution (with items in turn, (N, C, H, W) -> (N / G, G C, H, W) is a view)."""
    per, out = len(x) // groups, grad.shape[1]
    _, weight, bias = torch.ops.aten.convolution_backward(
        grad.reshape(per, -1, *grad.shape[2:]), x.reshape(per, -1, *x.shape[2:]),
        module.weight.repeat(groups, 1, 1, 1), [groups * out], module.stride, module.padding, module.dilation,
        False, [0, 0], groups, [False, True, True])
    return weight.reshape(groups, *module.weight.shape), bias.reshape(groups, out)


def _linear_grads(module: torch.nn.Linear, x: torch.Tensor, grad: torch.Tensor, groups: int):
    def by_group(a):  # (N, ..., features) -> (G, N / G x ..., features)
        return a.reshape(len(a) // groups, groups, -1, a.shape[-1]).transpose(0, 1).reshape(groups, -1, a.shape[-1])

    g = by_group(grad)
    return torch.bmm(g.transpose(1, 2), by_group(x)), g.sum(1)


def _group_norm_grads(module: torch.nn.GroupNorm, x: torch.Tensor, grad: torch.Tensor, groups: int):
    """GroupNorm's own backward kernel, per group: with items in turn, (N, C, ...) viewed as
    (N / G, G C, ...) with G x num_groups channel groups normalizes exactly as before, and the gamma
    and beta gradients of that view are the per-group ones."""
    per, channels, size = len(x) // groups, x.shape[1], x[0, 0].numel()
    x, norm_groups = x.reshape(per, groups * channels, size).contiguous(), groups * module.num_groups
    # the forward kernel's mean and 1 / std (far faster here than torch.var_mean, and the same values)
    _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, per, groups * channels, size, norm_groups,
                                                     module.eps)
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        grad.reshape(x.shape).contiguous(), x, mean, rstd, module.weight.repeat(groups), per,
        groups * channels, size, norm_groups, [False, True, True])
    return weight.reshape(groups, channels), bias.reshape(groups, channels)


def _plain_conv(module: torch.nn.Module) -> bool:
    return module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)


# layer type -> (whether this engine handles the instance, (input, output grad, G) -> (weight, bias) grads)
RULES: dict[type, tuple[Callable, Callable]] = {
    torch.nn.Conv2d: (_plain_conv, _conv_grads),
    torch.nn.Linear: (lambda module: True, _linear_grads),
    torch.nn.GroupNorm: (lambda module: module.affine, _group_norm_grads),
}


def _rule(module: torch.nn.Module):
    handles, grads = RULES.get(type(module), (None, None))
    return grads if handles is not None and handles(module) else None


def unsupported(network: torch.nn.Module, featurized: list[tuple[str, torch.nn.Parameter]]) -> list[str]:
    """Names of the featurized parameters this engine cannot handle (their layer has no rule)."""
    covered = {id(p) for module in network.modules() if _rule(module) is not None
               for p in module.parameters(recurse=False)}
    return [name for name, p in featurized if id(p) not in covered]


def group_gradients(network: torch.nn.Module, featurized: list[tuple[str, torch.nn.Parameter]],
                    objective: Callable[[], torch.Tensor], groups: int,
                    layer_rule: Callable | None = None) -> dict[str, torch.Tensor]:
    """name -> (groups, *shape): the gradient of `objective()` (a scalar, the sum over groups, computed
    by calling `network`) with respect to each featurized parameter, split by group. Every input batch
    of a featurized layer must hold the same number of items per group, item i in group i mod G.
    A parameter that the objective does not depend on gets zeros (as torch.func.grad gives).
    `layer_rule(module)`, when given, may return a rule of RULES' signature to use in place of the
    module's own (diffattr.factorized: projected weight blocks instead of weight gradients)."""
    if missing := unsupported(network, featurized):
        raise ValueError(f"no per-group gradient rule for the layers of: {', '.join(missing)}")
    names = {id(p): name for name, p in featurized}
    grads: dict[str, torch.Tensor] = {}
    first = featurized[0][1]
    anchor = torch.zeros((), dtype=first.dtype, device=first.device, requires_grad=True)

    def tap(module, inputs, output):
        wanted = [(attr, names[id(p)]) for attr, p in (("weight", module.weight), ("bias", module.bias))
                  if p is not None and id(p) in names]
        if not wanted:
            return None
        x = [inputs[0].detach()]
        if len(x[0]) % groups:
            raise ValueError(f"a batch of {len(x[0])} items cannot be split into {groups} equal groups")

        rule = (layer_rule and layer_rule(module)) or _rule(module)

        def receive(grad):
            result = dict(zip(("weight", "bias"), rule(module, x.pop(), grad, groups)))
            for attr, name in wanted:  # a layer called more than once adds up
                grads[name] = grads[name] + result[attr] if name in grads else result[attr]

        return _Tap.apply(output, anchor, receive)

    hooks = [module.register_forward_hook(tap) for module in network.modules() if _rule(module) is not None]
    try:
        torch.autograd.grad(objective(), anchor)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: grads[name] if name in grads else p.new_zeros(groups, *p.shape) for name, p in featurized}
