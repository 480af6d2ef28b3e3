"""Add new tokens (vokens) to a T5's vocabulary: embedding rows (and lm_head columns when untied).

Layout follows `avg_jax.data.vocab`: ids [0, text_size) keep their rows, new token j gets id
text_size + j, and the total is padded to a multiple of 128 with zero rows (never targets).

init='codebook' is the paper's voken embedding: the tokenizer's codebook vectors [n_new, d_code] are
mapped to d_model by `project_codebook` and scaled so their mean row norm equals that of the existing
text embedding rows. init='random' (the ablation) draws N(0, s^2) with s the RMS of the text rows.
"""

from __future__ import annotations

import jax
import numpy as np

from avg_jax.data.vocab import pad_vocab_size
from avg_jax.t5.configs import T5Config

INITS = ("codebook", "random")


def project_codebook(codebook: np.ndarray, d_model: int, rng: jax.Array | None = None) -> np.ndarray:
    """Map codebook vectors [n, d_code] to [n, d_model], preserving their geometry as well as a linear map can.

    d_code == d_model: identity. d_code < d_model: a random semi-orthogonal map (orthonormal rows, QR of a
    Gaussian; needs `rng`), which preserves all inner products and distances exactly. d_code > d_model:
    projection onto the top-d_model right singular vectors of the (uncentred) codebook, the least-squares
    best rank-d_model approximation of the codebook's inner products (Eckart-Young).
    """
    codebook = np.asarray(codebook, np.float64)
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be [num_new, dim], got shape {codebook.shape}")
    d_code = codebook.shape[1]
    if d_code == d_model:
        return codebook.astype(np.float32)
    if d_code < d_model:
        if rng is None:
            raise ValueError("project_codebook: an rng is needed when the codebook dim is below d_model")
        gaussian = np.asarray(jax.random.normal(rng, (d_model, d_code)), np.float64)
        q, _ = np.linalg.qr(gaussian)  # [d_model, d_code], orthonormal columns
        return (codebook @ q.T).astype(np.float32)
    _, _, vt = np.linalg.svd(codebook, full_matrices=False)  # vt [min(n, d_code), d_code]
    basis = np.zeros((d_code, d_model))
    k = min(d_model, vt.shape[0])
    basis[:, :k] = vt[:k].T
    return (codebook @ basis).astype(np.float32)


def _mean_norm(rows: np.ndarray) -> float:
    return float(np.mean(np.linalg.norm(rows, axis=1)))


def _new_rows(existing: np.ndarray, n_new: int, init: str, projected: np.ndarray | None,
              rng: jax.Array | None) -> np.ndarray:
    """[n_new, d] rows matched to the scale of `existing` [text_size, d]."""
    if init == "random":
        std = float(np.sqrt(np.mean(np.square(existing))))
        return np.asarray(jax.random.normal(rng, (n_new, existing.shape[1])), np.float32) * std
    norm = _mean_norm(projected)
    scale = _mean_norm(existing) / norm if norm > 0 else 0.0
    return (projected * scale).astype(np.float32)


def expand_vocab(params: dict, config: T5Config, n_new: int, init: str = "codebook",
                 codebook: np.ndarray | None = None, rng: jax.Array | None = None,
                 text_size: int | None = None) -> tuple[dict, T5Config]:
    """Params and config with `n_new` tokens at ids [text_size, text_size + n_new) (see module doc).

    text_size defaults to config.vocab_size; for HF checkpoints pass the tokenizer's size (e.g. 32100:
    T5's 28 unused padding rows are then reused).
    """
    text_size = config.vocab_size if text_size is None else text_size
    if not 0 < text_size <= config.vocab_size:
        raise ValueError(f"expand_vocab: text_size {text_size} outside (0, vocab_size={config.vocab_size}]")
    if n_new < 0:
        raise ValueError(f"expand_vocab: n_new must be >= 0, got {n_new}")
    if init not in INITS:
        raise ValueError(f"expand_vocab: init must be one of {INITS}, got {init!r}")
    projected = None
    if init == "codebook":
        if codebook is None:
            raise ValueError("expand_vocab: init='codebook' needs the codebook vectors")
        if np.ndim(codebook) != 2 or np.shape(codebook)[0] != n_new:
            raise ValueError(f"expand_vocab: codebook must be [n_new={n_new}, dim], got shape {np.shape(codebook)}")
        projected = project_codebook(codebook, config.d_model, rng)
    elif rng is None:
        raise ValueError("expand_vocab: init='random' needs an rng")
    new_size = pad_vocab_size(text_size + n_new)
    rngs = jax.random.split(rng, 2) if rng is not None else (None, None)

    def grow(rows: np.ndarray, key) -> np.ndarray:  # [vocab, d] -> [new_size, d]
        out = np.zeros((new_size, rows.shape[1]), np.float32)
        out[:text_size] = rows[:text_size]
        out[text_size:text_size + n_new] = _new_rows(rows[:text_size], n_new, init, projected, key)
        return out

    params = jax.tree_util.tree_map(np.asarray, jax.device_get(params))
    new_params = {**params, "token_embedder": {**params["token_embedder"]}}
    new_params["token_embedder"]["embedding"] = grow(params["token_embedder"]["embedding"], rngs[0])
    if not config.tie_word_embeddings:
        new_params["lm_head"] = np.ascontiguousarray(grow(params["lm_head"].T, rngs[1]).T)
    return new_params, config.replace(vocab_size=new_size)
