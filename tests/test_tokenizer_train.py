"""Tokenizer training: k-means init, dead-code re-seeding, sharded == single device, checkpoint round trip."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hlo_collectives import racing_collectives
from jax.sharding import NamedSharding, PartitionSpec

from avg_jax import partitioning
from avg_jax.data.synthetic import make_synthetic_corpus
from avg_jax.tokenizer import train as tok_train
from avg_jax.tokenizer.losses import TokenizerLossWeights
from avg_jax.tokenizer.model import RQTokenizerConfig
from avg_jax.tokenizer.quantizer import RQCodes
from avg_jax.tokenizer.train import (
    ContrastiveTask,
    RQTask,
    TokenizerData,
    TrainingPreempted,
    _reseed_dead_codes,
    encode_images,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from avg_jax.training import trainer

SMALL = RQTokenizerConfig(code_dim=16, codebook_size=32, num_levels=2, decoder_hidden_dim=32)


@pytest.fixture(scope="module")
def data(tiny_corpus):
    return TokenizerData.from_corpus(tiny_corpus, "train")


def test_data_from_corpus_uses_only_train_captions(tiny_corpus, data):
    train_ids = {im.id for im in tiny_corpus.images if im.split == "train"}
    assert data.num_images == len(train_ids)
    for j in data.caption_rows[data.caption_rows >= 0]:
        q = tiny_corpus.queries[j]
        assert q.split == "train" and set(q.image_ids) <= train_ids
    b = data.batch(np.arange(4))
    assert b["text"].shape == (4, data.caption_rows.shape[1], 48) and b["text_mask"].shape == (4, 5)


def test_pseudo_pairs_train_the_codebook_on_every_image_and_leave_the_dense_heads_alone(tiny_corpus, data):
    """Pseudo-paired val/test images join the RQ stage (the codebook then quantizes them better) but not the
    heads' contrastive warm-up: the dense baseline's heads are bit-identical with and without them."""
    pseudo = TokenizerData.from_corpus(tiny_corpus, "train", ("val", "test"), 2)
    evaluation = np.concatenate([tiny_corpus.image_rows("val"), tiny_corpus.image_rows("test")])
    assert pseudo.pseudo.tolist() == [False] * data.num_images + [True] * evaluation.size and data.pseudo is None
    kwargs = dict(steps=30, batch_size=60, contrastive_steps=10, reseed_every=0, finetune_image_head=False,
                  num_devices=1, log_every=30)
    heads_only = [train_tokenizer(d, SMALL, **{**kwargs, "steps": 0}) for d in (data, pseudo)]
    for head in ("image_head", "text_head"):
        for a, b in zip(jax.tree.leaves(heads_only[0].params[head]), jax.tree.leaves(heads_only[1].params[head]),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    errors = [float(encode_images(train_tokenizer(d, SMALL, **kwargs),
                                  tiny_corpus.image_features[evaluation]).quantization_error.mean())
              for d in (data, pseudo)]
    assert errors[1] < errors[0], errors


def test_kmeans_init_beats_random_init(tiny_corpus, data):
    errors = {}
    for init in ("kmeans", "random"):
        tok = train_tokenizer(data, SMALL, steps=60, batch_size=60, contrastive_steps=30, codebook_init=init,
                              reseed_every=0, finetune_image_head=False, num_devices=1, log_every=60)
        enc = encode_images(tok, data.image_features)
        errors[init] = float(enc.quantization_error.mean())
        errors[init + "_recon"] = tok.history[-1]["recon"]
    assert errors["kmeans"] < 0.8 * errors["random"], errors
    assert errors["kmeans_recon"] < errors["random_recon"], errors


def test_reseed_replaces_dead_codes_with_worst_served_residuals():
    rng = np.random.default_rng(0)
    b, m, d, n = 6, 2, 3, 5
    residuals = rng.standard_normal((b, m, d)).astype(np.float32)
    errors = rng.random((b, m)).astype(np.float32)
    books = rng.standard_normal((m, n, d)).astype(np.float32)  # per-level codebooks
    counts = np.array([[3, 0, 5, 0, 1], [0, 2, 2, 2, 2]], np.float32)
    rq = RQCodes(codes=jnp.zeros((b, m), jnp.int32), residuals=jnp.asarray(residuals),
                 partial_sums=jnp.zeros((b, m, d)), errors=jnp.asarray(errors))
    kept, none = _reseed_dead_codes(jnp.asarray(books), jnp.asarray(counts), rq, threshold=1.0,
                                    due=jnp.asarray(False))
    assert int(none) == 0
    np.testing.assert_array_equal(np.asarray(kept), books)
    new, num_dead = _reseed_dead_codes(jnp.asarray(books), jnp.asarray(counts), rq, threshold=1.0,
                                       due=jnp.asarray(True))
    new = np.asarray(new)
    assert int(num_dead) == 3
    for level in range(m):
        worst = np.argsort(-errors[:, level], kind="stable")  # samples, worst served first
        dead = np.flatnonzero(counts[level] < 1)
        for rank, code in enumerate(dead):
            np.testing.assert_allclose(new[level, code], residuals[worst[rank], level])
        alive = np.flatnonzero(counts[level] >= 1)
        np.testing.assert_array_equal(new[level, alive], books[level, alive])


def test_dead_codes_get_used_after_reseeding(data):
    # A random codebook far too large for the data: most vokens start dead.
    cfg = dataclasses.replace(SMALL, codebook_size=128)
    tok = train_tokenizer(data, cfg, steps=40, batch_size=60, contrastive_steps=0, codebook_init="random",
                          reseed_every=10, num_devices=1, log_every=10)
    assert sum(h.get("reseeded", 0) for h in tok.history) > 0
    enc = encode_images(tok, data.image_features)
    tok0 = train_tokenizer(data, cfg, steps=40, batch_size=60, contrastive_steps=0, codebook_init="random",
                           reseed_every=0, num_devices=1, log_every=40)
    enc0 = encode_images(tok0, data.image_features)
    assert np.unique(enc.codes[:, 0]).size > np.unique(enc0.codes[:, 0]).size


@pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_sharded_training_equals_single_device(data):
    kwargs = dict(steps=12, batch_size=64, contrastive_steps=6, reseed_every=5, log_every=1, seed=3)
    one = train_tokenizer(data, SMALL, num_devices=1, **kwargs)
    eight = train_tokenizer(data, SMALL, num_devices=8, **kwargs)
    assert len(one.history) == len(eight.history) == 18
    for a, b in zip(one.history, eight.history, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=2e-4, abs=1e-5), (a["step"], k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-4), one.params, eight.params)


def test_checkpoint_round_trip(tmp_path, data):
    tok = train_tokenizer(data, SMALL, steps=5, batch_size=60, contrastive_steps=5, num_devices=1)
    back = load_tokenizer(save_tokenizer(tok, tmp_path / "tok"))
    assert back.config == tok.config and back.loss_weights == tok.loss_weights
    jax.tree.map(np.testing.assert_array_equal, back.params, tok.params)
    np.testing.assert_array_equal(np.load(tmp_path / "tok" / "codebook.npy"), tok.params["codebooks"])
    a, b = encode_images(tok, data.image_features), encode_images(back, data.image_features, chunk=64)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_bad_settings_are_named(data):
    with pytest.raises(ValueError, match="codebook_init"):
        train_tokenizer(data, SMALL, steps=1, codebook_init="zeros", num_devices=1)
    with pytest.raises(ValueError, match="batch_size 100000"):
        train_tokenizer(data, SMALL, steps=1, batch_size=100000, num_devices=1)


RESUME = dict(steps=12, batch_size=60, contrastive_steps=6, reseed_every=4, num_devices=1, log_every=1, seed=5,
              checkpoint_every=100)


def test_killed_run_resumes_to_the_uninterrupted_codebook(tmp_path, data, monkeypatch):
    full = train_tokenizer(data, SMALL, run_dir=tmp_path / "full", **RESUME)
    # Simulated SIGTERM: once at warm-up step 3, once at RQ step 7 (one preemption per rerun).
    for at in (3, 7):
        monkeypatch.setattr(trainer.PreemptionWatcher, "reached", lambda self, step, at=at: step == at)
        with pytest.raises(TrainingPreempted) as stopped:
            train_tokenizer(data, SMALL, run_dir=tmp_path / "resumed", **RESUME)
        assert stopped.value.code == trainer.PREEMPTED_EXIT_CODE
        at_rq = (tmp_path / "resumed" / "rq").exists()
        assert at_rq == (at == 7)
    monkeypatch.undo()
    resumed = train_tokenizer(data, SMALL, run_dir=tmp_path / "resumed", **RESUME)
    np.testing.assert_array_equal(resumed.params["codebooks"], full.params["codebooks"])
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]


def test_rerun_over_a_finished_run_does_not_retrain(tmp_path, data, monkeypatch):
    first = train_tokenizer(data, SMALL, run_dir=tmp_path, **RESUME)

    def fail(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(tok_train.RQTask, "loss", fail)
    monkeypatch.setattr(tok_train.ContrastiveTask, "loss", fail)
    monkeypatch.setattr(tok_train, "kmeans_init_codebooks", fail)
    again = train_tokenizer(data, SMALL, run_dir=tmp_path, **RESUME)
    jax.tree.map(np.testing.assert_array_equal, again.params, first.params)
    assert again.history == first.history


def test_reseeding_never_fires_on_the_last_step(data):
    cfg = dataclasses.replace(SMALL, codebook_size=128)  # random init: most vokens dead
    tok = train_tokenizer(data, cfg, steps=20, batch_size=60, contrastive_steps=0, codebook_init="random",
                          reseed_every=10, num_devices=1, log_every=1)
    reseeded = {int(h["step"]): h["reseeded"] for h in tok.history}
    assert reseeded[10] > 0 and reseeded[20] == 0


@pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_data_parallel_steps_on_eight_host_devices_do_not_deadlock():
    """Back-to-back data-parallel steps on 8 CPU devices: before steps were serialized on CPU, the next step's
    launch could hold the worker the previous step's last all-reduce participant needed (fatal rendezvous
    timeout on a 2-core host)."""
    corpus = make_synthetic_corpus(seed=1, num_images=2200, num_val=50, num_test=50, image_dim=256, text_dim=64)
    big = TokenizerData.from_corpus(corpus, "train")
    cfg = RQTokenizerConfig(code_dim=256, codebook_size=256, num_levels=4, decoder_hidden_dim=512)
    tok = train_tokenizer(big, cfg, steps=40, batch_size=2048, contrastive_steps=10, kmeans_iters=2,
                          kmeans_init_batches=1, reseed_every=20, num_devices=8, log_every=40)
    assert np.isfinite(tok.history[-1]["total"]) and tok.history[-1]["step"] == 40


@pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_race_check_flags_a_conditional_collective_beside_an_independent_one():
    """The check below must see the pattern that deadlocked: a cond holding a collective next to an
    independent collective; data-ordering the two clears it."""
    mesh = partitioning.make_device_mesh(-1, 1, jax.devices()[:8])
    rows = NamedSharding(mesh, PartitionSpec("data"))
    x, y = (jax.device_put(jnp.arange(16.0) + k, rows) for k in range(2))

    def racing(x, y, p):
        return jax.lax.cond(p, lambda: jnp.sum(x), lambda: 0.0), jnp.sum(y)

    def ordered(x, y, p):
        a = jax.lax.cond(p, lambda: jnp.sum(x), lambda: 0.0)
        return a, jnp.sum(y * a)

    texts = {f.__name__: jax.jit(f).lower(x, y, True).compile().as_text() for f in (racing, ordered)}
    assert racing_collectives(texts["racing"]), texts["racing"]
    assert racing_collectives(texts["ordered"]) == []


@pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
def test_compiled_tokenizer_steps_hold_no_collective_racing_control_flow(data):
    """The warm-up and RQ steps as `train_loop` compiles them on 8 devices: no collective inside a conditional or
    loop may run beside another one (the CI run at be86d9f aborted on such a pair in the warm-up step: the
    InfoNCE diagonal's gradient was a partitioned scatter under a conditional)."""
    mesh = partitioning.make_device_mesh(-1, 1, jax.devices()[:8])
    rules = partitioning.logical_axis_rules()
    image_dim, text_dim = data.image_features.shape[1], data.text_features.shape[1]
    rq_batch = data.batch(np.arange(64))
    steps = {
        "warm-up": (ContrastiveTask(SMALL, image_dim, text_dim, 0.05),
                    {"image": rq_batch["image"], "caption": rq_batch["text"][:, 0]}),
        "rq": (RQTask(SMALL, image_dim, text_dim, TokenizerLossWeights(), num_steps=10, reseed_every=5,
                      threshold=1.0, contrastive_weight=0.5, temperature=0.05), rq_batch),
    }
    for name, (task, batch) in steps.items():
        tx = optax.adam(1e-3)
        with partitioning.sharding_context(mesh, rules):
            abstract, shardings = trainer.abstract_train_state(task, tx, mesh, rules)
            step = trainer.jit_train_step(task, tx, optax.constant_schedule(1e-3), 0, mesh, rules, shardings)
            text = step.lower(abstract, batch, None).compile().as_text()
        assert "all-reduce" in text, name  # data parallel indeed
        assert racing_collectives(text) == [], name
