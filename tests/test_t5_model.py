"""T5 configs, dtype, dropout, remat, image prefix, incremental decoding and orbax checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from t5_steps import decoder_stepper

from avg_jax.config import GIN_CONFIG_DIR, parse_gin
from avg_jax.t5.checkpoint import restore_t5_checkpoint, save_t5_checkpoint
from avg_jax.t5.configs import T5Config, named_t5_config
from avg_jax.t5.layers import mixed_einsum
from avg_jax.t5.model import T5, encoder_input_mask, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _ids(seed=0, batch=2, length=10, vocab=256):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (batch, length))
    ids[0, length // 2:] = 0
    return jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("size", ["small", "base", "xl"])
def test_named_configs_match_hf_parameter_counts(size, version):
    """Parameter count of each published size equals HF's (built on the meta device, no memory)."""
    config = named_t5_config(size, version)
    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
        num_layers=config.num_encoder_layers, num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads, feed_forward_proj=config.feed_forward)
    with torch.device("meta"):
        hf_model = transformers.T5ForConditionalGeneration(hf_config)
    expected = sum(p.numel() for p in hf_model.parameters())
    if not config.tie_word_embeddings:  # transformers 5 ties lm_head unless the checkpoint holds its own
        expected += config.vocab_size * config.d_model
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract)) == expected


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large", "xl"])
def test_gin_files_bind_the_named_configs(size):
    parse_gin([str(GIN_CONFIG_DIR / "models" / f"t5_{size}.gin")])
    assert T5Config() == named_t5_config(size, "1.0")
    parse_gin([str(GIN_CONFIG_DIR / "models" / f"t5_1_1_{size}.gin")])
    assert T5Config() == named_t5_config(size, "1.1")
    parse_gin([])


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="feed_forward"):
        T5Config(feed_forward="swiglu")
    with pytest.raises(ValueError, match="image_feature_dim"):
        T5Config(num_image_tokens=2)
    with pytest.raises(ValueError, match="unknown T5Config fields"):
        T5Config.from_dict({"d_model": 8, "nope": 1})
    with pytest.raises(ValueError, match="size"):
        named_t5_config("huge")


def test_bfloat16_compute_tracks_float32():
    config = named_t5_config("tiny", "1.1")
    params = init_params(config, jax.random.key(0))
    ids, dec = _ids(), _ids(1, length=6)
    ref = jax.jit(T5(config).apply)({"params": params}, ids, dec)
    low = jax.jit(T5(config.replace(dtype="bfloat16")).apply)({"params": params}, ids, dec)
    assert low.dtype == jnp.float32
    rel = np.linalg.norm(np.asarray(low - ref)) / np.linalg.norm(np.asarray(ref))
    assert rel < 0.05
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32


def test_dropout_is_active_only_when_not_deterministic():
    config = named_t5_config("tiny", "1.0", dropout_rate=0.3)
    params = init_params(config, jax.random.key(0))
    ids, dec = _ids(), _ids(1, length=6)
    apply = jax.jit(T5(config).apply, static_argnames="deterministic")
    a = apply({"params": params}, ids, dec, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = apply({"params": params}, ids, dec, deterministic=False, rngs={"dropout": jax.random.key(2)})
    c = apply({"params": params}, ids, dec)
    d = apply({"params": params}, ids, dec)
    assert not np.allclose(a, b) and not np.allclose(a, c)
    np.testing.assert_array_equal(c, d)


def test_remat_gives_the_same_loss_and_grads():
    config = named_t5_config("tiny", "1.1")
    params = init_params(config, jax.random.key(0))
    ids, dec = _ids(), _ids(1, length=6)

    def loss(cfg):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(T5(cfg).apply({"params": p}, ids, dec) ** 2)))(params)

    (l0, g0), (l1, g1) = loss(config), loss(config.replace(remat=True))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_image_prefix_soft_tokens():
    config = named_t5_config("tiny", "1.0", num_image_tokens=3, image_feature_dim=12)
    params = init_params(config, jax.random.key(0))
    assert params["encoder"]["image_projection_kernel"].shape == (12, 3, config.d_model)
    model = T5(config)
    apply = jax.jit(model.apply, static_argnames="method")
    features = jax.random.normal(jax.random.key(1), (2, 12))
    ids = jnp.zeros((2, 4), jnp.int32)  # text fully padded: the image alone conditions the decoder
    encoded = apply({"params": params}, ids, features, method=T5.encode)
    assert encoded.shape == (2, 3 + 4, config.d_model)
    mask = encoder_input_mask(ids, config.num_image_tokens)
    assert mask.shape == (2, 7) and bool(mask[:, :3].all()) and not bool(mask[:, 3:].any())
    dec = _ids(1, length=5)
    logits = apply({"params": params}, ids, dec, features)
    np.testing.assert_allclose(logits, apply({"params": params}, encoded, mask, dec, method=T5.decode), atol=1e-5)
    other = apply({"params": params}, ids, dec, features[::-1])
    assert not np.allclose(logits[0], other[0])
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, ids, dec, features) ** 2)))(params)
    assert float(jnp.abs(grads["encoder"]["image_projection_kernel"]).sum()) > 0
    with pytest.raises(ValueError, match="image_features"):
        T5(named_t5_config("tiny")).apply({"params": init_params(named_t5_config("tiny"), jax.random.key(0))},
                                          ids, features, method=T5.encode)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_decoder_step_matches_teacher_forcing(version):
    """avg_jax.t5.decoding one token at a time == teacher-forced T5.__call__ (float32): the first step on
    `batch` rows, then its cache tiled to batch * beam rows with the encoder keys/values broadcast over beams."""
    config = named_t5_config("tiny", version)
    params = init_params(config, jax.random.key(1))
    batch, beams, steps = 3, 2, 7
    ids = _ids(batch=batch)
    targets = np.random.default_rng(2).integers(2, config.vocab_size, (batch * beams, steps))
    targets[:, 0] = 0  # decoder start token, shared by the beams of a query
    expected = np.asarray(T5(config).apply({"params": params}, jnp.repeat(ids, beams, axis=0), targets))
    cache, step = decoder_stepper(params, config, ids, batch, steps)
    logits, cache = step(cache, targets[::beams, 0], 0)
    np.testing.assert_allclose(logits, expected[::beams, 0], atol=1e-5, rtol=1e-5)
    cache = jax.tree_util.tree_map(lambda c: jnp.repeat(c, beams, axis=0), cache)
    for t in range(1, steps):
        logits, cache = step(cache, targets[:, t], t)
        np.testing.assert_allclose(logits, expected[:, t], atol=1e-5, rtol=1e-5, err_msg=f"step {t}")


def test_orbax_checkpoint_round_trip(tmp_path):
    config = named_t5_config("tiny", "1.1")
    params = init_params(config, jax.random.key(3))
    save_t5_checkpoint(tmp_path / "ckpt", params, config)
    with pytest.raises(FileExistsError):
        save_t5_checkpoint(tmp_path / "ckpt", params, config)
    restored, restored_config = restore_t5_checkpoint(tmp_path / "ckpt")
    assert restored_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)
    with pytest.raises(FileNotFoundError, match="t5_config"):
        restore_t5_checkpoint(tmp_path / "missing")


def test_mixed_einsum_accumulates_in_float32():
    """bf16 operands: the product is accumulated in float32 (numpy float64 reference on the bf16 values), then
    rounded once to bf16; out_dtype float32 keeps the unrounded sum."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 4, 512)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(512, 8)), jnp.float32)  # cast to x's dtype inside
    ref = np.einsum("bld,df->blf", np.asarray(x, np.float64), np.asarray(w.astype(jnp.bfloat16), np.float64))
    out32 = mixed_einsum("bld,df->blf", x, w, jnp.float32)
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out32), ref, rtol=1e-5, atol=1e-4)
    out16 = mixed_einsum("bld,df->blf", x, w)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out16), np.asarray(jnp.asarray(ref, jnp.float32).astype(jnp.bfloat16)))
