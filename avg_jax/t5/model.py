"""T5 encoder-decoder (v1.0 and v1.1) in flax.linen: the parameters and the training (teacher-forced) forward pass.

Parameter layout (kernels are [in, out], attention kernels split heads: [embed, heads, kv]):
  token_embedder/embedding                       [vocab, embed]   shared by encoder, decoder (and head if tied)
  encoder/image_projection/{kernel,bias}         optional soft-token prefix from an image feature
  encoder/layers_i/{pre_attention_layer_norm, attention, pre_mlp_layer_norm, mlp}, encoder/encoder_norm
  decoder/layers_i/{pre_self_attention_layer_norm, self_attention, pre_cross_attention_layer_norm,
                    encoder_decoder_attention, pre_mlp_layer_norm, mlp}, decoder/decoder_norm
  lm_head                                        [embed, vocab]   only when tie_word_embeddings=False
The relative position bias lives in layer 0's self-attention (`relpos_bias/rel_embedding`) and is shared
by the later layers of the same stack, as in the original T5 and HF.

The modules only create parameters and wire the layer functions of `avg_jax.t5.layers` together. There is
no flax decode cache: incremental (one token per step) decoding is `avg_jax.t5.decoding`, which calls the
same layer functions on this parameter tree (tested equal to `T5.__call__` step by step).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.t5.configs import T5Config
from avg_jax.t5.layers import (
    MASK_VALUE,
    MLP,
    Attention,
    Embed,
    RMSNorm,
    logical_param,
    mixed_einsum,
    normal_init,
    output_logits,
)

Array = jax.Array


def encoder_input_mask(input_ids: Array, num_image_tokens: int = 0) -> Array:
    """Encoder key mask [batch, num_image_tokens + length]: image soft tokens are always valid, PAD (0) is not."""
    mask = input_ids != 0
    if num_image_tokens:
        mask = jnp.concatenate([jnp.ones((input_ids.shape[0], num_image_tokens), bool), mask], axis=1)
    return mask


def _key_mask_bias(mask: Array) -> Array:
    # [batch, k] bool -> additive [batch, 1, 1, k]
    return jnp.where(mask, 0.0, MASK_VALUE)[:, None, None, :].astype(jnp.float32)


class EncoderLayer(nn.Module):
    config: T5Config
    has_relative_bias: bool = False

    @nn.compact
    def __call__(self, x: Array, mask_bias: Array, position_bias: Array | None,
                 deterministic: bool) -> tuple[Array, Array]:
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        y = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_attention_layer_norm")(x)
        y, position_bias = Attention(cfg, "encoder", self.has_relative_bias, name="attention")(
            y, None, mask_bias, position_bias, deterministic)
        x = x + dropout(y, deterministic=deterministic)
        y = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_mlp_layer_norm")(x)
        y = MLP(cfg, name="mlp")(y, deterministic)
        x = x + dropout(y, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), position_bias


class DecoderLayer(nn.Module):
    config: T5Config
    has_relative_bias: bool = False

    @nn.compact
    def __call__(self, x: Array, encoded: Array, cross_mask_bias: Array, self_mask_bias: Array,
                 position_bias: Array | None, deterministic: bool) -> tuple[Array, Array]:
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        y = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_self_attention_layer_norm")(x)
        y, position_bias = Attention(cfg, "decoder", self.has_relative_bias, name="self_attention")(
            y, None, self_mask_bias, position_bias, deterministic)
        x = x + dropout(y, deterministic=deterministic)
        y = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_cross_attention_layer_norm")(x)
        y, _ = Attention(cfg, "cross", name="encoder_decoder_attention")(
            y, encoded, cross_mask_bias, None, deterministic)
        x = x + dropout(y, deterministic=deterministic)
        y = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_mlp_layer_norm")(x)
        y = MLP(cfg, name="mlp")(y, deterministic)
        x = x + dropout(y, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), position_bias


class Encoder(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, embedded: Array, mask: Array, image_features: Array | None,
                 deterministic: bool) -> Array:
        # embedded [batch, length, embed]; mask [batch, prefix + length]; image_features [batch, image_dim]
        cfg = self.config
        x = embedded
        if image_features is not None:
            k, f = cfg.num_image_tokens, cfg.image_feature_dim
            if image_features.ndim != 2 or image_features.shape[-1] != f:
                raise ValueError(f"image_features must be [batch, {f}], got shape {image_features.shape}")
            # L2-normalised features get the token embeddings' per-element scale (std 1) from this init
            kernel = logical_param(self, "image_projection_kernel", normal_init(1.0), (f, k, cfg.d_model),
                            ("image_features", "image_tokens", "embed"))
            bias = logical_param(self, "image_projection_bias", nn.initializers.zeros, (k, cfg.d_model),
                          ("image_tokens", "embed"))
            prefix = mixed_einsum("bf,fkd->bkd", image_features.astype(x.dtype), kernel)
            x = jnp.concatenate([prefix + bias.astype(x.dtype), x], axis=1)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"encoder mask shape {mask.shape} does not match the encoder input {x.shape[:2]}")
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        mask_bias = _key_mask_bias(mask)
        layer_cls = nn.remat(EncoderLayer, static_argnums=(4,)) if cfg.remat else EncoderLayer
        position_bias = None
        for i in range(cfg.num_encoder_layers):
            x, position_bias = layer_cls(cfg, i == 0, name=f"layers_{i}")(x, mask_bias, position_bias,
                                                                          deterministic)
        x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="encoder_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, embedded: Array, encoded: Array, encoder_mask: Array, deterministic: bool) -> Array:
        # embedded [batch, target_length, embed]; encoded [batch, source_length, embed]
        cfg = self.config
        x = nn.Dropout(cfg.dropout_rate)(embedded, deterministic=deterministic)
        cross_mask_bias = _key_mask_bias(encoder_mask)
        # causal only: targets are right-padded, so padding never precedes a real token
        length = embedded.shape[1]
        self_mask_bias = jnp.asarray(np.where(np.tril(np.ones((length, length), bool)), 0.0, MASK_VALUE),
                                     jnp.float32)[None, None]
        layer_cls = nn.remat(DecoderLayer, static_argnums=(6,)) if cfg.remat else DecoderLayer
        position_bias = None
        for i in range(cfg.num_decoder_layers):
            x, position_bias = layer_cls(cfg, i == 0, name=f"layers_{i}")(
                x, encoded, cross_mask_bias, self_mask_bias, position_bias, deterministic)
        x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="decoder_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class T5(nn.Module):
    """T5 encoder-decoder. Logits are float32 whatever the compute dtype."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = logical_param(self, "lm_head", normal_init(cfg.d_model ** -0.5),
                                         (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def encode(self, input_ids: Array, image_features: Array | None = None, deterministic: bool = True) -> Array:
        """[batch, length] ids (+ optional [batch, image_dim] features) -> [batch, prefix + length, embed]."""
        if image_features is not None and self.config.num_image_tokens == 0:
            raise ValueError("image_features given but T5Config.num_image_tokens is 0")
        prefix = self.config.num_image_tokens if image_features is not None else 0
        mask = encoder_input_mask(input_ids, prefix)
        return self.encoder(self.token_embedder(input_ids), mask, image_features, deterministic)

    def decode(self, encoded: Array, encoder_input_mask: Array, decoder_input_ids: Array,
               deterministic: bool = True) -> Array:
        """Teacher-forced decoder logits [batch, target_length, vocab] (float32) for right-shifted targets."""
        x = self.decoder(self.token_embedder(decoder_input_ids), encoded, encoder_input_mask, deterministic)
        return self._logits(x)

    def __call__(self, input_ids: Array, decoder_input_ids: Array, image_features: Array | None = None,
                 deterministic: bool = True) -> Array:
        """Teacher-forced logits [batch, target_length, vocab] (float32)."""
        encoded = self.encode(input_ids, image_features, deterministic)
        prefix = self.config.num_image_tokens if image_features is not None else 0
        return self.decode(encoded, encoder_input_mask(input_ids, prefix), decoder_input_ids,
                           deterministic=deterministic)

    def _logits(self, x: Array) -> Array:
        x = scale_head_input(x, self.config)
        if self.config.tie_word_embeddings:
            return self.token_embedder.attend(x)
        return output_logits(x, self.lm_head.T)


def scale_head_input(x: Array, config: T5Config) -> Array:
    """The final-norm hidden state as the output head sees it (T5 v1.0 ties and scales by d_model^-1/2)."""
    return x * (config.d_model ** -0.5) if config.scale_logits else x


def init_params(config: T5Config, rng: Array, batch: int = 1, input_length: int = 8,
                target_length: int = 4) -> dict:
    """Fresh float32 parameters (unboxed: plain arrays) for `config`."""
    return nn.unbox(_init_variables(config, rng, batch, input_length, target_length))["params"]


def _init_variables(config: T5Config, rng: Array, batch: int, input_length: int, target_length: int) -> dict:
    input_ids = jnp.ones((batch, input_length), jnp.int32)
    decoder_input_ids = jnp.ones((batch, target_length), jnp.int32)
    image = (jnp.zeros((batch, config.image_feature_dim), jnp.float32) if config.num_image_tokens else None)
    return T5(config).init(rng, input_ids, decoder_input_ids, image)


def param_logical_axes(config: T5Config) -> dict:
    """The logical axis names of every parameter (a pytree of PartitionSpecs of logical names)."""
    abstract = jax.eval_shape(lambda: _init_variables(config, jax.random.key(0), 1, 8, 4))
    return nn.get_partition_spec(abstract)["params"]

