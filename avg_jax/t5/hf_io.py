"""Import/export HuggingFace T5 checkpoint directories (`config.json` + `model.safetensors`), no torch needed.

HF stores linear weights as [out, in]; ours are [in, out] with attention heads split out. Tied weights
are saved by `save_pretrained` only as `shared.weight`. transformers 5.x decouples two things older
configs bundled under `tie_word_embeddings`: whether `lm_head` shares the embedding (we read it from
the presence of `lm_head.weight`) and whether the decoder output is scaled by d_model**-0.5 before the
head (`scale_decoder_outputs`, else `tie_word_embeddings`, default True).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.flax import load_file as load_flax_file
from safetensors.numpy import load_file, save_file

from avg_jax.json_io import read_json
from avg_jax.t5.configs import T5Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Present in some HF checkpoints, never used by the model (cross-attention has no position bias).
_IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_FEED_FORWARD = {"relu": "relu", "gated-gelu": "gated-gelu"}
_ACTIVATION = {"relu": "relu", "gated-gelu": "gelu_new"}

# (HF name, our path, HF array -> ours, ours -> HF array)
Entry = tuple[str, tuple[str, ...], Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _entries(config: T5Config) -> Iterator[Entry]:
    """Every tensor of a T5ForConditionalGeneration checkpoint and where it lives in our params."""
    h, dk, d = config.num_heads, config.d_kv, config.d_model

    def qkv_in(w):  # [heads*kv, embed] -> [embed, heads, kv]
        return np.ascontiguousarray(w.T.reshape(d, h, dk))

    def qkv_out(w):
        return np.ascontiguousarray(w.reshape(d, h * dk).T)

    def o_in(w):  # [embed, heads*kv] -> [heads, kv, embed]
        return np.ascontiguousarray(w.T.reshape(h, dk, d))

    def o_out(w):
        return np.ascontiguousarray(w.reshape(h * dk, d).T)

    def attention(hf: str, ours: tuple[str, ...], relative: bool) -> Iterator[Entry]:
        for name, fn_in, fn_out in (("q", qkv_in, qkv_out), ("k", qkv_in, qkv_out), ("v", qkv_in, qkv_out),
                                    ("o", o_in, o_out)):
            target = {"q": "query", "k": "key", "v": "value", "o": "out"}[name]
            yield f"{hf}.{name}.weight", (*ours, target), fn_in, fn_out
        if relative:
            yield (f"{hf}.relative_attention_bias.weight", (*ours, "relpos_bias", "rel_embedding"), _transpose,
                   _transpose)

    def mlp(hf: str, ours: tuple[str, ...]) -> Iterator[Entry]:
        for name in (("wi_0", "wi_1") if config.gated else ("wi",)) + ("wo",):
            yield f"{hf}.DenseReluDense.{name}.weight", (*ours, "mlp", name), _transpose, _transpose

    def norm(hf: str, ours: tuple[str, ...]) -> Entry:
        return hf, (*ours, "scale"), _identity, _identity

    yield "shared.weight", ("token_embedder", "embedding"), _identity, _identity
    if not config.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head",), _transpose, _transpose
    for i in range(config.num_encoder_layers):
        hf, ours = f"encoder.block.{i}", ("encoder", f"layers_{i}")
        yield from attention(f"{hf}.layer.0.SelfAttention", (*ours, "attention"), i == 0)
        yield norm(f"{hf}.layer.0.layer_norm.weight", (*ours, "pre_attention_layer_norm"))
        yield from mlp(f"{hf}.layer.1", ours)
        yield norm(f"{hf}.layer.1.layer_norm.weight", (*ours, "pre_mlp_layer_norm"))
    yield norm("encoder.final_layer_norm.weight", ("encoder", "encoder_norm"))
    for i in range(config.num_decoder_layers):
        hf, ours = f"decoder.block.{i}", ("decoder", f"layers_{i}")
        yield from attention(f"{hf}.layer.0.SelfAttention", (*ours, "self_attention"), i == 0)
        yield norm(f"{hf}.layer.0.layer_norm.weight", (*ours, "pre_self_attention_layer_norm"))
        yield from attention(f"{hf}.layer.1.EncDecAttention", (*ours, "encoder_decoder_attention"), False)
        yield norm(f"{hf}.layer.1.layer_norm.weight", (*ours, "pre_cross_attention_layer_norm"))
        yield from mlp(f"{hf}.layer.2", ours)
        yield norm(f"{hf}.layer.2.layer_norm.weight", (*ours, "pre_mlp_layer_norm"))
    yield norm("decoder.final_layer_norm.weight", ("decoder", "decoder_norm"))


def config_from_hf(hf: dict[str, Any], vocab_rows: int, has_lm_head: bool, source: str = CONFIG_FILE,
                   **overrides: Any) -> T5Config:
    """Our config from an HF T5 config dict (+ facts read from the weights file)."""
    if hf.get("model_type", "t5") != "t5":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 't5'")
    feed_forward = hf.get("feed_forward_proj", "relu")
    if feed_forward not in _FEED_FORWARD:
        raise ValueError(f"{source}: feed_forward_proj {feed_forward!r} unsupported; expected one of "
                         f"{sorted(_FEED_FORWARD)}")
    if hf.get("vocab_size", vocab_rows) != vocab_rows:
        raise ValueError(f"{source}: vocab_size {hf['vocab_size']} but shared.weight has {vocab_rows} rows")
    num_layers = hf.get("num_layers", 6)
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    values = dict(
        vocab_size=vocab_rows, d_model=hf.get("d_model", 512), num_heads=hf.get("num_heads", 8),
        d_kv=hf.get("d_kv", 64), d_ff=hf.get("d_ff", 2048), num_encoder_layers=num_layers,
        num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout_rate=float(hf.get("dropout_rate", 0.1)), layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        feed_forward=_FEED_FORWARD[feed_forward], tie_word_embeddings=not has_lm_head, scale_logits=bool(scale),
    )
    return T5Config(**{**values, **overrides})


def config_to_hf(config: T5Config) -> dict[str, Any]:
    """The HF `config.json` dict for `config` (written so transformers 5.x and older versions agree)."""
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": config.vocab_size,
        "d_model": config.d_model, "d_kv": config.d_kv, "d_ff": config.d_ff, "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers, "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
        "feed_forward_proj": config.feed_forward, "dense_act_fn": _ACTIVATION[config.feed_forward],
        "is_gated_act": config.gated, "initializer_factor": 1.0, "is_encoder_decoder": True, "use_cache": True,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "tie_word_embeddings": config.scale_logits, "scale_decoder_outputs": config.scale_logits,
    }


def load_hf_t5(path: str | Path, **config_overrides: Any) -> tuple[dict, T5Config]:
    """Read an HF T5 directory into (float32 params, T5Config); `config_overrides` e.g. dtype, dropout_rate."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.exists():
            raise FileNotFoundError(f"HF T5 checkpoint file not found: {p}")
    hf_config = read_json(config_path, "HF T5 checkpoint file")
    tensors = _read_safetensors(weights_path)
    if "shared.weight" not in tensors:
        raise ValueError(f"{weights_path}: no 'shared.weight' tensor (not a T5 checkpoint?)")
    shared = tensors["shared.weight"]
    for name in _EMBED_COPIES:
        if name in tensors and not np.array_equal(tensors.pop(name), shared):
            raise ValueError(f"{weights_path}: {name} differs from shared.weight (untied input embeddings)")
    has_lm_head = "lm_head.weight" in tensors
    if has_lm_head and np.array_equal(tensors["lm_head.weight"], shared):
        del tensors["lm_head.weight"]  # an explicit copy of a tied head
        has_lm_head = False
    config = config_from_hf(hf_config, shared.shape[0], has_lm_head, str(config_path), **config_overrides)
    params: dict = {}
    used = set()
    for hf_name, ours, to_ours, to_hf in _entries(config):
        if hf_name not in tensors:
            raise ValueError(f"{weights_path}: missing tensor {hf_name!r}")
        value = to_ours(np.asarray(tensors[hf_name], np.float32))
        if to_hf(value).shape != tensors[hf_name].shape:
            raise ValueError(f"{weights_path}: {hf_name} has shape {tensors[hf_name].shape}, "
                             f"config {config_path} implies {to_hf(value).shape}")
        _set(params, ours, value)
        used.add(hf_name)
    unexpected = sorted(set(tensors) - used - set(_IGNORED_KEYS))
    if unexpected:
        raise ValueError(f"{weights_path}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return params, config


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors as numpy; bfloat16 files (numpy has no bf16) are read through safetensors' flax loader."""
    try:
        return load_file(str(path))
    except TypeError as e:
        if "bfloat16" not in str(e):
            raise ValueError(f"{path}: cannot read safetensors ({e})") from e
    except Exception as e:  # safetensors raises its own error types for corrupt/unsupported files
        raise ValueError(f"{path}: cannot read safetensors ({e})") from e
    return {k: np.asarray(v, np.float32) for k, v in load_flax_file(str(path)).items()}


def save_hf_t5(params: dict, config: T5Config, path: str | Path) -> Path:
    """Write params as an HF T5 directory that `T5ForConditionalGeneration.from_pretrained` loads."""
    if config.num_image_tokens:
        raise ValueError("save_hf_t5: the image-prefix projection has no HF T5 equivalent "
                         f"(num_image_tokens={config.num_image_tokens})")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(params)
    tensors = {}
    for hf_name, ours, _, to_hf in _entries(config):
        tensors[hf_name] = np.ascontiguousarray(to_hf(np.asarray(_get(params, ours), np.float32)))
    if config.tie_word_embeddings and not config.scale_logits:
        # an unscaled tied head is spelled tie_word_embeddings=False + an explicit copy of the embedding
        tensors["lm_head.weight"] = tensors["shared.weight"].copy()
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config_to_hf(config), indent=2, sort_keys=True))
    return path


def _set(tree: dict, keys: tuple[str, ...], value: np.ndarray) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k not in tree:
            raise ValueError(f"params have no {'/'.join(keys)}")
        tree = tree[k]
    return tree
