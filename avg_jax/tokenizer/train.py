"""Training the RQ tokenizer: InfoNCE warm-up of the heads, k-means codebook init, sharded RQ training.

Both training stages are `TrainTask`s run by the generic `train_loop` (checkpoints in `run_dir`, resume,
SIGTERM preemption, metrics.jsonl): data parallel on a ('data', 'model') mesh, batches sharded over 'data',
parameters and optimizer state replicated (the tokenizer is small). Every step is one jit-compiled function:
loss, update, code usage counts and dead-code re-seeding (the task's `post_update`, no lax.cond) all stay
on device. Batches and RNG are functions of (seed, step), so a resumed run equals an uninterrupted one.

Stages: (1) InfoNCE warm-up of both projection heads (`contrastive_steps`); (2) codebook init by k-means
on the first `kmeans_init_batches` batches of residuals; (3) eqs. 3-6. In stage 3 the text head is frozen
(it would otherwise chase v̂) and, with `finetune_image_head` (default, as the paper trains its encoders),
the image head trains through the straight-through estimator; this is what lets the alignment weight
change the codes (benchmarks/alignment_effect.py). `contrastive_weight` > 0 adds InfoNCE to stage 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from avg_jax.data.corpus import Corpus, normalize_rows, queries_by_image
from avg_jax.partitioning import make_device_mesh
from avg_jax.tokenizer.kmeans import kmeans_numpy
from avg_jax.tokenizer.losses import TokenizerLossWeights, info_nce, tokenizer_losses
from avg_jax.tokenizer.model import RQTokenizer, RQTokenizerConfig, embed_images, init_params
from avg_jax.tokenizer.quantizer import RQCodes, rq_encode_codes
from avg_jax.training.metrics import METRICS_FILE
from avg_jax.training.trainer import PREEMPTED_EXIT_CODE, train_loop

CONFIG_FILE = "tokenizer_config.json"
CHECKPOINT_DIR = "checkpoint"
CODEBOOK_FILE = "codebook.npy"
CODEBOOK_INITS = ("kmeans", "random")
TOKENIZER_RUN_DIR = "tokenizer_checkpoints"  # train_tokenizer's run_dir inside `avg-jax tokenize --out`
WARMUP_DIR, RQ_DIR = "warmup", "rq"  # the two train_loop runs inside run_dir
CODE_COUNTS = "code_counts"  # RQ-stage parameter entry: voken uses since the last re-seeding, not trained


@dataclasses.dataclass
class TokenizerData:
    """Training images with their captions: caption_rows[i] lists rows of text_features (-1 = none)."""

    image_features: np.ndarray  # [n, image_dim] float32
    text_features: np.ndarray  # [num_captions, text_dim] float32
    caption_rows: np.ndarray  # [n, K] int64, -1 padded
    # [n] bool: True where row i's captions are pseudo-captions (another image's); None = no pseudo-pairs.
    # The contrastive warm-up (the dense baseline's heads) trains on real pairs only.
    pseudo: np.ndarray | None = None

    @classmethod
    def from_corpus(cls, corpus: Corpus, split: str = "train", pseudo_splits: tuple[str, ...] = (),
                    pseudo_per_image: int = 1) -> TokenizerData:
        """The images of `split` and the captions of the same split that point at them; with `pseudo_splits`
        also the images of those splits, each paired with pseudo-captions: the captions of its
        `pseudo_per_image` nearest `split` images (cosine of image features). Only `split` captions are
        ever used (an evaluation image's own captions never are)."""
        if corpus.text_features is None:
            raise ValueError(f"corpus {corpus.name!r} has no text_features.npy; the tokenizer needs caption "
                             "features for the warm-up and the alignment loss")
        rows = corpus.image_rows(split)
        num_real = rows.size
        if rows.size == 0:
            raise ValueError(f"corpus {corpus.name!r} has no {split!r} images to train the tokenizer on")
        by_image = queries_by_image(corpus, corpus.query_rows(split))
        caps = [by_image.get(corpus.images[i].id, []) for i in rows]
        extra = np.concatenate([corpus.image_rows(s) for s in pseudo_splits if s != split] or
                               [np.zeros((0,), np.int64)]).astype(np.int64)
        if extra.size:
            donors = np.array([i for i in rows if corpus.images[i].id in by_image], np.int64)
            if donors.size == 0:
                raise ValueError(f"pseudo-pairs need {split!r} images with {split!r} captions")
            features = normalize_rows(corpus.image_features)
            nearest = np.argsort(-(features[extra] @ features[donors].T), axis=1, kind="stable")[:, :pseudo_per_image]
            caps += [[c for d in near for c in by_image[corpus.images[donors[d]].id]] for near in nearest]
            rows = np.concatenate([rows, extra])
        width = max(1, max(len(c) for c in caps))
        caption_rows = np.full((rows.size, width), -1, np.int64)
        for i, c in enumerate(caps):
            caption_rows[i, : len(c)] = c
        return cls(corpus.image_features[rows].astype(np.float32), corpus.text_features.astype(np.float32),
                   caption_rows, np.arange(rows.size) >= num_real if extra.size else None)

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


def epoch_batch(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows [batch_size] of 0-based training step `step`: reshuffled epochs of full batches (the remainder of an
    epoch is left out), a pure function of (seed, step) so that a resumed run replays the same batches."""
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training images")
    epoch, k = divmod(step, n // batch_size)
    return np.random.default_rng([seed, epoch]).permutation(n)[k * batch_size:(k + 1) * batch_size]


class StepBatches:
    """Checkpointable iterator for `train_loop`: the batch of step s is `make(s)`, so its state is just s."""

    def __init__(self, make: Callable[[int], dict[str, np.ndarray]]):
        self._make, self._step = make, 0

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._make(self._step)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"step": self._step}

    def set_state(self, state: bytes | dict[str, int]) -> None:
        self._step = int((json.loads(state) if isinstance(state, bytes) else state)["step"])

    def start_prefetch(self) -> None:
        """Called by grain's checkpoint handler after a restore; batches are made on demand."""


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
    """'train' / 'freeze' per top-level entry: the text head never trains in the RQ stage (it would chase v̂),
    nor do the code counts."""
    frozen = {"text_head", CODE_COUNTS} | (set() if finetune_image_head else {"image_head"})
    return {k: jax.tree.map(lambda _, k=k: "freeze" if k in frozen else "train", v) for k, v in params.items()}


def _reseed_dead_codes(codebooks: jax.Array, counts: jax.Array, rq: RQCodes, threshold: float, due: jax.Array,
                       ) -> tuple[jax.Array, jax.Array]:
    """Where `due` (a bool scalar), replace vokens used < threshold times since the last re-seeding by residuals
    of the worst-served samples; returns (codebooks, number re-seeded).

    Candidates for codebook c are the residual inputs r_j of the levels c serves, ranked by the error
    left after step j (highest first); the k-th dead code takes the k-th candidate. The candidates are computed
    on every step and selected with `where`, not under `lax.cond`: with a data-parallel batch they need
    collectives, and XLA:CPU does not order collectives inside a conditional with those outside it (8 host
    devices deadlocked).
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
        dead = (counts[c] < threshold) & due  # [N]
        rank = (jnp.cumsum(dead) - 1) % k
        new_books.append(jnp.where(dead[:, None], cand[top[rank]], codebooks[c]))
        num_dead = num_dead + jnp.sum(dead).astype(jnp.int32)
    return jnp.stack(new_books), num_dead


class ContrastiveTask:
    """Stage 1 as a `TrainTask`: InfoNCE warm-up of both heads; batches: image [b, image_dim], caption [b, text_dim]
    (one caption per image)."""

    def __init__(self, config: RQTokenizerConfig, image_dim: int, text_dim: int, temperature: float):
        self.config, self.image_dim, self.text_dim, self.temperature = config, image_dim, text_dim, temperature
        self.model = RQTokenizer(config, image_dim)

    def init_params(self, rng: jax.Array) -> dict:
        return init_params(self.config, self.image_dim, self.text_dim, rng)

    def loss(self, params: dict, batch: dict, rng: jax.Array, step: jax.Array, constants: Any
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        v_i = self.model.apply({"params": params}, batch["image"], method=RQTokenizer.embed_image)
        v_t = self.model.apply({"params": params}, batch["caption"], method=RQTokenizer.embed_text)
        loss = info_nce(v_i, v_t, self.temperature)
        return loss, {"contrastive": loss}


class RQTask:
    """Stage 3 (eqs. 3-6) as a `TrainTask`; batches as `TokenizerData.batch`.

    The parameters are the tokenizer's plus CODE_COUNTS [C, N], the uses of each voken since the last
    re-seeding (never trained: checkpointed with the rest). `post_update` counts the codes of the updated
    model and, every `reseed_every` updates but never after the last one (an untrained re-seeded voken would
    end up in the codebook), re-seeds the dead vokens.
    """

    def __init__(self, config: RQTokenizerConfig, image_dim: int, text_dim: int, weights: TokenizerLossWeights,
                 num_steps: int, reseed_every: int, threshold: float, contrastive_weight: float, temperature: float):
        self.config, self.image_dim, self.text_dim, self.weights = config, image_dim, text_dim, weights
        self.num_steps, self.reseed_every, self.threshold = num_steps, reseed_every, threshold
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        self.model = RQTokenizer(config, image_dim)

    def init_params(self, rng: jax.Array) -> dict:
        counts = jnp.zeros((self.config.num_codebooks, self.config.codebook_size), jnp.float32)
        return {**init_params(self.config, self.image_dim, self.text_dim, rng), CODE_COUNTS: counts}

    def loss(self, params: dict, batch: dict, rng: jax.Array, step: jax.Array, constants: Any
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        params = {k: v for k, v in params.items() if k != CODE_COUNTS}
        out = self.model.apply({"params": params}, batch["image"], batch["text"])
        # eq. 5 compares v̂_i with captions in the code space; the head's parameters get no gradient from it
        v_hat_code = self.model.apply({"params": jax.lax.stop_gradient(params)}, out["v_hat"],
                                      method=RQTokenizer.embed_image)
        losses = tokenizer_losses(batch["image"], out["v_i"], out["rq"].partial_sums, out["v_hat"], v_hat_code,
                                  out["v_t"], batch["text_mask"], self.weights, out["rq"].residuals)
        if self.contrastive_weight > 0:  # keeps a fine-tuned image head discriminative (first caption per image)
            losses["contrastive"] = info_nce(out["v_i"], out["v_t"][:, 0], self.temperature,
                                             batch["text_mask"][:, 0])
            losses["total"] = losses["total"] + self.contrastive_weight * losses["contrastive"]
        return losses["total"], losses

    def post_update(self, params: dict, batch: dict, rng: jax.Array, step: jax.Array, constants: Any
                    ) -> tuple[dict, dict[str, jax.Array]]:
        """Count the codes of the batch; re-seed dead vokens after update `step` + 1 when it is a re-seeding
        step other than the last."""
        counts = params[CODE_COUNTS]
        num_books, n = counts.shape
        model_params = {k: v for k, v in params.items() if k != CODE_COUNTS}
        rq = self.model.apply({"params": model_params}, batch["image"], method=RQTokenizer.quantize_image)
        m = rq.codes.shape[1]
        book_of_level = jnp.zeros((m,), jnp.int32) if num_books == 1 else jnp.arange(m)
        flat = (book_of_level[None, :] * n + rq.codes).reshape(-1)
        counts = counts + jnp.bincount(flat, length=num_books * n).reshape(num_books, n)

        done = step + 1
        due = ((done % self.reseed_every == 0) & (done < self.num_steps) if self.reseed_every > 0
               else jnp.zeros((), bool))
        books, num_dead = _reseed_dead_codes(params["codebooks"], counts, rq, self.threshold, due)
        counts = jnp.where(due, jnp.zeros_like(counts), counts)
        return {**params, "codebooks": books, CODE_COUNTS: counts}, {"reseeded": num_dead.astype(jnp.float32)}


class TrainingPreempted(SystemExit):
    """SIGTERM stopped tokenizer training at a checkpoint. Uncaught, the process exits with PREEMPTED_EXIT_CODE;
    rerunning with the same `run_dir` resumes."""

    def __init__(self, run_dir: Path):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.run_dir = run_dir


def _history(run_dir: Path, stage: float) -> list[dict[str, float]]:
    """The logged rows of a `train_loop` run (without its timing) tagged with the tokenizer stage."""
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    return [{k: float(v) for k, v in row.items() if k != "steps_per_sec"} | {"stage": stage} for row in rows]


@gin.configurable(denylist=["data", "run_dir"])
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
    checkpoint_every: int = 500,
    run_dir: str | Path | None = None,
) -> TrainedTokenizer:
    """Warm up the heads (InfoNCE), initialise the codebook, train eqs. 3-6; fully set by gin + seed.

    Both training stages run through `train_loop`, checkpointed in `run_dir`/{warmup,rq} (a temporary
    directory when None): rerunning with the same `run_dir` resumes a killed run where it stopped and gives the
    same parameters as an uninterrupted run (batches and RNG are functions of (seed, step)); a finished run is
    restored, not retrained. SIGTERM saves a checkpoint and raises `TrainingPreempted`.
    """
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
    epoch_batch(data.num_images, batch_size, seed, 0)  # checks the batch size
    image_dim, text_dim = data.image_features.shape[1], data.text_features.shape[1]
    config.validate(image_dim, text_dim)
    loop = functools.partial(train_loop, mesh=mesh, seed=seed, accum_steps=1, compute_dtype="float32",
                             checkpoint_every=checkpoint_every, keep_checkpoints=2, async_checkpoints=True,
                             log_every=log_every, eval_every=0, progress_bar=False, tensorboard=False)
    with contextlib.ExitStack() as stack:
        root = Path(run_dir) if run_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        history: list[dict[str, float]] = []
        if config.projection_heads and contrastive_steps > 0:
            real = (data.caption_rows >= 0).any(axis=1) & (True if data.pseudo is None else ~data.pseudo)
            has_caption = np.flatnonzero(real)

            def warmup_batch(step: int) -> dict[str, np.ndarray]:
                idx = has_caption[epoch_batch(has_caption.size, batch_size, seed, step)]
                rows = data.caption_rows[idx]
                pick = np.random.default_rng([seed, 1, step]).integers(0, (rows >= 0).sum(1))
                return {"image": data.image_features[idx], "caption": data.text_features[rows[np.arange(idx.size),
                                                                                               pick]]}

            lr = contrastive_learning_rate
            result = loop(ContrastiveTask(config, image_dim, text_dim, temperature), StepBatches(warmup_batch),
                          root / WARMUP_DIR, num_steps=contrastive_steps,
                          optimizer=(optax.adam(lr), optax.constant_schedule(lr)),
                          initial_params=lambda: init_params(config, image_dim, text_dim, seed))
            if result.preempted:
                raise TrainingPreempted(root)
            params = jax.device_get(result.state.params)
            history += _history(root / WARMUP_DIR, stage=0.0)
        else:
            params = init_params(config, image_dim, text_dim, seed)
        if steps == 0:  # heads only (GRACE semantic identifiers, dense two-tower baseline)
            return TrainedTokenizer(config=config, params=params, image_dim=image_dim, text_dim=text_dim,
                                    loss_weights=weights, history=history)

        def rq_initial_params() -> dict:
            books = params["codebooks"]
            if codebook_init == "kmeans":
                init_rows = np.arange(min(data.num_images, kmeans_init_batches * batch_size))
                v_i = np.asarray(embed_images(config, params, jnp.asarray(data.image_features[init_rows])))
                books = kmeans_init_codebooks(v_i, config, seed, kmeans_iters)
            counts = np.zeros((config.num_codebooks, config.codebook_size), np.float32)
            return {**params, "codebooks": np.asarray(books, np.float32), CODE_COUNTS: counts}

        schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05)
        tx = optax.multi_transform({"train": optax.adam(schedule), "freeze": optax.set_to_zero()},
                                   functools.partial(_param_labels, finetune_image_head=finetune_image_head))
        task = RQTask(config, image_dim, text_dim, weights, steps, reseed_every, dead_code_threshold,
                      contrastive_weight, temperature)
        result = loop(task, StepBatches(lambda step: data.batch(epoch_batch(data.num_images, batch_size, seed + 1,
                                                                            step))),
                      root / RQ_DIR, num_steps=steps, optimizer=(tx, schedule), initial_params=rq_initial_params)
        if result.preempted:
            raise TrainingPreempted(root)
        history += _history(root / RQ_DIR, stage=1.0)
    params = {k: v for k, v in jax.device_get(result.state.params).items() if k != CODE_COUNTS}
    return TrainedTokenizer(config=config, params=params, image_dim=image_dim, text_dim=text_dim,
                            loss_weights=weights, history=history)


@dataclasses.dataclass
class EncodedImages:
    codes: np.ndarray  # [n, M] int32
    v_i: np.ndarray  # [n, code_dim]
    z_q: np.ndarray  # [n, code_dim] ẑ^(M)
    v_hat: np.ndarray  # [n, image_dim] decoder output: the reconstructed image feature (eq. 3)
    v_hat_code: np.ndarray  # [n, code_dim] v̂_i through the image head, compared with captions (eq. 5)

    @property
    def quantization_error(self) -> np.ndarray:
        """||v_i − ẑ^(M)||² per image [n]: the distance of an image to its code."""
        return np.sum((self.v_i - self.z_q) ** 2, axis=1)


@functools.partial(jax.jit, static_argnames=("config",))
def _encode_chunk(config: RQTokenizerConfig, params: dict, x: jax.Array) -> tuple[jax.Array, ...]:
    model = RQTokenizer(config, x.shape[-1])
    v_i = model.apply({"params": params}, x, method=RQTokenizer.embed_image)
    codes, z_q = rq_encode_codes(v_i, params["codebooks"], config.num_levels)
    v_hat = model.apply({"params": params}, z_q, method=RQTokenizer.decode)
    return codes, v_i, z_q, v_hat, model.apply({"params": params}, v_hat, method=RQTokenizer.embed_image)


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
    codes, v_i, z_q, v_hat, v_hat_code = (np.concatenate([p[k] for p in parts]) for k in range(5))
    return EncodedImages(codes=codes.astype(np.int32), v_i=v_i, z_q=z_q, v_hat=v_hat, v_hat_code=v_hat_code)


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
