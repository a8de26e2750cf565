"""K-FAC and EK-FAC influence functions for diffusion models (Mlodozeniec, Eschenhagen, Bae, Immer,
Krueger and Turner, "Influence Functions for Scalable Data Attribution in Diffusion Models", ICLR
2025, arXiv 2410.13850; code github.com/BrunoKM/diffusion-influence).

The score of train image i for query z is S(z, i) = g_z^T (G + lambda I)^-1 g_i, G the generalized
Gauss-Newton (GGN) of the training loss, g_i the gradient of train image i's training loss
(L_Simple) and g_z that of the query's measurement (`simple`: the loss, `elbo`, or D-TRAK's
`square`). G is approximated per Linear / Conv2d layer by K-FAC, B (x) A (B the covariance of the
gradients at the layer's output, A that of its inputs), or by EK-FAC, which keeps K-FAC's Kronecker
eigenbasis Q = Q_B (x) Q_A but replaces its eigenvalues by diag(Q^T G Q) (George et al. 2018).
Both come from curvlinops (`EKFACLinearOperator`, which computes K-FAC's factors first).

What we follow (the reference code's `compute_influence.py` and `constructors.py`, its defaults in
`config_schemas.KFACConfig`):
- the GGN of the diffusion loss mean_pixels (eps_theta(x_t, t) - eps)^2 over the train set, the
  network's output flattened per image (one loss term per image), curvlinops' MSE loss with mean
  reduction and `num_per_example_loss_terms=1`;
- each train image enters the GGN at `samples` draws of (t, eps), t uniform on {0, ..., T-1};
- K-FAC "expand" for weight sharing (convolutions, attention), the Monte-Carlo Fisher with one
  sampled target per draw (`fisher: mc`; `type-2` computes the GGN exactly per draw), weights and
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
and its preconditioned copies (V x L x B x p for V variants and L dampings) or their projections.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import load_images, load_labels
from .device import device_name
from .featurize import batch_gradients
from .models import DiffusionModel, load_model
from .noise import noise_batch
from .storage import array_sha256, atomic_output, file_sha256

VARIANTS = ("kfac", "ekfac")
LAYERS = (torch.nn.Linear, torch.nn.Conv2d)
DEFAULT_DAMPING = 1e-8  # the reference's KFACConfig.damping, with use_exact_damping


def curvature_parameters(network: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters K-FAC covers: those of the network's Linear and Conv2d layers."""
    return [(f"{prefix}.{name}" if prefix else name, p) for prefix, module in network.named_modules()
            if isinstance(module, LAYERS) for name, p in module.named_parameters(recurse=False) if p.requires_grad]


def fit_factors(model_func: torch.nn.Module, named_params, data, num_data: int, fisher: str = "mc",
                seed: int = 0, batch_size_fn=None) -> list[dict]:
    """Per layer: its parameters' names, the eigenvectors Q_A (None without a weight) and Q_B of
    K-FAC's factors and the eigenvalues of each variant ({'kfac'|'ekfac': {'weight'|'bias': (d_out,
    d_in) or (d_out,)}}), from curvlinops' EK-FAC of the MSE loss (mean over each output row) of
    `model_func` over `data` (re-iterable (X, y) batches, `num_data` rows in all)."""
    from curvlinops import EKFACLinearOperator

    params = [p for _, p in named_params]
    names = {id(p): name for name, p in named_params}
    operator = EKFACLinearOperator(
        model_func, torch.nn.MSELoss(reduction="mean"), params, data, fisher_type=fisher, mc_samples=1,
        kfac_approx="expand", num_per_example_loss_terms=1, num_data=num_data, check_deterministic=False,
        seed=seed, batch_size_fn=batch_size_fn)
    operator.compute_kronecker_factors()
    inputs = {k: v.clone() for k, v in operator._input_covariances.items()}
    outputs = {k: v.clone() for k, v in operator._gradient_covariances.items()}
    operator.compute_eigenvalue_correction()
    layers = []
    for module, positions in operator._mapping.items():
        qa = operator._input_covariances_eigenvectors.get(module)
        qb = operator._gradient_covariances_eigenvectors[module]
        b = torch.einsum("ji,jk,ki->i", qb, outputs[module], qb)  # diag(Q_B^T B Q_B), in EK-FAC's basis
        kfac, ekfac = {}, {}
        for kind, position in positions.items():
            corrected = operator._corrected_eigenvalues[module][position]
            if kind == "weight":
                a = torch.einsum("ji,jk,ki->i", qa, inputs[module], qa)
                kfac[kind] = torch.outer(b, a)
                ekfac[kind] = corrected.reshape(len(b), -1)
            else:
                kfac[kind], ekfac[kind] = b.clone(), corrected.reshape(-1)
        layers.append({"module": module, "names": {kind: names[id(params[pos])] for kind, pos in positions.items()},
                       "qa": qa, "qb": qb, "eigenvalues": {"kfac": kfac, "ekfac": ekfac}})
    return layers


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
    """curvlinops' view of a diffusion model: a batch {x_t, t[, cond]} -> the prediction, one row per
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
    """Re-iterable (batch, target) pairs over `samples` passes of the train images, image i noised at
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
                yield batch, model.target(x0, eps, t).flatten(1)


def diffusion_factors(model: DiffusionModel, images: np.ndarray, labels, samples: int, seed: int,
                      batch_size: int, fisher: str = "mc", device: torch.device = torch.device("cpu")) -> list[dict]:
    """`fit_factors` of the training loss's GGN over the train images, `samples` draws each."""
    model.train(False)
    data = Draws(model, torch.from_numpy(images).to(device), labels, samples, seed, batch_size)
    return fit_factors(_Regression(model), curvature_parameters(model.network()), data, samples * len(images),
                       fisher, seed, batch_size_fn=lambda batch: len(batch["x_t"]))


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
                       max_pass_items: int | None = None) -> np.ndarray:
    """(V, L, n, k) float32: for each variant of VARIANTS and damping, the projected (G + damping I)^-1/2 g
    of every image, g its gradient of `function` averaged over `timesteps` at the featurizer's noise
    (featurize.batch_gradients) with respect to the Linear and Conv2d parameters."""
    model.train(False)
    params = [(name, p) for name, p in curvature_parameters(model.network())]
    device = params[0][1].device
    out = None
    for start in range(0, len(images), batch_size):
        stop = min(len(images), start + batch_size)
        rows = None if labels is None else labels[start:stop]
        flat = batch_gradients(model, torch.from_numpy(images[start:stop]).to(device), range(start, stop), function,
                               timesteps, noise_seed, rows, max_pass_items=max_pass_items, parameters=params)
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
    influence settings (dampings, proj_dim, batch_size) and the featurizer's proj_seed and noise_seed."""
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
    features = influence_features(model, layers, images, function, timesteps, int(spec["noise_seed"]), dampings,
                                  projector, int(spec["batch_size"]), load_labels(images_path), max_pass_items)
    write_array(out_path, features, {
        "model_sha256": sha, "curvature_sha256": file_sha256(curvature_path), "curvature": curvature,
        "function": function, "K": len(timesteps), "timesteps": list(timesteps), "scheme": "uniform", "noises": 1,
        "noise_seed": int(spec["noise_seed"]), "dampings": dampings, "variants": list(VARIANTS),
        "query_sha256": array_sha256(images), "device": device_name(device), "dtype": "float32", **info})


# ------------------------------------------------------------------ scores

# What a query store must share with the train store it is scored against.
SHARED_KEYS = ("model_sha256", "curvature_sha256", "dampings", "variants", "K", "timesteps", "noise_seed",
               "proj_dim", "projector", "grad_dim")


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
    from .provenance import ProvenanceError, require_finite
    from .score import read_masks
    from .storage import read_array

    train, train_attrs = read_array(train_path)
    query, query_attrs = read_array(query_path)
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
