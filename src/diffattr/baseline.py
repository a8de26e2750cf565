"""Similarity baselines: scores from dot products or cosines, train vs queries, of the flattened
images (raw pixel) or of their CLIP embeddings (diffattr.clip).

The protocol's pixel baseline is for pixel-space models. A latent model (Stable Diffusion) would
compare VAE latents instead (the model layer's `encode()`); that is not built yet. CLIP
embeds the images themselves for every model kind.
"""
from __future__ import annotations

import numpy as np

from .clip import CLIP_KEYS, read_embeddings
from .data import load_images
from .methods import METHODS, methods_reading, predictions, write_predictions
from .provenance import ProvenanceError, require_finite
from .score import DotJob, read_masks
from .storage import array_sha256, file_sha256


def baseline_split(train_path, query_path, subsets_path, baseline: str, out_path, samples_path=None) -> None:
    """Subset predictions (1, m, M) of one baseline, with the hashes of both image sets and of the
    subsets table (and, for CLIP, the model, weights and preprocessing the embeddings record).
    `train_path` and `query_path` are image stores, or CLIP embedding stores for the CLIP baselines.
    `samples_path`: the store the models read for the queries when it is not their images (a latent
    kind's latents); the queries are then identified by its hash (query_sha256), as the ground truth
    that the LDS holds these predictions against identifies them."""
    known = methods_reading("pixels", "embeddings")
    if baseline not in known:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {', '.join(known)}")
    if METHODS[baseline].reads == "embeddings":
        train, query, train_attrs, query_attrs = read_embeddings(train_path, query_path)
        attrs = {"train_sha256": train_attrs["images_sha256"], "query_sha256": query_attrs["images_sha256"],
                 **{key: train_attrs.get(key) for key in (*CLIP_KEYS, "clip_pretrained")}}
    else:
        train, query = _pixels(train_path, query_path)
        attrs = {"train_sha256": array_sha256(train), "query_sha256": array_sha256(query)}
    if samples_path is not None:
        attrs["query_sha256"] = array_sha256(load_images(samples_path))
    masks = read_masks(subsets_path, len(train), train_path, rows="")
    job = DotJob(train.reshape(len(train), -1), query.reshape(len(query), -1), masks)
    write_predictions(out_path, predictions([baseline], job), {**attrs, "subsets_sha256": file_sha256(subsets_path)})


def _pixels(train_path, query_path) -> tuple[np.ndarray, np.ndarray]:
    train, query = load_images(train_path), load_images(query_path)
    if train.shape[1:] != query.shape[1:]:
        raise ProvenanceError(f"{train_path} holds images of shape {train.shape[1:]}, but {query_path} "
                              f"holds images of shape {query.shape[1:]}: they cannot be compared pixel by pixel")
    for path, images in ((train_path, train), (query_path, query)):
        require_finite(str(path), images)
    return train, query
