"""The RQ tokenizer as a flax linen module: projection heads, residual quantizer, shallow MLP decoder.

Code space: image features v and caption features t are mapped by projection heads (trained by the
InfoNCE warm-up; also the dense two-tower baseline) to L2-normalised vectors v_i, v_t of `code_dim`.
v_i is residual-quantized into M vokens; the decoder maps ẑ^(M) to v̂_i, the reconstruction of the FIXED input
image feature (eq. 3, v_i = Encoder_v(i) of eq. 1 being the pretrained encoder's output): reconstructing the
trainable head's own output would be a moving target the head could shrink towards the decoder.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from avg_jax.tokenizer.quantizer import RQCodes, rq_encode


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RQTokenizerConfig:
    """Shapes of the tokenizer. N = codebook_size vokens, M = num_levels."""

    code_dim: int = 128
    codebook_size: int = 256
    num_levels: int = 4
    shared_codebook: bool = True  # the paper's setting: one codebook for all M steps
    projection_heads: bool = True  # False: features are used as given (already aligned, dims must match)
    head_hidden_dim: int = 0  # 0: linear heads
    normalize_embeddings: bool = True
    decoder_hidden_dim: int = 512
    decoder_layers: int = 1  # hidden layers of the shallow MLP decoder

    @property
    def num_codebooks(self) -> int:
        return 1 if self.shared_codebook else self.num_levels

    def validate(self, image_dim: int, text_dim: int) -> None:
        for name in ("code_dim", "codebook_size", "num_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"RQTokenizerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.projection_heads and not image_dim == text_dim == self.code_dim:
            raise ValueError(f"RQTokenizerConfig.projection_heads=False needs image_dim == text_dim == code_dim, "
                             f"got {image_dim}, {text_dim}, {self.code_dim}")


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ProjectionHead(nn.Module):
    """Feature -> code space (linear, or one hidden GELU layer), optionally L2-normalised."""

    out_dim: int
    hidden_dim: int = 0
    normalize: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.hidden_dim:
            x = nn.gelu(nn.Dense(self.hidden_dim, name="hidden")(x))
        x = nn.Dense(self.out_dim, name="out")(x)
        return l2_normalize(x) if self.normalize else x


class MLPDecoder(nn.Module):
    """Shallow MLP v̂_i = MLP(ẑ^(M)) (eq. 3): [..., code_dim] -> [..., out_dim]."""

    out_dim: int
    hidden_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = nn.gelu(nn.Dense(self.hidden_dim, name=f"hidden_{i}")(x))
        return nn.Dense(self.out_dim, name="out")(x)


class RQTokenizer(nn.Module):
    """Heads + codebook(s) + decoder. Params: image_head, text_head, codebooks [C, N, code_dim], decoder
    (code_dim -> image_dim: it reconstructs the input image feature, eq. 3)."""

    config: RQTokenizerConfig
    image_dim: int | None = None  # the decoder's output width; None: embedding / quantization only, no decoder

    def setup(self) -> None:
        c = self.config
        if c.projection_heads:
            self.image_head = ProjectionHead(c.code_dim, c.head_hidden_dim, c.normalize_embeddings)
            self.text_head = ProjectionHead(c.code_dim, c.head_hidden_dim, c.normalize_embeddings)
        # Random init as in the paper; train_tokenizer overwrites it with k-means on residuals by default.
        self.codebooks = self.param("codebooks", nn.initializers.normal(stddev=c.code_dim ** -0.5),
                                    (c.num_codebooks, c.codebook_size, c.code_dim))
        if self.image_dim is not None:
            self.decoder = MLPDecoder(self.image_dim, c.decoder_hidden_dim, c.decoder_layers)

    def embed_image(self, x: jax.Array) -> jax.Array:
        """Image features [..., image_dim] -> v_i [..., code_dim]."""
        if self.config.projection_heads:
            return self.image_head(x)
        return l2_normalize(x) if self.config.normalize_embeddings else x

    def embed_text(self, x: jax.Array) -> jax.Array:
        """Caption features [..., text_dim] -> v_t [..., code_dim]."""
        if self.config.projection_heads:
            return self.text_head(x)
        return l2_normalize(x) if self.config.normalize_embeddings else x

    def quantize(self, v_i: jax.Array) -> RQCodes:
        return rq_encode(v_i, self.codebooks, self.config.num_levels)

    def quantize_image(self, x: jax.Array) -> RQCodes:
        """Image features [batch, image_dim] -> RQ of v_i (eqs. 1-2)."""
        return self.quantize(self.embed_image(x))

    def decode(self, z_q: jax.Array) -> jax.Array:
        """ẑ^(M) [..., code_dim] -> v̂_i [..., image_dim] (eq. 3)."""
        return self.decoder(z_q)

    def __call__(self, image_x: jax.Array, text_x: jax.Array) -> dict[str, Any]:
        """image_x [batch, image_dim], text_x [batch, K, text_dim] -> v_i, v_t [.., code_dim], RQ codes,
        v̂_i [batch, image_dim]."""
        v_i = self.embed_image(image_x)  # [batch, code_dim]
        v_t = self.embed_text(text_x)  # [batch, K, code_dim]
        rq = self.quantize(v_i)
        z_q = rq.partial_sums[:, -1]  # ẑ^(M): differentiable w.r.t. the vokens
        # Straight-through estimator: the value is ẑ^(M); the gradient also reaches v_i (the encoder).
        z_q = z_q + v_i - jax.lax.stop_gradient(v_i)
        return {"v_i": v_i, "v_t": v_t, "rq": rq, "v_hat": self.decode(z_q)}


def init_params(config: RQTokenizerConfig, image_dim: int, text_dim: int, seed: int | jax.Array) -> dict:
    """Fresh parameters for `RQTokenizer(config, image_dim)` on features of the given dims (seed or PRNG key)."""
    config.validate(image_dim, text_dim)
    rng = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
    variables = RQTokenizer(config, image_dim).init(rng, jnp.zeros((1, image_dim)), jnp.zeros((1, 1, text_dim)))
    return variables["params"]


def embed_images(config: RQTokenizerConfig, params: dict, image_x: jax.Array) -> jax.Array:
    """Dense two-tower baseline, image side: features [n, image_dim] -> normalised codes-space [n, code_dim]."""
    return _embed(config, params, image_x, "image")


def embed_texts(config: RQTokenizerConfig, params: dict, text_x: jax.Array) -> jax.Array:
    """Dense two-tower baseline, text side: features [n, text_dim] -> code space [n, code_dim]."""
    return _embed(config, params, text_x, "text")


@functools.partial(jax.jit, static_argnames=("config", "side"))
def _embed(config: RQTokenizerConfig, params: dict, x: jax.Array, side: str) -> jax.Array:
    method = RQTokenizer.embed_image if side == "image" else RQTokenizer.embed_text
    return RQTokenizer(config).apply({"params": params}, x, method=method)
