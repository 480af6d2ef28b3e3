"""The generative-retrieval training task: T5 maps a query (or, for GRACE's learning-to-memorize, an image
feature prefix plus an instruction) to the identifier of its image.

Loss per step (AVG eq. 10 with a weight and a warm-up): L = L_gen + λ(step) · L_dis.
  L_gen (eq. 7): teacher-forced negative log-likelihood of the positive identifier.
  L_dis (eqs. 8-9): a constrained beam search over the TRAIN image set's trie (no gradient) proposes
    b candidates per query; the positive replaces one of them when missing; duplicates are masked; all b
    candidates are teacher-forced in ONE [batch * b, length] decoder pass and the listwise cross-entropy
    of their summed token log-probabilities is taken. Only query rows (not memorize rows) count.
While λ(step) = 0 only the positive is decoded (`lax.cond`), so a warm-up stage costs no beam search.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp

from avg_jax.data.vocab import PAD_ID
from avg_jax.decoding.beam_search import BeamSearchOptions
from avg_jax.t5.configs import T5Config
from avg_jax.t5.decoding import t5_beam_search
from avg_jax.t5.model import T5, encoder_input_mask
from avg_jax.training import losses

TRAIN_TRIE = "train_trie"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RetrievalLossConfig:
    """Weights of eq. 10 and the discriminative loss' beam (gin: `RetrievalLossConfig.beam_size = 10`)."""

    discriminative_weight: float = 0.0  # λ; 0 = generative training only
    discriminative_start_step: int = 0  # λ(step) = 0 before this step (the authors' second stage)
    discriminative_warmup_steps: int = 0  # then λ rises linearly over this many steps
    beam_size: int = 10  # b candidates per query
    z_loss: float = 0.0

    def __post_init__(self):
        if self.discriminative_weight < 0:
            raise ValueError(f"RetrievalLossConfig.discriminative_weight must be >= 0, got "
                             f"{self.discriminative_weight}")
        if self.discriminative_start_step < 0 or self.discriminative_warmup_steps < 0:
            raise ValueError("RetrievalLossConfig: discriminative_start_step and discriminative_warmup_steps "
                             "must be >= 0")
        if self.beam_size < 1:
            raise ValueError(f"RetrievalLossConfig.beam_size must be >= 1, got {self.beam_size}")

    def weight_at(self, step: jax.Array) -> jax.Array:
        """λ(step): 0 before the start step, linear warm-up, then `discriminative_weight`."""
        ramp = (step - self.discriminative_start_step + 1) / max(self.discriminative_warmup_steps, 1)
        ramp = jnp.where(step >= self.discriminative_start_step, jnp.clip(ramp, 0.0, 1.0), 0.0)
        return jnp.asarray(self.discriminative_weight, jnp.float32) * ramp.astype(jnp.float32)


def shift_right(targets: jax.Array) -> jax.Array:
    """Decoder inputs: targets shifted right with the decoder start id PAD (0), as in T5: [..., T]."""
    return jnp.concatenate([jnp.full_like(targets[..., :1], PAD_ID), targets[..., :-1]], axis=-1)


def _encode_rows(module: T5, input_ids: jax.Array, image_features: jax.Array, has_image: jax.Array,
                 deterministic: bool) -> tuple[jax.Array, jax.Array]:
    """Encode a batch mixing memorize rows (image prefix) and query rows (prefix masked out)."""
    k = module.config.num_image_tokens
    mask = encoder_input_mask(input_ids, k).at[:, :k].set(has_image[:, None])  # [batch, k + length]
    return module.encoder(module.token_embedder(input_ids), mask, image_features, deterministic), mask


class RetrievalTask:
    """`TrainTask` for T5 generative retrieval; batches carry "inputs" [b, L], "targets" [b, T] (identifier
    ids, PAD-padded), "valid" [b], "query_row" [b] (-1 on memorize and pseudo-query rows) and, with an image
    prefix, "image_features" [b, d] and "has_image" [b]."""

    def __init__(self, config: T5Config, loss: RetrievalLossConfig, window: tuple[int, int] | None = None,
                 target_length: int = 8, input_length: int = 8):
        self.config = config
        self.model = T5(config)
        self.loss_config = loss
        self.window = window  # identifier vocabulary window of the beam-search head (avg_jax.t5.decoding)
        self.target_length = target_length
        self.input_length = input_length

    def init_params(self, rng: jax.Array) -> Any:
        ids = jnp.ones((1, self.input_length), jnp.int32)
        image = (jnp.zeros((1, self.config.image_feature_dim), jnp.float32) if self.config.num_image_tokens
                 else None)
        return self.model.init(rng, ids, jnp.ones((1, self.target_length), jnp.int32), image)["params"]

    def encode(self, params: Any, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Encoder states and key mask of a batch (dropout on when `rng` is given)."""
        deterministic = rng is None
        rngs = None if rng is None else {"dropout": rng}
        if self.config.num_image_tokens:
            return self.model.apply({"params": params}, batch["inputs"], batch["image_features"],
                                    batch["has_image"], deterministic, method=_encode_rows, rngs=rngs)
        encoded = self.model.apply({"params": params}, batch["inputs"], None, deterministic, method=T5.encode,
                                   rngs=rngs)
        return encoded, encoder_input_mask(batch["inputs"])

    def decode(self, params: Any, encoded: jax.Array, mask: jax.Array, targets: jax.Array,
               rng: jax.Array | None) -> jax.Array:
        """Teacher-forced logits [rows, T, vocab] of `targets` [rows, T]."""
        return self.model.apply({"params": params}, encoded, mask, shift_right(targets), rng is None,
                                method=T5.decode, rngs=None if rng is None else {"dropout": rng})

    def candidates(self, params: Any, input_ids: jax.Array, tables: Any) -> tuple[jax.Array, jax.Array]:
        """Eq. 8: the top-b train identifiers of each query by constrained beam search, no gradient.

        Returns tokens [b, beam, T] (PAD-padded to the target length) and validity [b, beam].
        """
        options = BeamSearchOptions(beam_size=self.loss_config.beam_size, score_normalization="vocab")
        result = t5_beam_search(jax.lax.stop_gradient(params), self.config, input_ids, tables, options=options,
                                window=self.window)
        tokens = result.tokens
        if tokens.shape[-1] > self.target_length:
            raise ValueError(f"trie identifiers have {tokens.shape[-1]} tokens > target length {self.target_length}")
        tokens = jnp.pad(tokens, ((0, 0), (0, 0), (0, self.target_length - tokens.shape[-1])))
        return jax.lax.stop_gradient(tokens), result.groups >= 0

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array, constants: Any
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.loss_config
        weights = batch["valid"].astype(jnp.float32)  # [b]
        query_weights = weights * (batch["query_row"] >= 0)  # L_dis on real TRAIN queries only
        targets = batch["targets"]  # [b, T]
        encoded, mask = self.encode(params, batch, jax.random.fold_in(rng, 0))
        decode_rng = jax.random.fold_in(rng, 1)
        lam = cfg.weight_at(step)

        def generative_only(_):
            logits = self.decode(params, encoded, mask, targets, decode_rng)
            total, metrics = losses.generative_loss(logits, targets, weights, cfg.z_loss)
            return total, {**metrics, "dis_loss": jnp.zeros(()), "positive_in_beam": jnp.zeros(())}

        def with_discriminative(_):
            cands, valid = self.candidates(params, batch["inputs"], constants[TRAIN_TRIE])  # [b, k, T], [b, k]
            cands, positive, valid, found = losses.inject_positive(cands, valid, targets,
                                                                   jax.random.fold_in(rng, 2))
            keep = losses.duplicate_free(cands, valid)
            b, k, t = cands.shape
            # All b*k candidates in one teacher-forced pass: [b*k, T, vocab].
            logits = self.decode(params, jnp.repeat(encoded, k, axis=0), jnp.repeat(mask, k, axis=0),
                                 cands.reshape(b * k, t), decode_rng).reshape(b, k, t, -1)
            scores = losses.sequence_scores(logits, cands)  # [b, k]
            dis = losses.listwise_loss(scores, positive, keep)  # [b]
            denom = jnp.maximum(query_weights.sum(), 1e-9)
            dis_loss = jnp.sum(query_weights * dis) / denom
            positive_logits = jnp.take_along_axis(logits, positive[:, None, None, None], axis=1)[:, 0]
            gen, metrics = losses.generative_loss(positive_logits, targets, weights, cfg.z_loss)
            metrics.update(dis_loss=dis_loss, positive_in_beam=jnp.sum(query_weights * found) / denom)
            return gen + lam * dis_loss, metrics

        if cfg.discriminative_weight == 0:
            total, metrics = generative_only(None)
        else:
            total, metrics = jax.lax.cond(lam > 0, with_discriminative, generative_only, None)
        return total, {**metrics, "dis_weight": lam}

