"""The generative-retrieval model: ONE object owns the whole query -> ranking path and the training loss.

As t5x's `EncoderDecoderModel` owns loss / predict / score, `RetrievalModel` owns
  * what the model is: the T5 config, the vocabulary (text + new tokens), the identifier-token window of
    the output head, the beam-search score normalisation;
  * how a query becomes encoder input: the retrieve instruction (GRACE inst-r), tokenization, the input
    length and the ONE truncation rule (`truncate`: cut to `input_length`, keeping the final EOS), and the
    checks on what it is given (an empty query is an error; cut queries are reported once);
  * the training loss (AVG eq. 10): L = L_gen + λ(step) · L_dis (`loss`, the trainer's `TrainTask`);
  * prediction: constrained (trie) or free beam search (`beam_search`, pure and jit-able) and ranking
    (`rank`: identifier groups -> images over a `SearchIndex`).
Training, the periodic evaluator, `avg-jax retrieve`, the demo, the sweep and the benchmarks all go through
it, and a retrieval checkpoint (`save_checkpoint` / `load_checkpoint`) stores everything it needs, so a
checkpoint ranks the same everywhere.

Loss per step (AVG eq. 10 with a weight and a warm-up): L = L_gen + λ(step) · L_dis.
  L_gen (eq. 7): teacher-forced negative log-likelihood of the positive identifier.
  L_dis (eqs. 8-9): a constrained beam search over the INDEXED image set's trie (TRAIN images, plus the
    images of indexed splits when pseudo-queries / memorize rows are on; no gradient) proposes
    b candidates per query; the positive replaces one of them when missing; duplicates are masked; all b
    candidates are teacher-forced in ONE [batch * b, length] decoder pass and the listwise cross-entropy
    of their summed token log-probabilities is taken. Only query rows (not memorize rows) count.
While λ(step) = 0 only the positive is decoded (`lax.cond`), so a warm-up stage costs no beam search.

Retrieval checkpoint layout (every file read without executing anything):
  DIR/model/                 HuggingFace T5 directory (config.json + model.safetensors)
  DIR/identifiers/           the identifier table of the image set to search
  DIR/spiece.model           the SentencePiece model of the text vocabulary
  DIR/retrieval_model.json   input length, instruction, head window, score normalisation, forced-step
                             scoring (`BeamSearchOptions.score_forced_steps`), extra ids
  DIR/query_conditioning.npz only for a query-conditioned model (np.load, allow_pickle=False): the encoder's
                             prefix projection (image_projection_kernel/bias) and the text head that maps raw
                             query text features to the aligned vector fed to it (TextHead arrays)
  DIR/heads.npz              optional (np.load, allow_pickle=False): the dense towers for generate-then-rerank
                             and the aligned-voken prior: the aligned vectors of the set's images (image_ids,
                             image_embeddings), the tokenizer's text head (text_out_kernel/bias,
                             text_hidden_kernel/bias if any, text_normalize; none = features already aligned),
                             the vokens' codebook vectors (voken_vectors from token voken_first_token on; RQ
                             identifiers only) and rerank_weight / rerank_temperature / prior_weight
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import gin
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.data.vocab import EOS_ID, PAD_ID, Vocabulary
from avg_jax.decoding.beam_search import BeamSearchOptions, BeamSearchResult
from avg_jax.decoding.trie import Trie, build_trie, identifier_window
from avg_jax.identifiers.table import IdentifierTable
from avg_jax.json_io import read_json
from avg_jax.t5.configs import T5Config
from avg_jax.t5.decoding import t5_beam_search
from avg_jax.t5.hf_io import load_hf_t5, save_hf_t5
from avg_jax.t5.model import T5, encoder_input_mask
from avg_jax.training import losses
from avg_jax.training.examples import MEMORIZE_ROW, PSEUDO_ROW

ArrayT = TypeVar("ArrayT", np.ndarray, jax.Array)

TRAIN_TRIE = "train_trie"  # key of the indexed (training-time) image set's trie tables in the loss' `constants`
PRIOR_VECTORS = "prior_vectors"  # key of the window's voken vectors [window size, d] (L_dis over fused scores)
DISTILL_IMAGES = "distill_images"  # key of the indexed images' aligned vectors [I, d] (the distillation teacher)
DISTILL_TOKENS = "distill_tokens"  # key of the same images' identifiers [I, target length] (PAD-padded)
MODEL_DIR = "model"
IDENTIFIERS_DIR = "identifiers"
SENTENCEPIECE_FILE = "spiece.model"
SPEC_FILE = "retrieval_model.json"
HEADS_FILE = "heads.npz"
CONDITIONING_FILE = "query_conditioning.npz"
PREFIX_PARAMS = ("image_projection_kernel", "image_projection_bias")
Identifier = tuple[int, ...]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RetrievalLossConfig:
    """Weights of eq. 10 and the discriminative loss' beam (gin: `RetrievalLossConfig.beam_size = 10`).

    `generative_reduction` (eq. 7's token reduction): 'sum' (default) = eq. 7 as written, -Σ_j log p per
    identifier, on the scale of the eq. 8 sequence scores; 'mean' = the per-token average of the authors' code,
    against which their λ = 0.5 was chosen. Eq. 10 is then L = L_gen + λ·L_dis with L_gen the chosen reduction
    (with 'mean' λ·L_dis weighs T times more relative to L_gen than with 'sum', T = identifier length).
    `max_relevant` R > 0 (eqs. 8-9 with several relevant images): a query's other relevant images (up to R, from
    the batch's "relevant" [b, R, T] / "relevant_valid" [b, R]) found among the candidates are masked out of
    the listwise softmax instead of counting as negatives; 0 = every non-positive candidate is a negative.
    `prior_weight` > 0 (L_dis over the fused scores): the candidates come from the search with the
    aligned-voken prior and each candidate's listwise score adds its prior, prior_weight * <t, ẑ> /
    `prior_temperature` (`RerankConfig`; t = the batch's "prior_query" aligned text vectors [b, d], the
    vokens' codebook vectors in the loss constants' PRIOR_VECTORS [window size, d]), so L_dis trains the
    generator on what the fused ranking gets wrong; 0 = the generator's scores alone (eqs. 8-9).
    `discriminative_found_only`: L_dis averaged over the rows whose positive the beam found; a row whose positive
    had to be injected into its candidates (§3.2) keeps its L_gen and adds no L_dis. On emoji those rows (about
    2/3) are what made the L_dis stage lower retrieval (README, "The real emoji benchmark").
    `discriminative_score`: each candidate's s_j in eq. 9: 'log_prob' (default) = the sum of its vokens' log-
    probabilities, the score the beam search ranks by; 'prob' = the sum of its vokens' probabilities, as §3.2
    words it (a bounded score: the listwise softmax then spans at most identifier-length nats).
    `input_token_dropout` p > 0 (training only, not in the paper): each query text piece of a query or
    pseudo-query row is dropped from the encoder input with probability p (replaced by PAD, so masked out of
    attention); the EOS, an instruction prefix, memorize rows and a row's last remaining piece are kept. A
    regulariser for a generator trained from scratch on short query texts.
    `distill_weight` w > 0 (dense-to-generative distillation, an extension; not in the paper): every query and
    pseudo-query row also learns the dense towers' ranking, L = L_gen + w·L_distill (+ λ·L_dis), L_distill the
    cross-entropy of each next-token distribution along the row's target against the dense image distribution
    softmax(<t, v_i> / `distill_temperature`) over the indexed images, marginalised onto the target prefix's
    children (`losses.trie_teacher`; t = the batch's "prior_query" aligned text vectors, the images' aligned vectors
    and identifiers in the loss constants' DISTILL_IMAGES / DISTILL_TOKENS); reduced like L_gen
    (`generative_reduction`). The teacher needs only the TRAINING captions' text features, as the pseudo-queries;
    the searched generator stays pure (no dense feature at query time).
    """

    discriminative_weight: float = 0.0  # λ; 0 = generative training only
    discriminative_start_step: int = 0  # λ(step) = 0 before this step (the authors' second stage)
    discriminative_warmup_steps: int = 0  # then λ rises linearly over this many steps
    beam_size: int = 10  # b candidates per query
    z_loss: float = 0.0
    generative_reduction: str = "sum"  # 'sum' (eq. 7) or 'mean' (per token, the authors' code)
    max_relevant: int = 0  # R: other relevant identifiers carried per training example (0 = off)
    discriminative_pseudo_queries: bool = False  # L_dis also on pseudo-query rows (query_row -2)
    discriminative_found_only: bool = False  # L_dis only on rows whose positive the beam found (none injected)
    prior_weight: float = 0.0  # L_dis over generator + aligned-voken prior scores (0 = generator alone)
    prior_temperature: float = 1.0
    input_token_dropout: float = 0.0  # p: query text pieces dropped from the encoder input in training
    discriminative_score: str = "log_prob"  # eq. 9's s_j: 'log_prob' (the search's score) or 'prob' (§3.2's words)
    distill_weight: float = 0.0  # w: the dense ranking distilled into the next-token distributions (0 = off)
    distill_temperature: float = 0.05  # of the teacher's softmax over the images' cosines

    def __post_init__(self):
        if self.distill_weight < 0 or not self.distill_temperature > 0:
            raise ValueError(f"RetrievalLossConfig: distill_weight must be >= 0 and distill_temperature > 0, got "
                             f"{self.distill_weight} and {self.distill_temperature}")
        if not 0.0 <= self.input_token_dropout < 1.0:
            raise ValueError(f"RetrievalLossConfig.input_token_dropout must be in [0, 1), got "
                             f"{self.input_token_dropout}")
        if self.discriminative_score not in losses.DIS_SCORES:
            raise ValueError(f"RetrievalLossConfig.discriminative_score must be one of {losses.DIS_SCORES}, got "
                             f"{self.discriminative_score!r}")
        if self.discriminative_score == "prob" and self.prior_weight > 0:
            raise ValueError("RetrievalLossConfig: prior_weight > 0 adds the voken prior to log-probability scores; "
                             "it cannot be combined with discriminative_score 'prob'")
        if self.generative_reduction not in losses.GEN_REDUCTIONS:
            raise ValueError(f"RetrievalLossConfig.generative_reduction must be one of {losses.GEN_REDUCTIONS}, "
                             f"got {self.generative_reduction!r}")
        if self.max_relevant < 0:
            raise ValueError(f"RetrievalLossConfig.max_relevant must be >= 0, got {self.max_relevant}")
        if self.discriminative_weight < 0:
            raise ValueError(f"RetrievalLossConfig.discriminative_weight must be >= 0, got "
                             f"{self.discriminative_weight}")
        if self.discriminative_start_step < 0 or self.discriminative_warmup_steps < 0:
            raise ValueError("RetrievalLossConfig: discriminative_start_step and discriminative_warmup_steps "
                             "must be >= 0")
        if self.beam_size < 1:
            raise ValueError(f"RetrievalLossConfig.beam_size must be >= 1, got {self.beam_size}")
        if self.prior_weight < 0 or not self.prior_temperature > 0:
            raise ValueError(f"RetrievalLossConfig: prior_weight must be >= 0 and prior_temperature > 0, got "
                             f"{self.prior_weight} and {self.prior_temperature}")

    def weight_at(self, step: jax.Array) -> jax.Array:
        """λ(step): 0 before the start step, linear warm-up, then `discriminative_weight`."""
        ramp = (step - self.discriminative_start_step + 1) / max(self.discriminative_warmup_steps, 1)
        ramp = jnp.where(step >= self.discriminative_start_step, jnp.clip(ramp, 0.0, 1.0), 0.0)
        return jnp.asarray(self.discriminative_weight, jnp.float32) * ramp.astype(jnp.float32)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class QueryConditioning:
    """Query conditioning (gin: `QueryConditioning.enabled = True`): every encoder input gets
    `num_prefix_tokens` soft prefix tokens (the T5 image-prefix projection, `T5Config.num_image_tokens`) from an
    ALIGNED vector of the tokenizer's contrastive heads: query rows the text head of the query's corpus text
    feature, pseudo-query rows that of their TRAIN caption, memorize rows the image head of the image feature.
    `max_alpha` > 0 (training only, query rows only, GENIUS-style): prefix = q + α (v − q), α ~ U(0, max_alpha)
    per example, q the query's aligned vector and v its target image's.
    `text_dropout` p > 0 (training only, not in any paper): each query or pseudo-query row loses its whole query
    text with probability p (the pieces become PAD; an instruction prefix and the EOS stay), so the generator
    also learns the identifier from the prefix alone and cannot settle on reading the words: the prefix is what
    carries a query whose words the T5 never read."""

    enabled: bool = False
    num_prefix_tokens: int = 1
    max_alpha: float = 0.0
    text_dropout: float = 0.0

    def __post_init__(self):
        if self.num_prefix_tokens < 1:
            raise ValueError(f"QueryConditioning.num_prefix_tokens must be >= 1, got {self.num_prefix_tokens}")
        if not 0.0 <= self.max_alpha <= 1.0:
            raise ValueError(f"QueryConditioning.max_alpha must be in [0, 1], got {self.max_alpha}")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"QueryConditioning.text_dropout must be in [0, 1), got {self.text_dropout}")


def shift_right(targets: jax.Array) -> jax.Array:
    """Decoder inputs: targets shifted right with the decoder start id PAD (0), as in T5: [..., T]."""
    return jnp.concatenate([jnp.full_like(targets[..., :1], PAD_ID), targets[..., :-1]], axis=-1)


def with_instruction(instruction: str, text: str) -> str:
    """GRACE-style instruction prefix (none when empty)."""
    return f"{instruction} {text}" if instruction else text


def table_vocabulary(table: IdentifierTable, sentencepiece_model: str | Path) -> Vocabulary:
    """The model vocabulary of `table`: its SentencePiece pieces, T5 sentinel ids up to the table's
    `text_vocab_size`, then the table's new tokens (the one way a vocabulary is rebuilt)."""
    pieces = Vocabulary(sentencepiece_model).text_size
    extra = table.text_vocab_size - pieces
    recorded = table.metadata.get("num_extra_ids")
    if extra < 0 or (recorded is not None and int(recorded) != extra):
        raise ValueError(f"{sentencepiece_model} has {pieces} pieces, but the identifier table's text_vocab_size "
                         f"is {table.text_vocab_size} (metadata num_extra_ids={recorded})")
    return Vocabulary(sentencepiece_model, num_extra_ids=extra, num_new=table.num_new_tokens)


@dataclasses.dataclass(frozen=True)
class SearchIndex:
    """The searchable image set: its trie (constrained search) and identifier -> images (free generation).

    `other_identifiers`: identifiers of images outside the set (e.g. training images), so free generation
    can tell an out-of-set identifier from an invalid sequence.
    """

    trie: Trie
    groups: dict[Identifier, list[str]]
    other_identifiers: frozenset[Identifier]

    @classmethod
    def from_table(cls, table: IdentifierTable, full_table: IdentifierTable | None = None) -> SearchIndex:
        groups = table.groups()
        others = frozenset(full_table.groups()) - frozenset(groups) if full_table is not None else frozenset()
        return cls(build_trie(table), groups, others)

    @property
    def max_length(self) -> int:
        """Longest identifier of the set or of the other images (free generation runs this many steps)."""
        return max(len(x) for x in (*self.groups, *self.other_identifiers))


class Rankings(NamedTuple):
    """Per query, best first: ranked image ids with their identifier's score, the identifiers they came
    from with their scores and (free generation only, else None) every generated sequence."""

    images: list[list[str]]
    image_scores: list[list[float]]
    identifiers: list[list[Identifier]]
    identifier_scores: list[list[float]]
    generated: list[list[Identifier]] | None


@dataclasses.dataclass(frozen=True)
class RerankConfig:
    """Fusion with the dense towers (the tokenizer's contrastive heads), inside and after the beam search.

    `prior_weight` (the aligned-voken prior, inside the search): every voken a beam emits adds
    prior_weight * <t, c_voken> / temperature, t the query's aligned text vector and c_voken the voken's codebook
    vector; summed over an identifier this is prior_weight * <t, ẑ_i> / temperature with ẑ_i the image's
    quantized vector (the 'ceiling' of `evaluation.ceiling`). With temperature = the heads' InfoNCE
    temperature and weight 1 it is the dense model's log-softmax over quantized images up to a per-query
    constant, so the search ranks by a product of the generator and the dense expert (shallow fusion).
    `weight` (generate-then-rerank, after the search): fused score = search score + weight * cos(t, v_i) /
    temperature, v_i the image's aligned (unquantized) vector; only the beam's images are scored.
    Both 0 = off (the pure generative ranking). Set by gin through `train_retrieval.eval_rerank_weight` /
    `eval_prior_weight` / `eval_rerank_temperature`."""

    weight: float = 0.0
    temperature: float = 1.0
    prior_weight: float = 0.0

    def __post_init__(self):
        for name in ("weight", "prior_weight"):
            value = getattr(self, name)
            if value < 0 or not np.isfinite(value):
                raise ValueError(f"RerankConfig.{name} must be a finite number >= 0, got {value}")
        if not self.temperature > 0:
            raise ValueError(f"RerankConfig.temperature must be > 0, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        """Whether the dense towers change the ranking at all (prior or rerank)."""
        return self.weight > 0 or self.prior_weight > 0


def window_voken_vectors(voken_vectors: np.ndarray, first_token: int, window: tuple[int, int]) -> np.ndarray:
    """[window size, d]: the vectors of tokens `first_token`, `first_token + 1`, ... placed at their columns of
    a model's output-head `window` (first column, size), zero rows elsewhere (the voken prior's matrix)."""
    start, size = window
    lo, count = first_token - start, len(voken_vectors)
    if lo < 0 or lo + count > size:
        raise ValueError(f"the voken prior's tokens [{first_token}, {first_token + count}) are not inside the "
                         f"model's identifier window [{start}, {start + size})")
    out = np.zeros((size, voken_vectors.shape[1]), np.float32)
    out[lo:lo + count] = voken_vectors
    return out


def voken_prior(aligned_queries: ArrayT, window_vectors: ArrayT, weight: float, temperature: float) -> ArrayT:
    """The aligned-voken prior's per-step scores [q, window size] (`RerankConfig`): weight / temperature *
    <t, c_token> for aligned query vectors t [q, d] and the window's voken vectors [window size, d]
    (`window_voken_vectors`); numpy in the evaluation (`Reranker.voken_bias`), jax in training (`prior_bias`)."""
    return (weight / temperature) * (aligned_queries @ window_vectors.T)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Reranker:
    """The dense towers fused into a ranking (`RerankConfig`): the aligned-voken prior inside the search
    (`voken_bias`) and the rescoring of the beam's images after it (`__call__`).

    `image_embeddings` [n, d]: aligned vectors of the searchable images `image_ids` (row i = image i);
    `text_projection`: query features [q, f] -> aligned vectors [q, d] (None: the features are already
    aligned); `voken_vectors` [v, d]: codebook vectors of the tokens `first_token`, `first_token + 1`, ...
    (zero rows for tokens that are not vokens, e.g. collision suffixes), needed by the prior only. Cost per
    query is constant: a [v, d] product for the prior, the beam's images (b identifiers, expanded) for rerank."""

    def __init__(self, config: RerankConfig, image_ids: Sequence[str], image_embeddings: np.ndarray,
                 text_projection: Callable[[np.ndarray], np.ndarray] | None = None,
                 voken_vectors: np.ndarray | None = None, first_token: int = 0):
        image_embeddings = np.asarray(image_embeddings, np.float32)
        if image_embeddings.ndim != 2 or image_embeddings.shape[0] != len(image_ids):
            raise ValueError(f"Reranker: image_embeddings {image_embeddings.shape} must be [{len(image_ids)}, dim]")
        if voken_vectors is not None:
            voken_vectors = np.asarray(voken_vectors, np.float32)
            if voken_vectors.ndim != 2 or voken_vectors.shape[1] != image_embeddings.shape[1]:
                raise ValueError(f"Reranker: voken_vectors {voken_vectors.shape} must be [tokens, "
                                 f"{image_embeddings.shape[1]}]")
        elif config.prior_weight > 0:
            raise ValueError("Reranker: prior_weight > 0 needs the vokens' codebook vectors (voken_vectors)")
        self.config = config
        self.row = {image: i for i, image in enumerate(image_ids)}
        self.images = _unit_rows(image_embeddings)
        self.text_projection = text_projection
        self.voken_vectors, self.first_token = voken_vectors, int(first_token)

    def aligned_queries(self, query_features: np.ndarray) -> np.ndarray:
        """Aligned query vectors [q, d] of query features [q, f] (the text head's output, not re-normalised)."""
        x = np.asarray(query_features, np.float32)
        if x.ndim != 2:
            raise ValueError(f"Reranker: query features must be [queries, dim], got shape {x.shape}")
        x = self.text_projection(x) if self.text_projection is not None else x
        if x.shape[1] != self.images.shape[1]:
            raise ValueError(f"Reranker: aligned query dim {x.shape[1]} != image embedding dim {self.images.shape[1]}")
        return np.asarray(x, np.float32)

    def voken_bias(self, query_features: np.ndarray, window: tuple[int, int]) -> np.ndarray:
        """[q, window size] per-step scores of the aligned-voken prior over a model's output-head `window`
        (first column, size): prior_weight * <t, c_token> / temperature, 0 for tokens without a vector."""
        if self.voken_vectors is None:
            raise ValueError("the voken prior needs the vokens' codebook vectors (an RQ tokenizer's table)")
        vectors = window_voken_vectors(self.voken_vectors, self.first_token, window)
        return voken_prior(self.aligned_queries(query_features), vectors, self.config.prior_weight,
                           self.config.temperature).astype(np.float32)

    def embed_queries(self, query_features: np.ndarray) -> np.ndarray:
        """Unit aligned query vectors [q, d] of query features [q, f]."""
        return _unit_rows(self.aligned_queries(query_features))

    def __call__(self, rankings: Rankings, query_features: np.ndarray) -> Rankings:
        """`rankings` with each query's images reordered by the fused score (stable: ties keep the beam's
        order) and `image_scores` the fused scores; identifiers and their scores stay the beam's."""
        if len(query_features) != len(rankings.images):
            raise ValueError(f"Reranker: {len(query_features)} query feature rows for {len(rankings.images)} queries")
        if self.config.weight == 0:
            return rankings
        queries = self.embed_queries(query_features)
        scale = self.config.weight / self.config.temperature
        images, scores = [], []
        for q, (ids, gen) in enumerate(zip(rankings.images, rankings.image_scores, strict=True)):
            if not ids:
                images.append([])
                scores.append([])
                continue
            cos = self.images[[self.row[i] for i in ids]] @ queries[q]
            fused = np.asarray(gen, np.float64) + scale * cos.astype(np.float64)
            order = np.argsort(-fused, kind="stable")
            images.append([ids[i] for i in order])
            scores.append([float(fused[i]) for i in order])
        return rankings._replace(images=images, image_scores=scores)


def _gelu(x: np.ndarray) -> np.ndarray:
    """flax `nn.gelu` (tanh approximation) in numpy."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


class TextHead:
    """A tokenizer text head as numpy arrays (from heads.npz): features [q, f] -> aligned vectors [q, d]."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items() if k.startswith("text_")
                       and k != "text_normalize"}
        self.normalize = bool(arrays.get("text_normalize", True))
        first = next((self.arrays[k] for k in ("text_hidden_kernel", "text_out_kernel") if k in self.arrays), None)
        self.dim = None if first is None else first.shape[0]  # the feature dim the head takes

    @staticmethod
    def arrays(head: dict | None, normalize: bool) -> dict[str, np.ndarray]:
        """heads.npz arrays of a flax `ProjectionHead`'s params (None: no head, features used as given)."""
        out = {"text_normalize": np.asarray(normalize)}
        for layer in ("hidden", "out") if head else ():
            if layer in head:
                out[f"text_{layer}_kernel"] = np.asarray(head[layer]["kernel"], np.float32)
                out[f"text_{layer}_bias"] = np.asarray(head[layer]["bias"], np.float32)
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        a = self.arrays
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"query features have dim {x.shape[1]}, the text head expects {self.dim}")
        if "text_hidden_kernel" in a:
            x = _gelu(x @ a["text_hidden_kernel"] + a["text_hidden_bias"])
        if "text_out_kernel" in a:
            x = x @ a["text_out_kernel"] + a["text_out_bias"]
        return _unit_rows(x) if self.normalize else x


def save_heads(out_dir: str | Path, image_ids: Sequence[str], image_embeddings: np.ndarray,
               text_head: dict[str, np.ndarray], rerank: RerankConfig, voken_vectors: np.ndarray | None = None,
               first_token: int = 0) -> Path:
    """Write DIR/heads.npz (module docstring): what `load_reranker` needs to fuse the dense towers into the
    ranking of the set's images (`voken_vectors` from `first_token` on: the aligned-voken prior)."""
    path = Path(out_dir) / HEADS_FILE
    vokens = {} if voken_vectors is None else {"voken_vectors": np.asarray(voken_vectors, np.float32),
                                               "voken_first_token": np.int64(first_token)}
    np.savez(path, image_ids=np.asarray(list(image_ids), dtype=str),
             image_embeddings=np.asarray(image_embeddings, np.float32), rerank_weight=np.float64(rerank.weight),
             rerank_temperature=np.float64(rerank.temperature), prior_weight=np.float64(rerank.prior_weight),
             **vokens, **text_head)
    return path


def load_reranker(checkpoint: str | Path, weight: float | None = None, temperature: float | None = None,
                  prior_weight: float | None = None) -> Reranker:
    """The `Reranker` of a retrieval checkpoint's heads.npz; `weight` / `temperature` / `prior_weight` None:
    the stored ones."""
    path = Path(checkpoint) / HEADS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: this retrieval checkpoint has no dense towers, it cannot rerank (train "
                                "with an RQ / heads tokenizer to have them exported)")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    stored = float(arrays["prior_weight"]) if "prior_weight" in arrays else 0.0
    config = RerankConfig(float(arrays["rerank_weight"]) if weight is None else weight,
                          float(arrays["rerank_temperature"]) if temperature is None else temperature,
                          stored if prior_weight is None else prior_weight)
    if config.prior_weight > 0 and "voken_vectors" not in arrays:
        raise ValueError(f"{path}: no voken_vectors (the identifiers have no codebook): the voken prior is "
                         "unavailable, use prior weight 0")
    return Reranker(config, [str(i) for i in arrays["image_ids"]], arrays["image_embeddings"], TextHead(arrays),
                    arrays.get("voken_vectors"), int(arrays.get("voken_first_token", 0)))


def generated_sequence(row: Sequence[int]) -> Identifier:
    """A free-generation output row `[max_length]` as a sequence: cut after its first EOS, else all of it
    (PAD after an EOS is the search's filler; a PAD before one was generated and stays)."""
    row = [int(t) for t in row]
    return tuple(row[: row.index(EOS_ID) + 1] if EOS_ID in row else row)


class RetrievalModel:
    """T5 generative retrieval: query encoding, loss, beam search and ranking (see the module docstring).

    `window` = (first column, size) of the vocabulary the identifiers live in (`identifier_window`).
    Batches of `loss` carry "inputs" [b, L], "targets" [b, T] (identifier ids, PAD-padded), "valid" [b],
    "query_row" [b] (-1 on memorize and pseudo-query rows), optionally "relevant" [b, R, T] / "relevant_valid"
    [b, R] (the query's other relevant identifiers, `RetrievalLossConfig.max_relevant`) and, with an image prefix
    (`config.num_image_tokens`), "image_features" [b, d] and "has_image" [b].
    """

    def __init__(self, config: T5Config, vocab: Vocabulary | None, *, window: tuple[int, int], input_length: int,
                 target_length: int, retrieve_instruction: str = "", score_normalization: str = "vocab",
                 share_first_step: bool = True, score_forced_steps: bool = True,
                 loss: RetrievalLossConfig | None = None, query_head: TextHead | None = None,
                 max_alpha: float = 0.0, text_dropout: float = 0.0):
        """`vocab` None: a model over already tokenized inputs (benchmarks); it cannot encode texts or save.
        `query_head`: a query-conditioned model (`QueryConditioning`): raw query text features -> the aligned
        vector the encoder's prefix projection takes (needs `config.num_image_tokens`); `max_alpha`: its
        training-time interpolation towards the target image's aligned vector ("target_features"); `text_dropout`:
        its training-time whole-text dropout (`QueryConditioning.text_dropout`)."""
        if vocab is not None and config.vocab_size < vocab.size:
            raise ValueError(f"model vocabulary {config.vocab_size} is smaller than the text vocabulary + new "
                             f"tokens ({vocab.text_size} + {vocab.num_new})")
        if input_length < 1 or target_length < 1:
            raise ValueError(f"input_length and target_length must be >= 1, got {input_length}, {target_length}")
        start, size = window
        if start < 0 or size < 1 or start + size > config.vocab_size:
            raise ValueError(f"identifier window {tuple(window)} is outside the model vocabulary {config.vocab_size}")
        BeamSearchOptions(score_normalization=score_normalization)  # validates the name
        self.config, self.vocab, self.window = config, vocab, (int(start), int(size))
        self.input_length, self.target_length = input_length, target_length
        self.retrieve_instruction, self.score_normalization = retrieve_instruction, score_normalization
        self.share_first_step, self.score_forced_steps = share_first_step, bool(score_forced_steps)
        self.loss_config = loss or RetrievalLossConfig()
        if query_head is not None and not config.num_image_tokens:
            raise ValueError("a query-conditioned RetrievalModel needs T5Config.num_image_tokens (the prefix length)")
        if text_dropout > 0 and query_head is None:
            raise ValueError("QueryConditioning.text_dropout > 0 needs a query-conditioned model (the prefix is all "
                             "a row without its text keeps)")
        self.query_head, self.max_alpha, self.text_dropout = query_head, float(max_alpha), float(text_dropout)
        # Instruction pieces (before the query text) that input token dropout keeps.
        self._instruction_length = (len(vocab.encode(retrieve_instruction, add_eos=False))
                                    if vocab is not None and retrieve_instruction else 0)
        self.module = T5(config)
        self._searches: dict[tuple, Any] = {}  # search settings -> jitted search

    def replace(self, **changes: Any) -> RetrievalModel:
        """A copy with some constructor fields changed (e.g. `input_length`, `score_normalization`)."""
        names = [n for n in inspect.signature(RetrievalModel.__init__).parameters if n != "self"]
        fields = {n: getattr(self, "loss_config" if n == "loss" else n) for n in names}  # every field is kept
        return RetrievalModel(**(fields | changes))

    # ------------------------------------------------------------------------------------------------ queries

    @property
    def conditioned(self) -> bool:
        """Whether queries need their text features (the encoder prefix, `QueryConditioning`)."""
        return self.query_head is not None

    def aligned_queries(self, query_features: np.ndarray | None, num_queries: int) -> np.ndarray:
        """[num_queries, d] prefix vectors of a conditioned model: its text head on raw query text features."""
        if query_features is None:
            raise ValueError("this model is query-conditioned: ranking needs the queries' text features "
                             "(query_features / --query_features FILE.npy, one row per query)")
        x = np.asarray(query_features, np.float32)
        if x.ndim != 2 or len(x) != num_queries:
            raise ValueError(f"query features of shape {x.shape}: expected one row per query ({num_queries})")
        if not np.isfinite(x).all():
            raise ValueError("query features contain NaN/inf")
        x = np.asarray(self.query_head(x), np.float32)
        if x.shape[1] != self.config.image_feature_dim:
            raise ValueError(f"aligned query dim {x.shape[1]} != the prefix projection's input dim "
                             f"{self.config.image_feature_dim}")
        return x

    def tokenize(self, text: str) -> list[int]:
        """Instruction + query text as EOS-terminated token ids, not yet cut to the input length."""
        if self.vocab is None:
            raise ValueError("this RetrievalModel has no vocabulary (built over token ids): it cannot encode text")
        return self.vocab.encode(with_instruction(self.retrieve_instruction, text))

    def truncate(self, ids: Sequence[int]) -> list[int]:
        """The one truncation rule: ids longer than `input_length` keep their first `input_length - 1` tokens
        and their last one (the EOS), so a cut query still ends like every training input."""
        ids = list(ids)
        return ids if len(ids) <= self.input_length else ids[: self.input_length - 1] + ids[-1:]

    def encode_queries(self, texts: Sequence[str], source: str = "query") -> np.ndarray:
        """`[len(texts), input_length]` int32 encoder inputs (PAD-padded) of query texts.

        An empty or whitespace-only query is an error naming its position; queries cut to the input length
        are reported once per call (count and the first one's position)."""
        out = np.zeros((len(texts), self.input_length), np.int32)
        cut = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{source} {i}: empty query {text!r}; a query needs at least one non-space "
                                 "character")
            ids = self.tokenize(text)
            if len(ids) > self.input_length:
                cut.append(i)
            ids = self.truncate(ids)
            out[i, : len(ids)] = ids
        if cut:
            print(f"{len(cut)} of {len(texts)} {source} texts are longer than the model's input length "
                  f"{self.input_length} tokens and were cut (first: {source} {cut[0]})", file=sys.stderr, flush=True)
        return out

    # ----------------------------------------------------------------------------------------------- training

    def init_params(self, rng: jax.Array) -> Any:
        ids = jnp.ones((1, self.input_length), jnp.int32)
        image = (jnp.zeros((1, self.config.image_feature_dim), jnp.float32) if self.config.num_image_tokens
                 else None)
        return self.module.init(rng, ids, jnp.ones((1, self.target_length), jnp.int32), image)["params"]

    def interpolate(self, batch: dict, rng: jax.Array | None) -> dict:
        """Training-time prefix interpolation of a conditioned model (`QueryConditioning.max_alpha`): query rows'
        "image_features" q become q + α ("target_features" − q), α ~ U(0, max_alpha); other rows unchanged."""
        if rng is None or not self.conditioned or self.max_alpha <= 0 or "target_features" not in batch:
            return batch
        q = batch["image_features"]
        alpha = jax.random.uniform(rng, q.shape[:1], q.dtype, 0.0, self.max_alpha) * (batch["query_row"] >= 0)
        return {**batch, "image_features": q + alpha[:, None] * (batch["target_features"] - q)}

    def drop_input_tokens(self, batch: dict, rng: jax.Array) -> dict:
        """Training-time input dropout of query and pseudo-query rows (never memorize rows, the EOS, PAD or the
        instruction prefix): each query text piece becomes PAD with probability
        `RetrievalLossConfig.input_token_dropout` (a row's last remaining piece kept), and a conditioned model's
        row loses ALL its query text pieces with probability `QueryConditioning.text_dropout`."""
        p, p_text = self.loss_config.input_token_dropout, self.text_dropout
        if p <= 0 and p_text <= 0:
            return batch
        ids = batch["inputs"]
        position = jnp.arange(ids.shape[1])[None, :]
        text = (ids != PAD_ID) & (ids != EOS_ID) & (position >= self._instruction_length)
        text &= (batch["query_row"] != MEMORIZE_ROW)[:, None]
        drop = jnp.zeros_like(text)
        if p > 0:
            drop = jax.random.bernoulli(rng, p, ids.shape) & text
            drop &= jnp.any(text & ~drop, axis=1, keepdims=True)  # never a row's last piece
        if p_text > 0:
            drop |= text & jax.random.bernoulli(jax.random.fold_in(rng, 1), p_text, ids.shape[:1])[:, None]
        return {**batch, "inputs": jnp.where(drop, PAD_ID, ids)}

    def encode(self, params: Any, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Encoder states and key mask of a batch (dropout on when `rng` is given); rows with an image
        prefix (memorize rows) keep it, query rows mask it out."""
        deterministic = rng is None
        rngs = None if rng is None else {"dropout": rng}
        if self.config.num_image_tokens:
            return self.module.apply({"params": params}, batch["inputs"], batch["image_features"],
                                     batch["has_image"], deterministic, method=_encode_rows, rngs=rngs)
        encoded = self.module.apply({"params": params}, batch["inputs"], None, deterministic, method=T5.encode,
                                    rngs=rngs)
        return encoded, encoder_input_mask(batch["inputs"])

    def decode(self, params: Any, encoded: jax.Array, mask: jax.Array, targets: jax.Array,
               rng: jax.Array | None) -> jax.Array:
        """Teacher-forced logits [rows, T, vocab] of `targets` [rows, T]."""
        return self.module.apply({"params": params}, encoded, mask, shift_right(targets), deterministic=rng is None,
                                 method=T5.decode, rngs=None if rng is None else {"dropout": rng})

    def candidates(self, params: Any, input_ids: jax.Array, tables: Any,
                   prefix_features: jax.Array | None = None, token_bias: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
        """Eq. 8: the top-b train identifiers of each query by constrained beam search, no gradient
        (`prefix_features`: a conditioned model's prefix vectors; `token_bias`: the aligned-voken prior).

        Returns tokens [b, beam, T] (PAD-padded to the target length) and validity [b, beam].
        """
        result = self.beam_search(jax.lax.stop_gradient(params), input_ids, tables,
                                  beam_size=self.loss_config.beam_size,
                                  prefix_features=None if prefix_features is None
                                  else jax.lax.stop_gradient(prefix_features),
                                  token_bias=None if token_bias is None else jax.lax.stop_gradient(token_bias))
        tokens = result.tokens
        if tokens.shape[-1] > self.target_length:
            raise ValueError(f"trie identifiers have {tokens.shape[-1]} tokens > target length {self.target_length}")
        tokens = jnp.pad(tokens, ((0, 0), (0, 0), (0, self.target_length - tokens.shape[-1])))
        return jax.lax.stop_gradient(tokens), result.groups >= 0

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array, constants: Any
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Eq. 10 for one batch; `constants[TRAIN_TRIE]` are the train trie's tables (L_dis only)."""
        cfg = self.loss_config
        weights = batch["valid"].astype(jnp.float32)  # [b]
        dis_rows = batch["query_row"] >= 0  # L_dis on real TRAIN queries (+ pseudo-queries when configured)
        if cfg.discriminative_pseudo_queries:
            dis_rows |= batch["query_row"] == PSEUDO_ROW
        query_weights = weights * dis_rows
        targets = batch["targets"]  # [b, T]
        batch = self.interpolate(batch, jax.random.fold_in(rng, 3))
        batch = self.drop_input_tokens(batch, jax.random.fold_in(rng, 4))
        encoded, mask = self.encode(params, batch, jax.random.fold_in(rng, 0))
        decode_rng = jax.random.fold_in(rng, 1)
        lam = cfg.weight_at(step)

        def generative_only(_):
            logits = self.decode(params, encoded, mask, targets, decode_rng)
            total, metrics = losses.generative_loss(logits, targets, weights, cfg.z_loss, cfg.generative_reduction)
            total, metrics = self.add_distillation(total, metrics, logits, batch, targets, weights, constants)
            return total, {**metrics, "dis_loss": jnp.zeros(()), "positive_in_beam": jnp.zeros(())}

        def with_discriminative(_):
            prefix = batch["image_features"] if self.conditioned else None
            bias = self.prior_bias(batch, constants)  # [b, window] or None
            cands, valid = self.candidates(params, batch["inputs"], constants[TRAIN_TRIE], prefix,
                                           bias)  # [b, k, T]
            cands, positive, valid, found = losses.inject_positive(cands, valid, targets,
                                                                   jax.random.fold_in(rng, 2))
            keep = losses.duplicate_free(cands, valid)
            if cfg.max_relevant and "relevant" in batch:  # other relevant images are not negatives
                keep &= ~losses.relevant_mask(cands, batch["relevant"], batch["relevant_valid"], positive)
            b, k, t = cands.shape
            # All b*k candidates in one teacher-forced pass: [b*k, T, vocab].
            logits = self.decode(params, jnp.repeat(encoded, k, axis=0), jnp.repeat(mask, k, axis=0),
                                 cands.reshape(b * k, t), decode_rng).reshape(b, k, t, -1)
            scores = losses.sequence_scores(logits, cands, cfg.discriminative_score)  # [b, k]
            if bias is not None:  # the fused score the search ranked by; the gradient reaches the generator only
                scores = scores + losses.token_bias_sums(cands, bias, self.window[0])
            dis = losses.listwise_loss(scores, positive, keep)  # [b]
            dis_weights = query_weights * found if cfg.discriminative_found_only else query_weights
            dis_loss = losses.weighted_mean(dis, dis_weights)
            positive_logits = jnp.take_along_axis(logits, positive[:, None, None, None], axis=1)[:, 0]
            gen, metrics = losses.generative_loss(positive_logits, targets, weights, cfg.z_loss,
                                                  cfg.generative_reduction)
            gen, metrics = self.add_distillation(gen, metrics, positive_logits, batch, targets, weights, constants)
            metrics.update(dis_loss=dis_loss, positive_in_beam=losses.weighted_mean(found, query_weights))
            return gen + lam * dis_loss, metrics

        if cfg.discriminative_weight == 0:
            total, metrics = generative_only(None)
        else:
            total, metrics = jax.lax.cond(lam > 0, with_discriminative, generative_only, None)
        return total, {**metrics, "dis_weight": lam}

    def add_distillation(self, total: jax.Array, metrics: dict, logits: jax.Array, batch: dict, targets: jax.Array,
                         weights: jax.Array, constants: Any) -> tuple[jax.Array, dict]:
        """`total` + distill_weight · L_distill over the batch's query and pseudo-query rows (teacher-forced
        `logits` [b, T, V] of `targets`), "distill_loss" in `metrics`; unchanged when distillation is off."""
        cfg = self.loss_config
        if cfg.distill_weight == 0:
            return total, metrics
        if "prior_query" not in batch or not constants or DISTILL_IMAGES not in constants:
            raise ValueError("RetrievalLossConfig.distill_weight > 0 needs the batch's 'prior_query' aligned text "
                             f"vectors and the loss constants' {DISTILL_IMAGES!r} / {DISTILL_TOKENS!r} "
                             "(train_retrieval builds them)")
        teacher, defined = losses.trie_teacher(batch["prior_query"], constants[DISTILL_IMAGES],
                                               constants[DISTILL_TOKENS], targets, cfg.distill_temperature,
                                               *self.window)
        rows = weights * ((batch["query_row"] >= 0) | (batch["query_row"] == PSEUDO_ROW))
        distill = losses.distillation_loss(logits, teacher, defined, self.window[0], rows, cfg.generative_reduction)
        return total + cfg.distill_weight * distill, {**metrics, "distill_loss": distill}

    def prior_bias(self, batch: dict, constants: Any) -> jax.Array | None:
        """[b, window size] aligned-voken prior of a batch for L_dis over fused scores (`prior_weight` > 0):
        prior_weight / prior_temperature * <"prior_query", voken vector> per window column; None when off."""
        cfg = self.loss_config
        if cfg.prior_weight == 0:
            return None
        if "prior_query" not in batch or not constants or PRIOR_VECTORS not in constants:
            raise ValueError("RetrievalLossConfig.prior_weight > 0 needs the batch's 'prior_query' aligned text "
                             f"vectors and the loss constants' {PRIOR_VECTORS!r} (train_retrieval builds both)")
        vectors = constants[PRIOR_VECTORS]
        if vectors.shape[0] != self.window[1]:
            raise ValueError(f"{PRIOR_VECTORS} has {vectors.shape[0]} rows for an identifier window of "
                             f"{self.window[1]} columns")
        return voken_prior(batch["prior_query"].astype(jnp.float32), vectors, cfg.prior_weight, cfg.prior_temperature)

    # --------------------------------------------------------------------------------------------- prediction

    def beam_search(self, params: Any, input_ids: jax.Array, tables: Any, *, beam_size: int,
                    max_length: int | None = None, eos_id: int | None = None,
                    prefix_features: jax.Array | None = None, token_bias: jax.Array | None = None,
                    **decode_options: Any) -> BeamSearchResult:
        """Pure (jit-able) beam search for `input_ids [batch, input_length]`: trie-constrained over `tables`,
        or free generation with `tables=None` for `max_length` steps, a beam ending at `eos_id`.
        `prefix_features` [batch, d]: a conditioned model's ALIGNED prefix vectors (`aligned_queries`).
        `token_bias` [batch, window size]: per-query step scores (the aligned-voken prior, `Reranker.voken_bias`).
        `decode_options` go to `t5_beam_search` (e.g. `head_chunk_size`)."""
        if self.conditioned and prefix_features is None:
            raise ValueError("this model is query-conditioned: beam_search needs prefix_features")
        options = BeamSearchOptions(beam_size=beam_size, score_normalization=self.score_normalization,
                                    share_first_step=self.share_first_step,
                                    score_forced_steps=self.score_forced_steps)
        return t5_beam_search(params, self.config, input_ids, tables, options=options, window=self.window,
                              max_length=max_length, eos_id=eos_id, prefix_features=prefix_features,
                              token_bias=token_bias, **decode_options)

    def search_fn(self, beam_size: int, *, max_length: int | None = None, eos_id: int | None = None,
                  out_sharding: Any = None, **decode_options: Any) -> Callable[..., BeamSearchResult]:
        """`jit(beam_search)(params, tables, input_ids, prefix_features=None, token_bias=None)`, compiled once per
        setting (params and tables are inputs, so other image sets and other weights reuse it)."""
        key = (beam_size, max_length, eos_id, out_sharding, tuple(sorted(decode_options.items())))
        if key not in self._searches:
            def search(params, tables, input_ids, prefix_features=None, token_bias=None):
                return self.beam_search(params, input_ids, tables, beam_size=beam_size, max_length=max_length,
                                        eos_id=eos_id, prefix_features=prefix_features, token_bias=token_bias,
                                        **decode_options)

            self._searches[key] = jax.jit(search, out_shardings=out_sharding)
        return self._searches[key]

    def rank(self, params: Any, input_ids: np.ndarray, index: SearchIndex, *, beam_size: int,
             constrained: bool = True, batch_size: int = 32, out_sharding: Any = None,
             rerank: Reranker | None = None, query_features: np.ndarray | None = None) -> Rankings:
        """Ranked images of encoded queries `input_ids [n, input_length]` over `index`.

        Constrained: identifier groups of the trie expanded to their images (table order within a group).
        Free generation (GRACE's "w/o constrained generation"): each sequence, cut after its EOS, retrieves
        images only when it is exactly an identifier of the set. Queries go through in fixed batches of
        `batch_size` (one compiled shape).

        `rerank`: fusion with the dense towers from the queries' `query_features` [n, f] (one row per query):
        the aligned-voken prior inside the search (`RerankConfig.prior_weight`) and/or generate-then-rerank, the
        beam's images rescored and fused with the search score (`RerankConfig.weight`; `Reranker`).
        A query-conditioned model needs `query_features` (raw text features): its text head maps them to the
        encoder prefix vectors (`aligned_queries`)."""
        prefixes = self.aligned_queries(query_features, len(input_ids)) if self.conditioned else None
        fuse = rerank is not None and rerank.config.enabled
        if fuse:
            if query_features is None:
                raise ValueError("rank: fusion with the dense towers (rerank / voken prior) needs the queries' "
                                 "features (query_features)")
            if len(query_features) != len(input_ids):
                raise ValueError(f"rank: {len(query_features)} query feature rows for {len(input_ids)} queries")
        bias = rerank.voken_bias(query_features, self.window) if fuse and rerank.config.prior_weight > 0 else None
        lo_tok, hi_tok = index.trie.token_range
        start, size = self.window
        if index.trie.num_identifiers and (lo_tok < start or hi_tok > start + size):
            raise ValueError(f"the image set's identifier tokens [{lo_tok}, {hi_tok}) lie outside the model's "
                             f"identifier window [{start}, {start + size})")
        if constrained:
            search, tables = self.search_fn(beam_size, out_sharding=out_sharding), index.trie.tables
        else:
            search = self.search_fn(beam_size, max_length=index.max_length, eos_id=EOS_ID, out_sharding=out_sharding)
            tables = None
        out = Rankings([], [], [], [], None if constrained else [])
        for lo in range(0, len(input_ids), batch_size):
            chunk = input_ids[lo:lo + batch_size]
            padded = np.zeros((batch_size, input_ids.shape[1]), np.int32)  # one compiled shape
            padded[: len(chunk)] = chunk
            extra = {}
            if prefixes is not None:
                extra["prefix_features"] = jnp.asarray(_pad_rows(prefixes[lo:lo + batch_size], batch_size))
            if bias is not None:
                extra["token_bias"] = jnp.asarray(_pad_rows(bias[lo:lo + batch_size], batch_size))
            result = jax.device_get(search(params, tables, jnp.asarray(padded), **extra))
            for q in range(len(chunk)):
                if constrained:
                    self._rank_constrained(out, index.trie, result.groups[q], result.scores[q])
                else:
                    self._rank_generated(out, index, result.tokens[q], result.scores[q])
        if fuse:
            out = rerank(out, query_features)
        return out

    @staticmethod
    def _rank_constrained(out: Rankings, trie: Trie, groups: np.ndarray, scores: np.ndarray) -> None:
        ranked = trie.ranked_images(groups.tolist(), scores.tolist())
        out.images.append([image for image, _ in ranked])
        out.image_scores.append([score for _, score in ranked])
        valid = groups >= 0
        out.identifiers.append([tuple(int(t) for t in trie.group_tokens[g][:trie.group_lengths[g]])
                                for g in groups[valid]])
        out.identifier_scores.append([float(s) for s in scores[valid]])

    @staticmethod
    def _rank_generated(out: Rankings, index: SearchIndex, rows: np.ndarray, scores: np.ndarray) -> None:
        generated = [(generated_sequence(row), float(s)) for row, s in zip(rows, scores, strict=True)
                     if np.isfinite(s)]
        valid = [(seq, s) for seq, s in generated if seq in index.groups]
        out.generated.append([seq for seq, _ in generated])
        out.identifiers.append([seq for seq, _ in valid])
        out.identifier_scores.append([s for _, s in valid])
        out.images.append([image for seq, _ in valid for image in index.groups[seq]])
        out.image_scores.append([s for seq, s in valid for _ in index.groups[seq]])

    # --------------------------------------------------------------------------------------------- checkpoint

    def spec(self) -> dict[str, Any]:
        """What a retrieval checkpoint stores beside the weights, table and SentencePiece model."""
        return {"input_length": self.input_length, "target_length": self.target_length,
                "retrieve_instruction": self.retrieve_instruction, "window": list(self.window),
                "score_normalization": self.score_normalization, "share_first_step": self.share_first_step,
                "score_forced_steps": self.score_forced_steps, "num_extra_ids": self.vocab.num_extra_ids,
                **({"query_conditioning": {"num_prefix_tokens": self.config.num_image_tokens,
                                           "feature_dim": self.config.image_feature_dim}} if self.conditioned else {})}

    def save_checkpoint(self, out_dir: str | Path, params: Any, table: IdentifierTable) -> Path:
        """Write the retrieval checkpoint layout (module docstring) for searching `table`'s images.

        An image prefix (GRACE memorize rows) is only used in training; queries are text, so its projection
        is left out of the exported model. A query-conditioned model keeps it (with its text head) in
        query_conditioning.npz."""
        if self.vocab is None:
            raise ValueError("a RetrievalModel without a vocabulary cannot be saved as a retrieval checkpoint")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = self.config
        if config.num_image_tokens:
            if self.conditioned:
                head = self.query_head
                np.savez(out / CONDITIONING_FILE, text_normalize=np.asarray(head.normalize), **head.arrays,
                         **{k: np.asarray(jax.device_get(params["encoder"][k]), np.float32) for k in PREFIX_PARAMS})
            params = {**params, "encoder": {k: v for k, v in params["encoder"].items()
                                            if not k.startswith("image_projection")}}
            config = config.replace(num_image_tokens=0, image_feature_dim=0)
        save_hf_t5(params, config, out / MODEL_DIR)
        table.save(out / IDENTIFIERS_DIR)
        shutil.copyfile(self.vocab.path, out / SENTENCEPIECE_FILE)
        (out / SPEC_FILE).write_text(json.dumps(self.spec(), indent=2) + "\n")
        return out

    @classmethod
    def load_checkpoint(cls, checkpoint: str | Path, identifiers: str | Path | None = None,
                        dtype: str = "float32") -> tuple[RetrievalModel, Any, IdentifierTable]:
        """(model, params on device, table) of a retrieval checkpoint; `identifiers` overrides its image set
        (e.g. another split's table). `dtype` is the compute dtype ('bfloat16': float32 parameters, bf16
        activations, float32 accumulation and scores)."""
        root = Path(checkpoint)
        if not root.is_dir():
            raise FileNotFoundError(f"retrieval checkpoint directory not found: {root}")
        for name in (SENTENCEPIECE_FILE, SPEC_FILE):
            if not (root / name).exists():
                raise FileNotFoundError(f"retrieval checkpoint has no {name}: {root / name}")
        spec = read_json(root / SPEC_FILE, "retrieval model spec")
        missing = [k for k in ("input_length", "target_length", "retrieve_instruction", "window",
                               "score_normalization") if k not in spec]
        if missing:
            raise ValueError(f"{root / SPEC_FILE}: missing field(s) {missing}")
        params, config = load_hf_t5(root / MODEL_DIR, dropout_rate=0.0, dtype=dtype)
        query_head = None
        if "query_conditioning" in spec:
            params, config, query_head = _load_conditioning(root, spec["query_conditioning"], params, config)
        table = IdentifierTable.load(identifiers if identifiers is not None else root / IDENTIFIERS_DIR)
        vocab = table_vocabulary(table, root / SENTENCEPIECE_FILE)
        if "num_extra_ids" in spec and int(spec["num_extra_ids"]) != vocab.num_extra_ids:
            raise ValueError(f"{root / SPEC_FILE}: num_extra_ids {spec['num_extra_ids']} but the identifier table "
                             f"implies {vocab.num_extra_ids}")
        model = cls(config, vocab, window=tuple(spec["window"]), input_length=int(spec["input_length"]),
                    target_length=int(spec["target_length"]), retrieve_instruction=spec["retrieve_instruction"],
                    score_normalization=spec["score_normalization"],
                    share_first_step=bool(spec.get("share_first_step", True)),
                    score_forced_steps=bool(spec.get("score_forced_steps", True)), query_head=query_head)
        return model, jax.device_put(params), table


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """`x [n <= rows, ...]` as float32 with zero rows appended up to `rows` (one compiled batch shape)."""
    out = np.zeros((rows, *x.shape[1:]), np.float32)
    out[: len(x)] = x
    return out


def _load_conditioning(root: Path, spec: dict, params: Any, config: T5Config) -> tuple[Any, T5Config, TextHead]:
    """A conditioned checkpoint's prefix projection (back into the encoder params) and text head."""
    path = root / CONDITIONING_FILE
    if not path.exists():
        raise FileNotFoundError(f"query-conditioned retrieval checkpoint has no {CONDITIONING_FILE}: {path}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    missing = [k for k in PREFIX_PARAMS if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    k, f = int(spec["num_prefix_tokens"]), int(spec["feature_dim"])
    kernel = arrays.pop(PREFIX_PARAMS[0])
    if kernel.shape != (f, k, config.d_model):
        raise ValueError(f"{path}: prefix projection of shape {kernel.shape}, expected {(f, k, config.d_model)}")
    encoder = {**params["encoder"], PREFIX_PARAMS[0]: kernel, PREFIX_PARAMS[1]: arrays.pop(PREFIX_PARAMS[1])}
    return {**params, "encoder": encoder}, config.replace(num_image_tokens=k, image_feature_dim=f), TextHead(arrays)


def _encode_rows(module: T5, input_ids: jax.Array, image_features: jax.Array, has_image: jax.Array,
                 deterministic: bool) -> tuple[jax.Array, jax.Array]:
    """Encode a batch mixing memorize rows (image prefix) and query rows (prefix masked out)."""
    k = module.config.num_image_tokens
    mask = encoder_input_mask(input_ids, k).at[:, :k].set(has_image[:, None])  # [batch, k + length]
    return module.encoder(module.token_embedder(input_ids), mask, image_features, deterministic), mask


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
    """One query's ranking: images (identifier groups expanded in table order) and identifiers."""

    text: str
    image_ids: list[str]
    scores: list[float]  # of each image's identifier
    identifiers: list[Identifier]  # ranked identifiers (before expansion to images)
    identifier_scores: list[float]


class Retriever:
    """A loaded model, its weights and one image set: text queries -> top-k images (`avg-jax retrieve`)."""

    def __init__(self, model: RetrievalModel, params: Any, table: IdentifierTable, beam_size: int | None = None,
                 batch_size: int = 32, reranker: Reranker | None = None):
        """`beam_size` None: `BeamSearchOptions.beam_size` (gin). `reranker`: generate-then-rerank when
        `retrieve` is given query features (it must cover the table's images)."""
        self.beam_size = BeamSearchOptions().beam_size if beam_size is None else beam_size
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        self.model, self.params, self.table = model, params, table
        self.index = SearchIndex.from_table(table)
        self.batch_size = batch_size
        self.reranker = reranker
        if reranker is not None:
            missing = [i for i in table.image_ids if i not in reranker.row]
            if missing:
                raise ValueError(f"the reranker's heads cover none of {len(missing)} image(s) of the searched set, "
                                 f"e.g. {missing[0]!r}")

    @classmethod
    def load(cls, checkpoint: str | Path, identifiers: str | Path | None = None, dtype: str = "float32",
             **kwargs: Any) -> Retriever:
        """From a retrieval checkpoint (`RetrievalModel.load_checkpoint`)."""
        model, params, table = RetrievalModel.load_checkpoint(checkpoint, identifiers, dtype)
        return cls(model, params, table, **kwargs)

    def retrieve(self, texts: Sequence[str], k: int = 10, query_features: np.ndarray | None = None
                 ) -> list[RetrievalResult]:
        """Top-k images per text. The beam is max(beam_size, k), so k identifiers are always reachable.
        `query_features` [len(texts), f] (with a reranker): generate-then-rerank, `scores` the fused ones; a
        query-conditioned model needs them (its encoder prefix)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.model.conditioned and query_features is None:
            raise ValueError("this retrieval model is query-conditioned: retrieve needs the queries' text features "
                             "(query_features / --query_features FILE.npy, one row per query)")
        if query_features is not None:
            if self.reranker is None and not self.model.conditioned:
                raise ValueError("query features given but this Retriever has no reranker")
            query_features = np.asarray(query_features)
            if query_features.ndim != 2 or len(query_features) != len(texts):
                raise ValueError(f"query features of shape {query_features.shape}: expected one row per query "
                                 f"({len(texts)} queries)")
            if not np.isfinite(query_features).all():
                raise ValueError("query features contain NaN/inf")
        ids = self.model.encode_queries(texts)
        rerank = self.reranker if query_features is not None else None
        ranked = self.model.rank(self.params, ids, self.index, beam_size=max(self.beam_size, k),
                                 batch_size=self.batch_size, rerank=rerank, query_features=query_features)
        return [RetrievalResult(text, ranked.images[q][:k], ranked.image_scores[q][:k], ranked.identifiers[q],
                                ranked.identifier_scores[q]) for q, text in enumerate(texts)]


def model_window(table: IdentifierTable, vocab_size: int) -> tuple[int, int]:
    """The output-head window of a model whose identifiers are `table`'s (`identifier_window`)."""
    return identifier_window(build_trie(table), vocab_size, table.text_vocab_size)
