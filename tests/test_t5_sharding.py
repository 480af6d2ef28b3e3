"""Sharded (data=4, model=2) forward/backward and incremental decoding of T5 equal the unsharded computation
(8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from avg_jax import partitioning
from avg_jax.decoding.beam_search import BeamSearchOptions
from avg_jax.decoding.trie import build_trie, identifier_window
from avg_jax.t5.configs import named_t5_config
from avg_jax.t5.decoding import t5_beam_search
from avg_jax.t5.model import T5, init_params, param_logical_axes

needs_8_devices = pytest.mark.skipif(jax.device_count() < 8,
                                     reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _loss_fn(model):
    def loss(params, input_ids, decoder_input_ids, targets):
        logits = model.apply({"params": params}, input_ids, decoder_input_ids)
        weights = (targets != 0).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(losses * weights) / jnp.sum(weights)
    return jax.value_and_grad(loss)


def _batch(seed=0, batch=8, vocab=256):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(2, vocab, (batch, 16))
    input_ids[::2, 11:] = 0  # padding
    targets = rng.integers(2, vocab, (batch, 6))
    targets[1::2, 4:] = 0
    decoder_input_ids = np.concatenate([np.zeros((batch, 1), np.int64), targets[:, :-1]], axis=1)
    return tuple(jnp.asarray(x, jnp.int32) for x in (input_ids, decoder_input_ids, targets))


@needs_8_devices
@pytest.mark.parametrize("version,rules_name", [("1.0", "model_parallel"), ("1.1", "fsdp")])
def test_sharded_loss_and_grads_match_unsharded(version, rules_name):
    config = named_t5_config("tiny", version)
    model = T5(config)
    params = init_params(config, jax.random.key(0))
    batch = _batch()
    loss_and_grad = _loss_fn(model)
    ref_loss, ref_grads = jax.jit(loss_and_grad)(params, *batch)

    mesh = partitioning.make_device_mesh(4, 2)
    rules = partitioning.logical_axis_rules(rules_name)
    param_shardings = partitioning.logical_shardings(param_logical_axes(config), mesh, rules)
    partitioning.check_divisible(params, param_shardings)
    data_sharding = partitioning.batch_sharding(mesh, rules, ndim=2)
    sharded_params = jax.device_put(params, param_shardings)
    sharded_batch = jax.device_put(batch, data_sharding)
    step = jax.jit(loss_and_grad, in_shardings=(param_shardings, data_sharding, data_sharding, data_sharding),
                   out_shardings=(partitioning.replicated(mesh), param_shardings))
    with partitioning.sharding_context(mesh, rules):
        hlo = step.lower(sharded_params, *sharded_batch).as_text()
        loss, grads = step(sharded_params, *sharded_batch)
    assert "sharding_constraint" in hlo or "Sharding" in hlo  # activation constraints were emitted

    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                           grads, ref_grads)
    embedding = grads["token_embedder"]["embedding"]
    expected = PartitionSpec("model", "data" if rules_name == "fsdp" else None)
    assert embedding.sharding.spec == expected
    assert embedding.addressable_shards[0].data.shape[0] == config.vocab_size // 2


@needs_8_devices
@pytest.mark.parametrize("version,rules_name", [("1.0", "model_parallel"), ("1.1", "fsdp")])
def test_sharded_beam_search_matches_unsharded(version, rules_name):
    """t5_beam_search (encoder, incremental decoder steps with their activation constraints, chunked head)
    on sharded parameters and queries gives the unsharded beams and scores."""
    config = named_t5_config("tiny", version)
    params = init_params(config, jax.random.key(1))
    input_ids = _batch(seed=2)[0]
    text_vocab, codes = 192, 3
    tokens = text_vocab + np.random.default_rng(3).integers(0, config.vocab_size - text_vocab, (40, codes))
    trie = build_trie(tokens=tokens.astype(np.int32), lengths=np.full(len(tokens), codes, np.int32))
    window = identifier_window(trie, config.vocab_size, text_vocab)
    search = jax.jit(lambda p, tables, ids: t5_beam_search(p, config, ids, tables, options=BeamSearchOptions(4),
                                                           window=window, head_chunk_size=64))
    expected = search(params, trie.tables, input_ids)

    mesh = partitioning.make_device_mesh(4, 2)
    rules = partitioning.logical_axis_rules(rules_name)
    sharded_params = jax.device_put(params, partitioning.logical_shardings(param_logical_axes(config), mesh, rules))
    sharded_ids = jax.device_put(input_ids, partitioning.batch_sharding(mesh, rules, ndim=2))
    encode = jax.jit(lambda p, ids: T5(config).apply({"params": p}, ids, method=T5.encode))
    with partitioning.sharding_context(mesh, rules):
        constraints = [f.lower(sharded_params, *args).as_text().count("sharding_constraint")
                       for f, args in ((encode, (sharded_ids,)), (search, (trie.tables, sharded_ids)))]
        result = search(sharded_params, trie.tables, sharded_ids)
    assert constraints[1] > constraints[0] + 10 * config.num_decoder_layers  # the decoder steps' own constraints
    np.testing.assert_array_equal(np.asarray(result.tokens), np.asarray(expected.tokens))
    np.testing.assert_array_equal(np.asarray(result.groups), np.asarray(expected.groups))
    np.testing.assert_allclose(np.asarray(result.scores), np.asarray(expected.scores), atol=1e-5, rtol=0)


def test_rules_and_mesh_validation():
    rules = partitioning.logical_axis_rules("model_parallel", overrides=[("embed", "model")])
    assert rules[0] == ("embed", "model")
    with pytest.raises(ValueError, match="unknown logical_axis_rules"):
        partitioning.logical_axis_rules("nope")
    with pytest.raises(ValueError, match="unknown mesh axis"):
        partitioning.logical_axis_rules("fsdp", overrides=[("batch", "replica")])
    with pytest.raises(ValueError, match="devices"):
        partitioning.make_device_mesh(jax.device_count() + 1, 1)
    mesh = partitioning.make_device_mesh(-1, 1)
    assert mesh.shape == {"data": jax.device_count(), "model": 1}


def test_param_axes_follow_t5x_names():
    axes = param_logical_axes(named_t5_config("tiny", "1.1"))
    assert axes["token_embedder"]["embedding"] == PartitionSpec("vocab", "embed")
    assert axes["lm_head"] == PartitionSpec("embed", "vocab")
    layer = axes["decoder"]["layers_0"]
    assert layer["mlp"]["wi_0"] == PartitionSpec("embed", "mlp")
    assert layer["mlp"]["wo"] == PartitionSpec("mlp", "embed")
    assert layer["self_attention"]["query"] == PartitionSpec("embed", "heads", "kv")
    assert layer["self_attention"]["out"] == PartitionSpec("heads", "kv", "embed")
    assert layer["self_attention"]["relpos_bias"]["rel_embedding"] == PartitionSpec("heads", "relpos_buckets")
    leaves = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert all(isinstance(spec, PartitionSpec) and len(spec) >= 1 for spec in leaves)
