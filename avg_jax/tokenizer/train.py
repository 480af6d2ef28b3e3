"""Training the RQ tokenizer: InfoNCE warm-up of the heads, k-means codebook init, sharded RQ training.

Data parallel on a ('data', 'model') mesh: batches are sharded over 'data', parameters and optimizer
state are replicated (the tokenizer is small). Every step is one jit-compiled function: loss, update,
code usage counts and dead-code re-seeding (under lax.cond) all stay on device.

Stages: (1) InfoNCE warm-up of both projection heads (`contrastive_steps`); (2) codebook init by k-means
on the first `kmeans_init_batches` batches of residuals; (3) eqs. 3-6. In stage 3 the text head is frozen
(it would otherwise chase v̂) and, with `finetune_image_head` (default, as the paper trains its encoders),
the image head trains through the straight-through estimator; this is what lets the alignment weight
change the codes (benchmarks/alignment_effect.py). `contrastive_weight` > 0 adds InfoNCE to stage 3.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from avg_jax.data.corpus import Corpus, queries_by_image
from avg_jax.partitioning import make_device_mesh
from avg_jax.tokenizer.kmeans import kmeans_numpy
from avg_jax.tokenizer.losses import TokenizerLossWeights, info_nce, tokenizer_losses
from avg_jax.tokenizer.model import RQTokenizer, RQTokenizerConfig, embed_images, init_params
from avg_jax.tokenizer.quantizer import RQCodes, rq_encode_codes

CONFIG_FILE = "tokenizer_config.json"
CHECKPOINT_DIR = "checkpoint"
CODEBOOK_FILE = "codebook.npy"
CODEBOOK_INITS = ("kmeans", "random")


@dataclasses.dataclass
class TokenizerData:
    """Training images with their captions: caption_rows[i] lists rows of text_features (-1 = none)."""

    image_features: np.ndarray  # [n, image_dim] float32
    text_features: np.ndarray  # [num_captions, text_dim] float32
    caption_rows: np.ndarray  # [n, K] int64, -1 padded

    @classmethod
    def from_corpus(cls, corpus: Corpus, split: str = "train") -> TokenizerData:
        """The images of `split` and the captions of the same split that point at them."""
        if corpus.text_features is None:
            raise ValueError(f"corpus {corpus.name!r} has no text_features.npy; the tokenizer needs caption "
                             "features for the warm-up and the alignment loss")
        rows = corpus.image_rows(split)
        if rows.size == 0:
            raise ValueError(f"corpus {corpus.name!r} has no {split!r} images to train the tokenizer on")
        by_image = queries_by_image(corpus, corpus.query_rows(split))
        caps = [by_image.get(corpus.images[i].id, []) for i in rows]
        width = max(1, max(len(c) for c in caps))
        caption_rows = np.full((rows.size, width), -1, np.int64)
        for i, c in enumerate(caps):
            caption_rows[i, : len(c)] = c
        return cls(corpus.image_features[rows].astype(np.float32), corpus.text_features.astype(np.float32),
                   caption_rows)

    @property
    def num_images(self) -> int:
        return int(self.image_features.shape[0])

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Host batch for images `idx`: image [b, di], text [b, K, dt] (zeros where masked), text_mask [b, K]."""
        rows = self.caption_rows[idx]
        mask = rows >= 0
        text = self.text_features[np.where(mask, rows, 0)] * mask[..., None]
        return {"image": self.image_features[idx], "text": text.astype(np.float32),
                "text_mask": mask.astype(np.float32)}


@dataclasses.dataclass
class TrainedTokenizer:
    config: RQTokenizerConfig
    params: dict
    image_dim: int
    text_dim: int
    loss_weights: TokenizerLossWeights = dataclasses.field(default_factory=TokenizerLossWeights)
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


@flax.struct.dataclass
class RQTrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    code_counts: jax.Array  # [C, N] uses of each voken since the last re-seeding


def epoch_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless reshuffled epochs of full batches (the remainder of each epoch is left for the next shuffle)."""
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training images")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start:start + batch_size]


def kmeans_init_codebooks(v_i: np.ndarray, config: RQTokenizerConfig, seed: int, num_iters: int) -> np.ndarray:
    """Codebooks [C, N, d] from k-means on residuals: level by level; shared = k-means on all levels' residuals."""
    r = v_i.astype(np.float32)
    pool, per_level = [], []
    for level in range(config.num_levels):
        cents, idx = kmeans_numpy(r, config.codebook_size, seed=seed + level, num_iters=num_iters)
        pool.append(r)
        per_level.append(cents)
        r = r - cents[idx]
    if config.shared_codebook:
        return kmeans_numpy(np.concatenate(pool), config.codebook_size, seed=seed, num_iters=num_iters)[0][None]
    return np.stack(per_level)


def _param_labels(params: dict, finetune_image_head: bool) -> dict:
    """'train' / 'freeze' per top-level module: the text head never trains in the RQ stage (it would chase v̂)."""
    frozen = {"text_head"} | (set() if finetune_image_head else {"image_head"})
    return {k: jax.tree.map(lambda _, k=k: "freeze" if k in frozen else "train", v) for k, v in params.items()}


def _reseed_dead_codes(codebooks: jax.Array, counts: jax.Array, rq: RQCodes, threshold: float,
                       ) -> tuple[jax.Array, jax.Array]:
    """Replace vokens used < threshold times since the last re-seeding by residuals of the worst-served samples.

    Candidates for codebook c are the residual inputs r_j of the levels c serves, ranked by the error
    left after step j (highest first); the k-th dead code takes the k-th candidate.
    """
    b, m, d = rq.residuals.shape
    cand = jax.lax.stop_gradient(rq.residuals).reshape(b * m, d)
    err = rq.errors.reshape(b * m)
    level = jnp.tile(jnp.arange(m), b)
    new_books, num_dead = [], jnp.zeros((), jnp.int32)
    for c in range(codebooks.shape[0]):
        serves = jnp.ones_like(level, bool) if codebooks.shape[0] == 1 else level == c
        num_cand = b * m if codebooks.shape[0] == 1 else b
        k = min(codebooks.shape[1], num_cand)
        _, top = jax.lax.top_k(jnp.where(serves, err, -jnp.inf), k)  # [k]
        dead = counts[c] < threshold  # [N]
        rank = (jnp.cumsum(dead) - 1) % k
        new_books.append(jnp.where(dead[:, None], cand[top[rank]], codebooks[c]))
        num_dead = num_dead + jnp.sum(dead).astype(jnp.int32)
    return jnp.stack(new_books), num_dead


def _rq_step(state: RQTrainState, batch: dict, *, model: RQTokenizer, tx: optax.GradientTransformation,
             weights: TokenizerLossWeights, reseed_every: int, threshold: float, contrastive_weight: float,
             temperature: float) -> tuple[RQTrainState, dict[str, jax.Array]]:
    def loss_fn(params):
        out = model.apply({"params": params}, batch["image"], batch["text"])
        losses = tokenizer_losses(out["v_i"], out["rq"].partial_sums, out["v_hat"], out["v_t"],
                                  batch["text_mask"], weights)
        if contrastive_weight > 0:  # keeps a fine-tuned image head discriminative (first caption per image)
            losses["contrastive"] = info_nce(out["v_i"], out["v_t"][:, 0], temperature, batch["text_mask"][:, 0])
            losses["total"] = losses["total"] + contrastive_weight * losses["contrastive"]
        return losses["total"], (losses, out["rq"])

    (_, (losses, rq)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    num_books, n = state.code_counts.shape
    book_of_level = jnp.zeros((rq.codes.shape[1],), jnp.int32) if num_books == 1 else jnp.arange(rq.codes.shape[1])
    flat = (book_of_level[None, :] * n + rq.codes).reshape(-1)
    counts = state.code_counts + jnp.bincount(flat, length=num_books * n).reshape(num_books, n)
    step = state.step + 1

    def reseed(args):
        books, cnt = args
        books, num_dead = _reseed_dead_codes(books, cnt, rq, threshold)
        return books, jnp.zeros_like(cnt), num_dead

    def keep(args):
        return args[0], args[1], jnp.zeros((), jnp.int32)

    due = (step % reseed_every == 0) if reseed_every > 0 else jnp.zeros((), bool)
    books, counts, num_dead = jax.lax.cond(due, reseed, keep, (params["codebooks"], counts))
    params = {**params, "codebooks": books}
    metrics = {**losses, "reseeded": num_dead.astype(jnp.float32)}
    return RQTrainState(step=step, params=params, opt_state=opt_state, code_counts=counts), metrics


def _contrastive_step(params: dict, opt_state: Any, batch: dict, *, model: RQTokenizer,
                      tx: optax.GradientTransformation, temperature: float) -> tuple[dict, Any, jax.Array]:
    def loss_fn(p):
        v_i = model.apply({"params": p}, batch["image"], method=RQTokenizer.embed_image)
        v_t = model.apply({"params": p}, batch["caption"], method=RQTokenizer.embed_text)
        return info_nce(v_i, v_t, temperature)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _to_history(step: int, metrics: dict) -> dict[str, float]:
    return {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}


@gin.configurable(denylist=["data"])
def train_tokenizer(
    data: TokenizerData,
    config: RQTokenizerConfig | None = None,
    loss_weights: TokenizerLossWeights | None = None,
    steps: int = 2000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
    contrastive_steps: int = 500,
    contrastive_learning_rate: float = 1e-3,
    temperature: float = 0.05,
    codebook_init: str = "kmeans",
    kmeans_init_batches: int = 16,
    kmeans_iters: int = 25,
    reseed_every: int = 100,
    dead_code_threshold: float = 1.0,
    finetune_image_head: bool = True,
    contrastive_weight: float = 0.0,
    num_devices: int | None = None,
    log_every: int = 100,
) -> TrainedTokenizer:
    """Warm up the heads (InfoNCE), initialise the codebook, train eqs. 3-6; fully set by gin + seed."""
    config = config or RQTokenizerConfig()
    weights = loss_weights or TokenizerLossWeights()
    if codebook_init not in CODEBOOK_INITS:
        raise ValueError(f"train_tokenizer.codebook_init must be one of {list(CODEBOOK_INITS)}, got {codebook_init!r}")
    devices = jax.devices()
    if num_devices is not None and not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are available")
    mesh = make_device_mesh(-1, 1, devices[:num_devices])
    if batch_size % mesh.shape["data"]:
        raise ValueError(f"train_tokenizer.batch_size {batch_size} is not divisible by the {mesh.shape['data']} "
                         "data-parallel devices")
    image_dim, text_dim = data.image_features.shape[1], data.text_features.shape[1]
    model = RQTokenizer(config)
    params = init_params(config, image_dim, text_dim, seed)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rng = np.random.default_rng([seed, 1])
    history: list[dict[str, float]] = []

    if config.projection_heads and contrastive_steps > 0:
        has_caption = np.flatnonzero((data.caption_rows >= 0).any(axis=1))
        tx = optax.adam(contrastive_learning_rate)
        step_fn = jax.jit(functools.partial(_contrastive_step, model=model, tx=tx, temperature=temperature),
                          in_shardings=(replicated, replicated, sharded), out_shardings=replicated)
        params, opt_state = jax.device_put((params, tx.init(params)), replicated)
        batches = epoch_batches(has_caption.size, batch_size, seed)
        for step in range(1, contrastive_steps + 1):
            idx = has_caption[next(batches)]
            rows = data.caption_rows[idx]
            pick = rows[np.arange(idx.size), rng.integers(0, (rows >= 0).sum(1))]
            batch = {"image": data.image_features[idx], "caption": data.text_features[pick]}
            params, opt_state, loss = step_fn(params, opt_state, jax.device_put(batch, sharded))
            if step % log_every == 0 or step == contrastive_steps:
                history.append(_to_history(step, {"contrastive": loss}) | {"stage": 0.0})

    if steps == 0:  # heads only (GRACE semantic identifiers, dense two-tower baseline)
        return TrainedTokenizer(config=config, params=jax.device_get(params), image_dim=image_dim,
                                text_dim=text_dim, loss_weights=weights, history=history)
    if codebook_init == "kmeans":
        init_rows = np.arange(min(data.num_images, kmeans_init_batches * batch_size))
        v_i = np.asarray(embed_images(config, params, jnp.asarray(data.image_features[init_rows])))
        books = kmeans_init_codebooks(v_i, config, seed, kmeans_iters)
        params = {**params, "codebooks": jnp.asarray(books)}

    schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.05)
    tx = optax.multi_transform({"train": optax.adam(schedule), "freeze": optax.set_to_zero()},
                               _param_labels(params, finetune_image_head))
    state = RQTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                         code_counts=jnp.zeros((config.num_codebooks, config.codebook_size), jnp.float32))
    state = jax.device_put(state, replicated)
    step_fn = jax.jit(functools.partial(_rq_step, model=model, tx=tx, weights=weights, reseed_every=reseed_every,
                                        threshold=dead_code_threshold, contrastive_weight=contrastive_weight,
                                        temperature=temperature),
                      in_shardings=(replicated, sharded), out_shardings=replicated, donate_argnums=0)
    batches = epoch_batches(data.num_images, batch_size, seed + 1)
    for step in range(1, steps + 1):
        state, metrics = step_fn(state, jax.device_put(data.batch(next(batches)), sharded))
        if step % log_every == 0 or step == steps:
            history.append(_to_history(step, metrics) | {"stage": 1.0})
    params = jax.device_get(state.params)
    return TrainedTokenizer(config=config, params=params, image_dim=image_dim, text_dim=text_dim,
                            loss_weights=weights, history=history)


@dataclasses.dataclass
class EncodedImages:
    codes: np.ndarray  # [n, M] int32
    v_i: np.ndarray  # [n, code_dim]
    z_q: np.ndarray  # [n, code_dim] ẑ^(M)
    v_hat: np.ndarray  # [n, code_dim] decoder output

    @property
    def quantization_error(self) -> np.ndarray:
        """||v_i − ẑ^(M)||² per image [n]: the distance of an image to its code."""
        return np.sum((self.v_i - self.z_q) ** 2, axis=1)


@functools.partial(jax.jit, static_argnames=("config",))
def _encode_chunk(config: RQTokenizerConfig, params: dict, x: jax.Array) -> tuple[jax.Array, ...]:
    model = RQTokenizer(config)
    v_i = model.apply({"params": params}, x, method=RQTokenizer.embed_image)
    codes, z_q = rq_encode_codes(v_i, params["codebooks"], config.num_levels)
    return codes, v_i, z_q, model.apply({"params": params}, z_q, method=RQTokenizer.decode)


def encode_images(tok: TrainedTokenizer, image_features: np.ndarray, chunk: int = 4096) -> EncodedImages:
    """Codes, embeddings and reconstructions for every row, in fixed-size (padded) chunks."""
    n = image_features.shape[0]
    parts: list[tuple[np.ndarray, ...]] = []
    for start in range(0, n, chunk):
        x = image_features[start:start + chunk].astype(np.float32)
        size = x.shape[0]
        if size < chunk and n > chunk:
            x = np.concatenate([x, np.zeros((chunk - size, x.shape[1]), np.float32)])
        out = _encode_chunk(tok.config, tok.params, jnp.asarray(x))
        parts.append(tuple(np.asarray(o)[:size] for o in out))
    codes, v_i, z_q, v_hat = (np.concatenate([p[k] for p in parts]) for k in range(4))
    return EncodedImages(codes=codes.astype(np.int32), v_i=v_i, z_q=z_q, v_hat=v_hat)


def save_tokenizer(tok: TrainedTokenizer, out_dir: str | Path) -> Path:
    """Orbax checkpoint of the params, the config as JSON and the codebook(s) as .npy (for T5's vokens)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((out / CHECKPOINT_DIR).resolve(), tok.params, force=True)
    meta = {"config": dataclasses.asdict(tok.config), "image_dim": tok.image_dim, "text_dim": tok.text_dim,
            "loss_weights": dataclasses.asdict(tok.loss_weights)}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    np.save(out / CODEBOOK_FILE, np.asarray(tok.params["codebooks"], np.float32))
    return out


def load_tokenizer(out_dir: str | Path) -> TrainedTokenizer:
    """Restore a tokenizer written by `save_tokenizer` (orbax + JSON only; nothing is executed)."""
    root = Path(out_dir)
    path = root / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"tokenizer config missing: {path}")
    meta = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(RQTokenizerConfig)}
    unknown = set(meta.get("config", {})) - known
    if unknown:
        raise ValueError(f"{path}: unknown RQTokenizerConfig field(s) {sorted(unknown)}")
    config = RQTokenizerConfig(**meta["config"])
    target = init_params(config, meta["image_dim"], meta["text_dim"], seed=0)
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore((root / CHECKPOINT_DIR).resolve(), target)
    return TrainedTokenizer(config=config, params=jax.device_get(params), image_dim=meta["image_dim"],
                            text_dim=meta["text_dim"], loss_weights=TokenizerLossWeights(**meta["loss_weights"]))
