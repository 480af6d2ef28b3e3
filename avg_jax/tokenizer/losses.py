"""Tokenizer losses, AVG eqs. 3-6, plus the codebook term that moves the vokens.

  recon    = ||x_i − v̂_i||²: x_i the FIXED input image feature (eq. 3; Encoder_v of eq. 1 is the pretrained
             encoder, our projection head trains, so its output v_i would be a moving target)
  commit   = Σ_d ||v_i − sg(ẑ^(d))||²                           (eq. 4)
  codebook = Σ_d ||sg(v_i) − ẑ^(d)||²   (VQ-VAE codebook term; eq. 4 alone gives the codes no gradient)
  align    = ||E(v̂_i) − v_t||², averaged over the captions of the image (eq. 5; E = the image head, which maps
             the reconstructed feature into the code space of v_t)
  total    = w_recon·recon + w_commit·commit + w_codebook·codebook + w_align·align   (eq. 6: all weights 1;
             w_align = 0 is IRGen)
Each term is averaged over the images of the batch; align over the images that have a caption.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TokenizerLossWeights:
    """Weights of the eq. 6 terms (1, 1, 1, 1 is the paper's sum; align=0 is IRGen)."""

    recon: float = 1.0
    commit: float = 1.0
    codebook: float = 1.0
    align: float = 1.0
    # What the codebook term pulls each step's voken towards: 'partial_sums' = Σ_d ||sg(v_i) − ẑ^(d)||²,
    # 'residuals' = Σ_d ||sg(r_d) − voken_d||² (r_d the residual step d quantizes: RQ-VAE's per-step update).
    codebook_target: str = "partial_sums"

    def __post_init__(self) -> None:
        if self.codebook_target not in ("partial_sums", "residuals"):
            raise ValueError(f"TokenizerLossWeights.codebook_target must be 'partial_sums' or 'residuals', got "
                             f"{self.codebook_target!r}")


def tokenizer_losses(
    image_x: jax.Array,  # [batch, image_dim] input image feature (the reconstruction target)
    v_i: jax.Array,  # [batch, dim] image vector in code space
    partial_sums: jax.Array,  # [batch, M, dim] ẑ^(1..M)
    v_hat: jax.Array,  # [batch, image_dim] decoder output v̂_i
    v_hat_code: jax.Array,  # [batch, dim] v̂_i mapped into the code space
    v_t: jax.Array,  # [batch, K, dim] caption vectors (K = max captions per image)
    text_mask: jax.Array,  # [batch, K] 1 for a real caption
    weights: TokenizerLossWeights,
    residuals: jax.Array | None = None,  # [batch, M, dim] r_d, the input of step d (codebook_target 'residuals')
) -> dict[str, jax.Array]:
    """The four terms and their weighted sum (scalars), eqs. 3-6."""
    sg = jax.lax.stop_gradient
    recon = jnp.mean(jnp.sum((image_x - v_hat) ** 2, axis=-1))
    commit = jnp.mean(jnp.sum((v_i[:, None, :] - sg(partial_sums)) ** 2, axis=(1, 2)))
    if weights.codebook_target == "residuals":
        if residuals is None:
            raise ValueError("TokenizerLossWeights.codebook_target 'residuals' needs the RQ residuals r_d")
        vokens = jnp.diff(partial_sums, axis=1, prepend=jnp.zeros_like(partial_sums[:, :1]))  # [batch, M, dim]
        codebook = jnp.mean(jnp.sum((sg(residuals) - vokens) ** 2, axis=(1, 2)))
    else:
        codebook = jnp.mean(jnp.sum((sg(v_i)[:, None, :] - partial_sums) ** 2, axis=(1, 2)))
    mask = text_mask.astype(v_hat.dtype)
    per_caption = jnp.sum((v_hat_code[:, None, :] - v_t) ** 2, axis=-1)  # [batch, K]
    num_captions = jnp.sum(mask, axis=1)  # [batch]
    per_image = jnp.sum(per_caption * mask, axis=1) / jnp.maximum(num_captions, 1.0)
    has_caption = (num_captions > 0).astype(v_hat.dtype)
    align = jnp.sum(per_image * has_caption) / jnp.maximum(jnp.sum(has_caption), 1.0)
    total = (weights.recon * recon + weights.commit * commit + weights.codebook * codebook
             + weights.align * align)
    return {"total": total, "recon": recon, "commit": commit, "codebook": codebook, "align": align}


def info_nce(image_emb: jax.Array, text_emb: jax.Array, temperature: float, valid: jax.Array | None = None,
             ) -> jax.Array:
    """Symmetric InfoNCE over matching (image, caption) pairs [batch, dim]; `valid` [batch] drops pairs."""
    logits = jnp.dot(image_emb, text_emb.T) / temperature  # [batch, batch]
    if valid is None:
        valid = jnp.ones(logits.shape[0], bool)
    valid = valid.astype(bool)
    pair = valid[:, None] & valid[None, :]
    logits = jnp.where(pair, logits, -1e9)
    # the positives as row-wise dot products, not jnp.diagonal(logits): the diagonal's gradient is a scatter,
    # which the SPMD partitioner wraps in a conditional holding all-gathers, and XLA:CPU does not order
    # collectives inside a conditional with those outside it (8 host devices deadlocked)
    diag = jnp.where(valid, jnp.sum(image_emb * text_emb, axis=-1) / temperature, -1e9)
    i2t = jax.nn.logsumexp(logits, axis=1) - diag
    t2i = jax.nn.logsumexp(logits, axis=0) - diag
    w = valid.astype(logits.dtype)
    return 0.5 * jnp.sum((i2t + t2i) * w) / jnp.maximum(jnp.sum(w), 1.0)
