"""K-FAC and EK-FAC influence functions for diffusion models (Mlodozeniec, Eschenhagen, Bae, Immer,
Krueger and Turner, "Influence Functions for Scalable Data Attribution in Diffusion Models", ICLR
2025, arXiv 2410.13850; code github.com/BrunoKM/diffusion-influence).

The score of train image i for query z is S(z, i) = g_z^T (G + lambda I)^-1 g_i, G the generalized
Gauss-Newton (GGN) of the training loss, g_i the gradient of train image i's training loss
(L_Simple) and g_z that of the query's measurement (`simple`: the loss, `elbo`, or D-TRAK's
`square`). G is approximated per Linear / Conv2d layer by K-FAC, B (x) A (B the covariance of the
gradients at the layer's output, A that of its inputs), or by EK-FAC, which keeps K-FAC's Kronecker
eigenbasis Q = Q_B (x) Q_A but replaces its eigenvalues by diag(Q^T G Q) (George et al. 2018).

Why not curvlinops, which the reference uses: curvlinops-for-pytorch requires backpack-for-pytorch,
which requires torchvision, and PyPI's torchvision beside the CPU torch wheel breaks diffusers'
import (as for open_clip, docs/methods.md). `fit_factors` computes what curvlinops'
KFACLinearOperator and EKFACLinearOperator compute (the same conventions, below), in about 60
lines; tests/test_kfac.py checks it against the dense GGN and, where curvlinops is installed,
against curvlinops itself.

What we follow (the reference code's `compute_influence.py` and `constructors.py`, its defaults in
`config_schemas.KFACConfig`):
- the GGN of the diffusion loss mean_pixels (eps_theta(x_t, t) - eps)^2 over the train set, the
  network's output flattened per image (one loss term per image: the reference's curvlinops MSE loss
  with mean reduction and `num_per_example_loss_terms=1`), so the loss Hessian is 2 / d I;
- each train image enters the GGN at `samples` draws of (t, eps), t uniform on {0, ..., T-1};
- K-FAC "expand" for weight sharing (convolutions, attention), the Monte-Carlo Fisher with one
  sampled output vector per draw (`fisher: mc`, drawn per image and draw rather than from one
  stream, so that batch size changes nothing; `type-2` computes the GGN exactly per draw), weights and
  biases in separate blocks, only Linear and Conv2d parameters (GroupNorm's are left out, as the
  reference does);
- damping as the reference sets it: lambda = 1e-8 added to every eigenvalue ("exact" damping);
- train gradients of the training loss, query gradients of the measurement.
Where we differ: the reference draws 250 (t, eps) per train image for the GGN (125 for each of
EK-FAC's two passes) and 250 per gradient; we draw `samples` for the GGN (both passes use the same
draws) and compute gradients at the feature set's K timesteps with the featurizer's noise, as every
other method of the table does. The reference multiplies preconditioned query gradients with train
gradients; we precondition both by (G + lambda I)^-1/2 in the eigenbasis (the same product) so that
the features can be projected (`proj_dim`) with the featurizer's projector, a JL estimate of the
score; without `proj_dim` the product is exact.

Memory of a features job: the factors (sum over layers of d_in^2 + d_out^2 values, plus two
eigenvalue sets of the parameters' size), one batch of per-sample gradients (B x p, as featurize),
one preconditioned copy at a time (B x p) and the projections of all (V x L x B x k, V variants, L
dampings). A curvature job holds the factors and one layer's input patches (B x R x d_in) at a time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import load_images, load_labels
from .device import device_name, precision
from .featurize import batch_gradients
from .models import DiffusionModel, load_model
from .noise import noise_batch
from .protocol import featurize_arithmetic
from .storage import array_sha256, atomic_output, file_sha256

VARIANTS = ("kfac", "ekfac")
LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


def curvature_parameters(network: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters K-FAC covers: those of the network's Linear and Conv2d layers."""
    return [(f"{prefix}.{name}" if prefix else name, p) for prefix, module in network.named_modules()
            if isinstance(module, LAYERS) for name, p in module.named_parameters(recurse=False) if p.requires_grad]


def _patches(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, R, d_in): the layer's inputs at its R weight-sharing positions (a convolution's patches, in
    the order of weight.flatten(1); a Linear layer's leading dimensions after the batch)."""
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"K-FAC here takes plain convolutions only, got {module}")
        return torch.nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding,
                                          module.stride).transpose(1, 2)
    return x.reshape(len(x), -1, x.shape[-1])


def _output_vectors(rows: int, width: int, fisher: str, keys, dtype, device) -> list[torch.Tensor]:
    """The vectors v (rows, width) backpropagated from the output, E[v v^T] = 2 / width I, the Hessian
    of mean_j (f_j - y_j)^2: for `mc` one draw per row from its key (a pure function of it),
    for `type-2` the columns of sqrt(2 / width) I."""
    scale = (2.0 / width) ** 0.5
    if fisher == "type-2":
        return [torch.zeros(rows, width, dtype=dtype, device=device).index_fill_(1, torch.tensor([j], device=device),
                                                                                 scale) for j in range(width)]
    if fisher != "mc":
        raise ValueError(f"fisher: got {fisher!r}; expected 'mc' or 'type-2'")
    draws = np.stack([np.random.default_rng([*map(int, key), 2]).standard_normal(width) for key in keys])
    return [torch.from_numpy(draws).to(device, dtype) * scale]


def _passes(model_func, modules: dict, data, fisher: str, on_input, on_grad) -> None:
    """Run `data` through `model_func`, backpropagating each output vector (`_output_vectors`):
    on_input(layer, patches) once per batch in the forward pass, on_grad(layer, patches, output
    gradients (B, R, d_out)) per vector in the backward pass. Patches are formed in the hooks and
    dropped after them, so that at most one layer's are held at a time."""
    def forward(name, module, inputs, output):
        x = inputs[0].detach()
        if on_input is not None:
            on_input(name, _patches(module, x))

        def backward(grad):
            g = grad.detach()
            g = g.flatten(2).transpose(1, 2) if isinstance(module, torch.nn.Conv2d) else g.reshape(len(g), -1,
                                                                                                    g.shape[-1])
            on_grad(name, _patches(module, x) if on_input is None else None, g)
        output.register_hook(backward)

    handles = [module.register_forward_hook(lambda m, i, o, name=name: forward(name, m, i, o))
               for name, module in modules.items()]
    anchor = [p for m in modules.values() for p in m.parameters(recurse=False)]
    try:
        for batch, keys in data:
            out = model_func(batch)
            for vector in _output_vectors(*out.shape, fisher, keys, out.dtype, out.device):
                torch.autograd.grad(out, anchor, vector, retain_graph=True, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()


def fit_factors(model_func: torch.nn.Module, named_params, data, num_data: int, fisher: str = "mc") -> list[dict]:
    """Per Linear / Conv2d layer of `model_func` holding `named_params`: the parameters' names, the
    eigenvectors Q_A (of the inputs' covariance A) and Q_B (of the output gradients' covariance B) and
    the eigenvalues of each variant ({'kfac'|'ekfac': {'weight': (d_out, d_in), 'bias': (d_out,)}}).

    The GGN is that of the loss mean_j (f_j - y_j)^2 of each output row f = model_func(X) over `data`
    (re-iterable (X, keys) batches, `num_data` rows in all; a row's key seeds its Monte-Carlo vector).
    K-FAC expand (Eschenhagen et al. 2023), as curvlinops' KFACLinearOperator computes it:
    A = sum a a^T / (N R) over rows and the R weight-sharing positions, B = sum g g^T / N; the bias
    block is B. EK-FAC: diag(Q^T G Q) from each row's gradient in Q's basis (a second pass)."""
    names = {id(p): name for name, p in named_params}
    modules = {name: m for name, m in model_func.named_modules() if isinstance(m, LAYERS)
               and any(id(p) in names for p in m.parameters(recurse=False))}
    inputs, outputs = dict.fromkeys(modules, 0), dict.fromkeys(modules, 0)

    def on_input(name, a):
        inputs[name] = inputs[name] + torch.einsum("bri,brj->ij", a, a) / (num_data * a.shape[1])

    def on_grad(name, a, g):
        outputs[name] = outputs[name] + torch.einsum("bri,brj->ij", g, g) / num_data

    _passes(model_func, modules, data, fisher, on_input, on_grad)
    layers = {}
    for name, module in modules.items():
        (a, qa), (b, qb) = torch.linalg.eigh(inputs[name]), torch.linalg.eigh(outputs[name])
        kinds = {kind: names[id(p)] for kind, p in (("weight", module.weight), ("bias", module.bias))
                 if p is not None and id(p) in names}
        kfac = {kind: torch.outer(b, a) if kind == "weight" else b for kind in kinds}
        layers[name] = {"module": name, "names": kinds, "qa": qa if "weight" in kinds else None, "qb": qb,
                        "eigenvalues": {"kfac": kfac, "ekfac": {kind: torch.zeros_like(v) for kind, v in kfac.items()}}}

    def correct(name, a, g):
        layer = layers[name]
        corrected = layer["eigenvalues"]["ekfac"]
        if "weight" in corrected:
            rotated = torch.einsum("ji,brj,brk,kl->bil", layer["qb"], g, a, layer["qa"])
            corrected["weight"] += (rotated ** 2).sum(0) / num_data
        if "bias" in corrected:
            corrected["bias"] += ((g.sum(1) @ layer["qb"]) ** 2).sum(0) / num_data

    _passes(model_func, modules, data, fisher, None, correct)
    return list(layers.values())


def rotate(layers: list[dict], grads: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's per-sample gradients (B, *shape) in its layer's Kronecker eigenbasis:
    Q_B^T G Q_A for a weight (G as (d_out, d_in)), Q_B^T g for a bias; in `layers`' order."""
    out = []
    for layer in layers:
        for kind in ("weight", "bias"):
            if kind not in layer["names"]:
                continue
            g = grads[layer["names"][kind]].to(layer["qb"].dtype)
            if kind == "weight":
                out.append(torch.einsum("ji,bjk,kl->bil", layer["qb"], g.flatten(2), layer["qa"]))
            else:
                out.append(g @ layer["qb"])
    return out


def precondition(layers: list[dict], rotated: list[torch.Tensor], variant: str, damping: float) -> torch.Tensor:
    """(B, p): the rotated gradients divided by sqrt(eigenvalue + damping), flattened and joined, so
    that rows u, v give u . v = g_u^T (G + damping I)^-1 g_v with G the variant's approximation."""
    values = [layer["eigenvalues"][variant][kind] for layer in layers for kind in ("weight", "bias")
              if kind in layer["names"]]
    return torch.cat([(r / (e.clamp_min(0) + damping).sqrt()).flatten(1) for r, e in zip(rotated, values)], 1)


# ------------------------------------------------------------------ the diffusion model's GGN

class _Regression(torch.nn.Module):
    """A diffusion model as a regression: a batch {x_t, t[, cond]} -> the prediction, one row per
    image (the reference's KFACCompatibleImageRegressionModelWrapper)."""

    def __init__(self, model: DiffusionModel):
        super().__init__()
        self.network, self.model = model.network(), model

    def forward(self, batch):
        return self.model.predict(batch["x_t"], batch["t"], batch.get("cond")).flatten(1)


def draw_timestep(seed: int, index: int, sample: int, num_train_timesteps: int) -> int:
    """The timestep of draw `sample` of train image `index`: uniform, a pure function of the three."""
    return int(np.random.default_rng([int(seed), int(index), int(sample), 1]).integers(num_train_timesteps))


class Draws:
    """Re-iterable (batch, keys) pairs over `samples` passes of the train images, image i noised at
    its draw s: t = draw_timestep(seed, i, s), eps = noise.gaussian(seed, i, t, draw=s + 1), so that the
    batches, whatever their size, hold the same noised images."""

    def __init__(self, model: DiffusionModel, images: torch.Tensor, labels, samples: int, seed: int,
                 batch_size: int):
        self.model, self.images, self.labels = model, images, labels
        self.samples, self.seed, self.batch_size = samples, seed, batch_size

    def __iter__(self):
        model, T = self.model, self.model.scheduler.config.num_train_timesteps
        for s in range(self.samples):
            for start in range(0, len(self.images), self.batch_size):
                rows = range(start, min(len(self.images), start + self.batch_size))
                x0 = model.encode(self.images[rows.start:rows.stop])
                t = [draw_timestep(self.seed, i, s, T) for i in rows]
                eps = noise_batch([(self.seed, i, ti, s + 1) for i, ti in zip(rows, t)], x0.shape[1:]).to(x0)
                t = torch.tensor(t, device=x0.device)
                batch = {"x_t": model.scheduler.add_noise(x0, eps, t), "t": t}
                if self.labels is not None:
                    batch["cond"] = model.conditioning(torch.as_tensor(self.labels[rows.start:rows.stop]))
                yield batch, [(self.seed, i, s) for i in rows]


def diffusion_factors(model: DiffusionModel, images: np.ndarray, labels, samples: int, seed: int,
                      batch_size: int, fisher: str = "mc", device: torch.device = torch.device("cpu")) -> list[dict]:
    """`fit_factors` of the training loss's GGN over the train images, `samples` draws each."""
    model.train(False)
    data = Draws(model, torch.from_numpy(images).to(device), labels, samples, seed, batch_size)
    with precision("fp32", device):
        return fit_factors(_Regression(model), curvature_parameters(model.network()), data, samples * len(images),
                           fisher)


def compute_curvature(weights_path, model_spec: dict, images_path, spec: dict, out_path,
                      device: torch.device = torch.device("cpu")) -> None:
    """The factors of the full model on the train split, saved with their provenance (torch.save)."""
    model = load_model(model_spec, Path(weights_path).parent).to(device)
    images = load_images(images_path)
    layers = diffusion_factors(model, images, load_labels(images_path), int(spec["samples"]), int(spec["seed"]),
                               int(spec["batch_size"]), spec["fisher"], device)
    attrs = {"model_sha256": file_sha256(weights_path), "train_sha256": array_sha256(images),
             "samples": int(spec["samples"]), "seed": int(spec["seed"]), "fisher": spec["fisher"],
             "kfac_approx": "expand", "device": device_name(device)}
    with atomic_output(out_path) as tmp:
        torch.save({"attrs": attrs, "layers": [_to_cpu(layer) for layer in layers]}, tmp)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    return {k: _to_cpu(v) for k, v in value.items()} if isinstance(value, dict) else value


def load_curvature(path, device: torch.device = torch.device("cpu")) -> tuple[list[dict], dict]:
    stored = torch.load(path, map_location=device, weights_only=True)
    return stored["layers"], stored["attrs"]


# ------------------------------------------------------------------ preconditioned features

class Identity:
    """The exact case's 'projection': the preconditioned gradients themselves (k = p)."""

    def project(self, grads: torch.Tensor, model_id: int = 0) -> torch.Tensor:
        return grads


def influence_features(model: DiffusionModel, layers: list[dict], images: np.ndarray, function: str, timesteps,
                       noise_seed: int, dampings, projector, batch_size: int, labels=None,
                       max_pass_items: int | None = None, arithmetic: str = "fp32") -> np.ndarray:
    """(V, L, n, k) float32: for each variant of VARIANTS and damping, the projected (G + damping I)^-1/2 g
    of every image, g its gradient of `function` averaged over `timesteps` at the featurizer's noise
    (featurize.batch_gradients) with respect to the Linear and Conv2d parameters, in the featurizer's
    `arithmetic` (featurize.dtype: fp32 or tf32, as featurize.features)."""
    arithmetic = featurize_arithmetic({"dtype": arithmetic})
    model.train(False)
    params = [(name, p) for name, p in curvature_parameters(model.network())]
    device = params[0][1].device
    out = None
    for start in range(0, len(images), batch_size):
        stop = min(len(images), start + batch_size)
        rows = None if labels is None else labels[start:stop]
        with precision(arithmetic, device):  # as featurize.features
            flat = batch_gradients(model, torch.from_numpy(images[start:stop]).to(device), range(start, stop),
                                   function, timesteps, noise_seed, rows, max_pass_items=max_pass_items,
                                   parameters=params)
        grads = dict(zip([name for name, _ in params],
                         [g.reshape(len(flat), *p.shape) for g, (_, p) in
                          zip(flat.split([p.numel() for _, p in params], dim=1), params)]))
        rotated = rotate(layers, grads)
        block = np.stack([np.stack([projector.project(precondition(layers, rotated, variant, lam).float(), model_id=0)
                                    .float().cpu().numpy() for lam in dampings]) for variant in VARIANTS])
        if out is None:
            out = np.empty((len(VARIANTS), len(dampings), len(images), block.shape[-1]), np.float32)
        out[:, :, start:stop] = block
    return out


def write_influence_features(weights_path, model_spec: dict, images_path, curvature_path, function: str, timesteps,
                             spec: dict, out_path, device: torch.device = torch.device("cpu"),
                             max_pass_items: int | None = None) -> None:
    """The preconditioned, projected gradients of a split, with their provenance. `spec`: the
    influence settings (dampings, proj_dim, batch_size) and the featurizer's proj_seed, noise_seed and
    dtype (its arithmetic, fp32 when absent, recorded as `arithmetic`)."""
    from .project import make_projector
    from .storage import write_array

    model = load_model(model_spec, Path(weights_path).parent).to(device).for_per_sample_gradients()
    layers, curvature = load_curvature(curvature_path, device)
    if curvature["model_sha256"] != (sha := file_sha256(weights_path)):
        raise ValueError(f"{curvature_path} holds the curvature of another model than {weights_path}")
    images = load_images(images_path)
    dim = sum(p.numel() for _, p in curvature_parameters(model.network()))
    if spec.get("proj_dim") is None:
        projector, info = Identity(), {"proj_dim": dim, "projector": "none", "grad_dim": dim}
    else:
        projector, info = make_projector(dim, int(spec["proj_dim"]), int(spec["proj_seed"]), device,
                                         int(spec["batch_size"]))
    dampings = [float(lam) for lam in spec["dampings"]]
    arithmetic = featurize_arithmetic(spec)
    features = influence_features(model, layers, images, function, timesteps, int(spec["noise_seed"]), dampings,
                                  projector, int(spec["batch_size"]), load_labels(images_path), max_pass_items,
                                  arithmetic)
    write_array(out_path, features, {
        "model_sha256": sha, "curvature_sha256": file_sha256(curvature_path), "curvature": curvature,
        "function": function, "K": len(timesteps), "timesteps": list(timesteps), "scheme": "uniform", "noises": 1,
        "noise_seed": int(spec["noise_seed"]), "dampings": dampings, "variants": list(VARIANTS),
        "query_sha256": array_sha256(images), "device": device_name(device), "dtype": "float32",
        "arithmetic": arithmetic, **info})


# ------------------------------------------------------------------ scores

# What a query store must share with the train store it is scored against (`arithmetic`: a store
# written before featurize.dtype records none, fp32).
SHARED_KEYS = ("model_sha256", "curvature_sha256", "dampings", "variants", "K", "timesteps", "noise_seed",
               "arithmetic", "proj_dim", "projector", "grad_dim")


class InfluenceJob:
    """A score job's inputs: preconditioned train and query features (V, L, rows, k) and the subsets;
    `influence(variant)` gives the (L, m, M) predictions over the dampings."""

    def __init__(self, train: np.ndarray, query: np.ndarray, masks: np.ndarray, dampings):
        self.train, self.query, self.masks, self.lambdas = train, query, masks, list(dampings)

    def influence(self, variant: str) -> np.ndarray:
        from .score import dot_predictions

        v = VARIANTS.index(variant)
        return np.concatenate([dot_predictions(self.train[v, l], self.query[v, l], self.masks)
                               for l in range(len(self.lambdas))])


def score_influence(train_path, query_path, subsets_path, methods, out_path) -> None:
    """The predictions store of the influence `methods` for one measurement and query split: train
    features of the training loss against the query features, both from one model and curvature."""
    from .methods import predictions, write_predictions
    from .provenance import ProvenanceError, require_finite, with_arithmetic
    from .score import read_masks
    from .storage import read_array

    (train, train_attrs), (query, query_attrs) = read_array(train_path), read_array(query_path)
    train_attrs, query_attrs = with_arithmetic(train_attrs), with_arithmetic(query_attrs)
    for key in SHARED_KEYS:
        if train_attrs.get(key) != query_attrs.get(key):
            raise ProvenanceError(f"{train_path} and {query_path} disagree on {key} ({train_attrs.get(key)!r} vs "
                                  f"{query_attrs.get(key)!r})")
    if train_attrs.get("function") != "simple":
        raise ProvenanceError(f"{train_path}: train features of {train_attrs.get('function')!r}; influence "
                              "functions take the training loss's gradient ('simple')")
    require_finite(str(train_path), train)
    require_finite(str(query_path), query)
    masks = read_masks(subsets_path, train.shape[2], train_path)
    job = InfluenceJob(train, query, masks, train_attrs["dampings"])
    attrs = {key: query_attrs[key] for key in ("function", "K", "proj_dim", "model_sha256", "curvature_sha256",
                                               "curvature", "projector")}
    write_predictions(out_path, predictions(methods, job), {**attrs, "query_sha256": query_attrs["query_sha256"],
                                                           "subsets_sha256": file_sha256(subsets_path)})
