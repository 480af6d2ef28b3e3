"""Tokenizer losses, AVG eqs. 3-6, plus the codebook term that moves the vokens.

  recon    = ||x_i − v̂_i||²: x_i the FIXED input image feature (eq. 3; Encoder_v of eq. 1 is the pretrained
             encoder, our projection head trains, so its output v_i would be a moving target)
  commit   = Σ_d ||v_i − sg(ẑ^(d))||²                           (eq. 4)
  codebook = Σ_d ||sg(v_i) − ẑ^(d)||²   (VQ-VAE codebook term; eq. 4 alone gives the codes no gradient)
  align    = ||E(v̂_i) − v_t||², averaged over the captions of the image (eq. 5; E = the image head, which maps
             the reconstructed feature into the code space of v_t)
  total    = w_recon·recon + w_commit·commit + w_codebook·codebook + w_align·align   (eq. 6: all weights 1;
             w_align = 0 is IRGen)
           + w_prefix·prefix_align, an extension (0 = the paper): prefix_align = mean_{d<M} ||ẑ^(d) − v_t||²,
             averaged over the captions like align, pulls the coarse partial sums (the identifier's first vokens)
             towards the captions of the images that choose them, so a caption predicts its image's first voken
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
    # Hierarchical semantic alignment (not in the paper): weight of prefix_align, the levels 1..M-1 partial sums
    # against the image's captions (0 = off; M = 1 has no prefix and contributes 0).
    prefix_align: float = 0.0

    def __post_init__(self) -> None:
        if self.codebook_target not in ("partial_sums", "residuals"):
            raise ValueError(f"TokenizerLossWeights.codebook_target must be 'partial_sums' or 'residuals', got "
                             f"{self.codebook_target!r}")
        if self.prefix_align < 0:
            raise ValueError(f"TokenizerLossWeights.prefix_align must be >= 0, got {self.prefix_align}")


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
    """The four terms of eqs. 3-6, prefix_align and their weighted sum (scalars)."""
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
    num_captions = jnp.sum(mask, axis=1)  # [batch]
    has_caption = (num_captions > 0).astype(v_hat.dtype)

    def caption_mean(vectors: jax.Array) -> jax.Array:  # [batch, dim] -> mean over images with a caption of
        per_caption = jnp.sum((vectors[:, None, :] - v_t) ** 2, axis=-1)  # the mean over its captions [batch, K]
        per_image = jnp.sum(per_caption * mask, axis=1) / jnp.maximum(num_captions, 1.0)
        return jnp.sum(per_image * has_caption) / jnp.maximum(jnp.sum(has_caption), 1.0)

    align = caption_mean(v_hat_code)
    prefixes = [caption_mean(partial_sums[:, d]) for d in range(partial_sums.shape[1] - 1)]
    prefix_align = sum(prefixes) / len(prefixes) if prefixes else jnp.zeros((), v_hat.dtype)
    total = (weights.recon * recon + weights.commit * commit + weights.codebook * codebook
             + weights.align * align + weights.prefix_align * prefix_align)
    return {"total": total, "recon": recon, "commit": commit, "codebook": codebook, "align": align,
            "prefix_align": prefix_align}


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
