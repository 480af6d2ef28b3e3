"""Parity of our Flax T5 with transformers' PyTorch T5ForConditionalGeneration (the independent reference)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from t5_steps import decoder_stepper

from avg_jax.t5.hf_io import load_hf_t5, save_hf_t5
from avg_jax.t5.layers import relative_position_bucket
from avg_jax.t5.model import T5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
VERSIONS = ("1.0", "1.1")


def _hf_model(version: str, seed: int = 0):
    """A tiny random HF T5; buckets/distance small enough that the logarithmic buckets are exercised."""
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj="relu" if version == "1.0" else "gated-gelu",
        tie_word_embeddings=version == "1.0", decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(config)
    if version == "1.1":  # a real v1.1 head is its own matrix (transformers 5 ties it unless told otherwise)
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * config.d_model ** -0.5)
    return model.eval()


@pytest.fixture(scope="module", params=VERSIONS)
def hf_pair(request, tmp_path_factory):
    """(version, HF model, our params, our config) for a model saved by save_pretrained and imported."""
    model = _hf_model(request.param)
    path = tmp_path_factory.mktemp(f"hf_t5_{request.param}")
    model.save_pretrained(path)
    params, config = load_hf_t5(path)
    return request.param, model, params, config, path


def _inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    lengths = [24, 15, 3]
    input_ids = np.zeros((3, 24), np.int64)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = rng.integers(2, 96, n)
    decoder_input_ids = rng.integers(2, 96, (3, 12))
    decoder_input_ids[:, 0] = 0  # decoder start = PAD
    return input_ids, decoder_input_ids


def _hf_logits(model, input_ids, decoder_input_ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(input_ids != 0),
                    decoder_input_ids=torch.tensor(decoder_input_ids))
    return out.logits.numpy()


def test_relative_position_buckets_match_hf():
    bucket_fn = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    rel = np.arange(-3000, 3001)
    for num_buckets, max_distance in ((32, 128), (8, 20), (16, 64), (64, 256)):
        for bidirectional in (True, False):
            ref = bucket_fn(torch.tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
                            max_distance=max_distance).numpy()
            ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
            np.testing.assert_array_equal(ours, ref)


def test_import_reads_config(hf_pair):
    version, model, params, config, _ = hf_pair
    assert config.num_encoder_layers == 2 and config.num_decoder_layers == 3
    assert config.tie_word_embeddings == (version == "1.0") and config.scale_logits == (version == "1.0")
    assert config.feed_forward == ("relu" if version == "1.0" else "gated-gelu")
    np.testing.assert_array_equal(params["token_embedder"]["embedding"], model.shared.weight.detach().numpy())


def test_encoder_outputs_match_hf(hf_pair):
    _, model, params, config, _ = hf_pair
    input_ids, _ = _inputs()
    with torch.no_grad():
        ref = model.encoder(input_ids=torch.tensor(input_ids),
                            attention_mask=torch.tensor(input_ids != 0)).last_hidden_state.numpy()
    ours = T5(config).apply({"params": params}, jnp.asarray(input_ids), method=T5.encode)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=TOL)


def test_decoder_logits_match_hf(hf_pair):
    _, model, params, config, _ = hf_pair
    input_ids, decoder_input_ids = _inputs()
    ref = _hf_logits(model, input_ids, decoder_input_ids)
    ours = T5(config).apply({"params": params}, jnp.asarray(input_ids), jnp.asarray(decoder_input_ids))
    assert ours.dtype == jnp.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=TOL)


def test_incremental_decode_matches_teacher_forcing_for_a_beam(hf_pair):
    """batch*beam rows (encoder keys/values broadcast over the beams) step through avg_jax.t5.decoding one
    token at a time; each step equals HF teacher forcing."""
    _, model, params, config, _ = hf_pair
    input_ids, _ = _inputs()
    beams = 2
    rng = np.random.default_rng(5)
    flat_inputs = np.repeat(input_ids, beams, axis=0)  # [batch*beam, L]
    targets = rng.integers(2, 96, (flat_inputs.shape[0], 10))
    targets[:, 0] = 0
    ref = _hf_logits(model, flat_inputs, targets)
    cache, step = decoder_stepper(params, config, input_ids, flat_inputs.shape[0], targets.shape[1])
    for t in range(targets.shape[1]):
        logits, cache = step(cache, targets[:, t], t)
        np.testing.assert_allclose(np.asarray(logits), ref[:, t], atol=TOL, rtol=TOL, err_msg=f"step {t}")


def test_greedy_decode_matches_hf_generate(hf_pair):
    _, model, params, config, _ = hf_pair
    input_ids, _ = _inputs()
    steps = 8
    with torch.no_grad():  # HF's own cache mis-sizes when num_decoder_layers != num_layers: generate without it
        ref = model.generate(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(input_ids != 0),
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1,
                             eos_token_id=None, use_cache=False).numpy()[:, 1:]
    cache, step = decoder_stepper(params, config, input_ids, input_ids.shape[0], steps)
    token, out = jnp.zeros((input_ids.shape[0],), jnp.int32), []
    for t in range(steps):
        logits, cache = step(cache, token, t)
        token = jnp.argmax(logits, axis=-1)
        out.append(np.asarray(token))
    np.testing.assert_array_equal(np.stack(out, axis=1), ref)


def test_export_round_trip_loads_in_transformers(hf_pair, tmp_path):
    _, model, params, config, _ = hf_pair
    save_hf_t5(params, config, tmp_path / "export")
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    input_ids, decoder_input_ids = _inputs(seed=7)
    np.testing.assert_allclose(_hf_logits(reloaded, input_ids, decoder_input_ids),
                               _hf_logits(model, input_ids, decoder_input_ids), atol=1e-6, rtol=1e-6)
    params_again, config_again = load_hf_t5(tmp_path / "export")
    assert config_again == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_again, params)


def test_import_reads_bfloat16_checkpoints(tmp_path):
    model = _hf_model("1.1").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    params, config = load_hf_t5(tmp_path)
    np.testing.assert_array_equal(params["lm_head"], model.lm_head.weight.detach().float().numpy().T)
    assert params["lm_head"].dtype == np.float32 and config.feed_forward == "gated-gelu"


def test_import_rejects_bad_checkpoints(hf_pair, tmp_path):
    _, _, _, _, path = hf_pair
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_t5(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    hf_config = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**hf_config, "feed_forward_proj": "gated-silu"}))
    with pytest.raises(ValueError, match="gated-silu"):
        load_hf_t5(bad)
    (bad / "config.json").write_text(json.dumps({**hf_config, "num_heads": 2}))
    with pytest.raises(ValueError, match="shape"):
        load_hf_t5(bad)
