"""T5 hyper-parameters: one gin-configurable dataclass plus the published sizes of T5 v1.0 and v1.1."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import gin
import jax.numpy as jnp

FEED_FORWARD_KINDS = ("relu", "gated-gelu")
DTYPES = ("float32", "bfloat16", "float16")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder-decoder (field names follow the HF config where one exists)."""

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 8
    d_kv: int = 64  # per-head dimension; heads * d_kv need not equal d_model (t5-3b/11b)
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward: str = "relu"  # "relu" (T5 v1.0) or "gated-gelu" (T5 v1.1, tanh-approximate GELU)
    tie_word_embeddings: bool = True  # lm head = input embedding (v1.0); False: own `logits_dense` (v1.1)
    scale_logits: bool = True  # multiply the decoder output by d_model**-0.5 before the head (v1.0)
    dtype: str = "float32"  # activation/compute dtype; parameters are always kept in float32
    num_image_tokens: int = 0  # k soft tokens prepended to the encoder from a projected image feature
    image_feature_dim: int = 0  # input dimension of that projection (required when num_image_tokens > 0)
    remat: bool = False  # rematerialise each layer in the backward pass (memory for compute)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_encoder_layers",
                     "num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"T5Config.relative_attention_num_buckets must be >= 4, got "
                             f"{self.relative_attention_num_buckets}")
        if self.feed_forward not in FEED_FORWARD_KINDS:
            raise ValueError(f"T5Config.feed_forward must be one of {FEED_FORWARD_KINDS}, got {self.feed_forward!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"T5Config.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.num_image_tokens < 0:
            raise ValueError(f"T5Config.num_image_tokens must be >= 0, got {self.num_image_tokens}")
        if self.num_image_tokens > 0 and self.image_feature_dim <= 0:
            raise ValueError("T5Config.image_feature_dim must be > 0 when num_image_tokens > 0, got "
                             f"{self.image_feature_dim}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def gated(self) -> bool:
        return self.feed_forward == "gated-gelu"

    def replace(self, **changes: Any) -> T5Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "T5Config") -> T5Config:
        """Build from a dict (e.g. a checkpoint's JSON), rejecting unknown fields by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown T5Config fields {unknown}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Published sizes (HF `google-t5/t5-*` and `google/t5-v1_1-*`); vocabulary 32128 everywhere.
_V1_0 = dict(feed_forward="relu", tie_word_embeddings=True, scale_logits=True)
_V1_1 = dict(feed_forward="gated-gelu", tie_word_embeddings=False, scale_logits=False)
_SIZES = {
    "1.0": {
        "small": dict(d_model=512, num_heads=8, d_kv=64, d_ff=2048, num_encoder_layers=6, num_decoder_layers=6),
        "base": dict(d_model=768, num_heads=12, d_kv=64, d_ff=3072, num_encoder_layers=12, num_decoder_layers=12),
        "large": dict(d_model=1024, num_heads=16, d_kv=64, d_ff=4096, num_encoder_layers=24,
                      num_decoder_layers=24),
        "xl": dict(d_model=1024, num_heads=32, d_kv=128, d_ff=16384, num_encoder_layers=24,
                   num_decoder_layers=24),  # t5-3b
        "xxl": dict(d_model=1024, num_heads=128, d_kv=128, d_ff=65536, num_encoder_layers=24,
                    num_decoder_layers=24),  # t5-11b
    },
    "1.1": {
        "small": dict(d_model=512, num_heads=6, d_kv=64, d_ff=1024, num_encoder_layers=8, num_decoder_layers=8),
        "base": dict(d_model=768, num_heads=12, d_kv=64, d_ff=2048, num_encoder_layers=12, num_decoder_layers=12),
        "large": dict(d_model=1024, num_heads=16, d_kv=64, d_ff=2816, num_encoder_layers=24,
                      num_decoder_layers=24),
        "xl": dict(d_model=2048, num_heads=32, d_kv=64, d_ff=5120, num_encoder_layers=24, num_decoder_layers=24),
        "xxl": dict(d_model=4096, num_heads=64, d_kv=64, d_ff=10240, num_encoder_layers=24,
                    num_decoder_layers=24),
    },
}
# Test size: same code paths (two layers so position-bias sharing is exercised), seconds to compile.
_TINY = dict(vocab_size=256, d_model=64, num_heads=4, d_kv=16, d_ff=128, num_encoder_layers=2,
             num_decoder_layers=2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
             dropout_rate=0.0)
SIZES = ("tiny", "small", "base", "large", "xl", "xxl")
VERSIONS = ("1.0", "1.1")


def named_t5_config(size: str, version: str = "1.0", **overrides: Any) -> T5Config:
    """The config of a published T5 size ('tiny' is ours, for tests); `overrides` replace fields."""
    if version not in VERSIONS:
        raise ValueError(f"unknown T5 version {version!r}; expected one of {VERSIONS}")
    if size not in SIZES:
        raise ValueError(f"unknown T5 size {size!r}; expected one of {SIZES}")
    flavour = _V1_0 if version == "1.0" else _V1_1
    dims = _TINY if size == "tiny" else _SIZES[version][size]
    return T5Config(**{**flavour, **dims, **overrides})
