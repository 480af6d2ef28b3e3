"""Training examples for generative retrieval and their mixture (AVG: query -> identifier; GRACE adds
learning-to-memorize: image feature prefix + instruction -> identifier, and pseudo-queries).

Every example has "inputs" (instruction/query token ids) and "targets" (the image's identifier ids) plus,
when the model has an image prefix, "image_features" [d] and "has_image" (False on query rows, whose
prefix the encoder masks out). Rates are copies per epoch: rate 2.0 repeats every example twice, 0.5
keeps a seeded half.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gin
import numpy as np

from avg_jax.data.corpus import SPLITS, Corpus, normalize_rows, queries_by_image
from avg_jax.data.pipeline import Example, corpus_examples
from avg_jax.data.vocab import Vocabulary
from avg_jax.identifiers.table import IdentifierTable

MEMORIZE_MODES = ("mixed", "sequential")
PSEUDO_QUERY_SOURCES = ("nearest_image", "nearest_captions")
MEMORIZE_ROW, PSEUDO_ROW = -1, -2  # "query_row" of learning-to-memorize and pseudo-query examples
Tokenize = Callable[[str], Sequence[int]]
Projection = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class AlignedCorpus:
    """A corpus in the tokenizer's aligned space, its contrastive heads applied once per run: what the
    nearest-caption pseudo-queries, query conditioning and L_dis over fused scores all read."""

    # [queries, d] text head of the TRAIN queries' text features; the rows of val/test queries are NaN, never
    # projected: no training input can be made from a held-out caption (`query_vector` refuses such a row)
    text: np.ndarray | None  # None: the corpus has no text features
    image: np.ndarray  # [images, d] image head of its image features (every split: the gallery is indexed)

    @classmethod
    def project(cls, corpus: Corpus, text: Projection, image: Projection) -> AlignedCorpus:
        """The corpus' features through the (text, image) heads (e.g. `tokenizer_head_projections`): the text
        head over the TRAIN queries only, the image head over every image."""
        aligned_image = np.asarray(image(np.asarray(corpus.image_features, np.float32)), np.float32)
        if corpus.text_features is None:
            return cls(None, aligned_image)
        rows = corpus.query_rows("train")
        train_text = np.asarray(text(np.asarray(corpus.text_features[rows], np.float32)), np.float32)
        aligned_text = np.full((len(corpus.queries), train_text.shape[1]), np.nan, np.float32)
        aligned_text[rows] = train_text
        return cls(aligned_text, aligned_image)

    def text_vectors(self, needed_by: str) -> np.ndarray:
        """`text`, or an error naming what needs it when the corpus has no text features."""
        if self.text is None:
            raise ValueError(f"{needed_by} needs the corpus' text features (text_features.npy)")
        return self.text


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainMixture:
    """What the training stream is made of (gin: `TrainMixture.memorize_rate = 1.0` ...)."""

    retrieve_rate: float = 1.0  # copies of each TRAIN (query, relevant image) example
    memorize_rate: float = 0.0  # copies of each learning-to-memorize example (needs T5Config.num_image_tokens)
    memorize_splits: tuple[str, ...] = SPLITS  # the model must "index" every image it will retrieve
    memorize_mode: str = "mixed"  # 'mixed': one stream; 'sequential': memorize only for `memorize_steps` first
    memorize_steps: int = 0
    pseudo_query_rate: float = 0.0  # copies of the pseudo-query examples
    pseudo_queries_per_image: int = 1
    # 'nearest_image': the first caption of each of the k nearest TRAIN images (image-feature cosine);
    # 'nearest_captions': the k nearest distinct TRAIN caption texts in the tokenizer's aligned space (text head
    # of the captions' features vs image head of the image's feature; needs the tokenizer's heads).
    pseudo_query_source: str = "nearest_image"
    pseudo_queries_for_train: bool = False  # also for TRAIN images (which have their own captions)
    memorize_instruction: str = "Predict the identifier for the <image>"  # GRACE inst-m
    retrieve_instruction: str = ""  # GRACE inst-r: "Predict the image identifier corresponding to the given query"

    def __post_init__(self):
        for name in ("retrieve_rate", "memorize_rate", "pseudo_query_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainMixture.{name} must be >= 0, got {getattr(self, name)}")
        if self.memorize_mode not in MEMORIZE_MODES:
            raise ValueError(f"TrainMixture.memorize_mode must be one of {MEMORIZE_MODES}, got "
                             f"{self.memorize_mode!r}")
        bad = [s for s in self.memorize_splits if s not in SPLITS]
        if bad:
            raise ValueError(f"TrainMixture.memorize_splits: unknown split(s) {bad}; expected {list(SPLITS)}")
        if self.memorize_mode == "sequential" and self.memorize_steps <= 0:
            raise ValueError("TrainMixture: memorize_mode 'sequential' needs memorize_steps > 0")
        if self.pseudo_query_source not in PSEUDO_QUERY_SOURCES:
            raise ValueError(f"TrainMixture.pseudo_query_source must be one of {PSEUDO_QUERY_SOURCES}, got "
                             f"{self.pseudo_query_source!r}")
        if self.pseudo_queries_per_image < 1:
            raise ValueError(f"TrainMixture.pseudo_queries_per_image must be >= 1, got "
                             f"{self.pseudo_queries_per_image}")

    @property
    def uses_images(self) -> bool:
        return self.memorize_rate > 0 or self.memorize_mode == "sequential"

    @property
    def indexes(self) -> bool:
        """Whether training sees images beyond the TRAIN split (memorize rows or pseudo-queries)."""
        return self.uses_images or self.pseudo_query_rate > 0

    def indexed_splits(self) -> tuple[str, ...]:
        """The splits whose images the model is trained to emit: TRAIN, plus `memorize_splits` when indexing."""
        return tuple(dict.fromkeys(("train", *(self.memorize_splits if self.indexes else ()))))


def _image_fields(ex: Example, features: np.ndarray | None, has_image: bool) -> Example:
    if features is None:
        return ex
    return {**ex, "image_features": features.astype(np.float32), "has_image": np.bool_(has_image)}


def retrieve_examples(corpus: Corpus, table: IdentifierTable, tokenize: Tokenize, split: str,
                      image_dim: int | None) -> list[Example]:
    """One example per (query of `split`, relevant image): query tokens (`tokenize`, the model's query
    tokenization: instruction + text + EOS) -> identifier."""
    rows = table.index()
    _check_covered(corpus, table, split)
    examples = corpus_examples(corpus, split, tokenize, targets=lambda image_id: table.identifier(rows[image_id]))
    zeros = None if image_dim is None else np.zeros(image_dim, np.float32)
    return [_image_fields(ex, zeros, False) for ex in examples]


def memorize_examples(corpus: Corpus, table: IdentifierTable, vocab: Vocabulary, splits: tuple[str, ...],
                      instruction: str) -> list[Example]:
    """GRACE learning-to-memorize: (image feature prefix, instruction) -> identifier, for every image of
    `splits` (test images included: retrieval can only return what the model has memorised)."""
    rows = table.index()
    inputs = np.asarray(vocab.encode(instruction), np.int32)
    features = normalize_rows(corpus.image_features)
    out = []
    for split in splits:
        _check_covered(corpus, table, split)
        for i in corpus.image_rows(split):
            image_id = corpus.images[i].id
            ex = {"inputs": inputs, "query_row": np.int32(MEMORIZE_ROW), "image_row": np.int32(i),
                  "targets": np.asarray(table.identifier(rows[image_id]), np.int32)}
            out.append(_image_fields(ex, features[i], True))
    return out


def pseudo_query_examples(corpus: Corpus, table: IdentifierTable, tokenize: Tokenize, splits: tuple[str, ...],
                          per_image: int, image_dim: int | None, source: str = "nearest_image",
                          aligned: AlignedCorpus | None = None,
                          include_train: bool = False, text_rows: bool = False) -> list[Example]:
    """Pseudo-queries ("gallery indexing") for the images of `splits` (TRAIN images only with
    `include_train`), made ONLY from TRAIN captions (GRACE appendix A; never a val/test caption).

    GRACE generates them with an image-to-query model trained on the training pairs; here the generator is
    retrieval-based (`source`):
      'nearest_image'     the first TRAIN caption of each of the `per_image` nearest TRAIN images (cosine of
                          image features);
      'nearest_captions'  the `per_image` nearest distinct TRAIN caption texts in the tokenizer's aligned space:
                          cosine of the text head of the captions' features and the image head of the image's
                          feature (`aligned`).
    Rows have query_row PSEUDO_ROW (-2); `text_rows`: also "text_row", the donor caption's query row (its text
    feature is the row's query-conditioning vector, `condition_examples`).
    """
    if source not in PSEUDO_QUERY_SOURCES:
        raise ValueError(f"pseudo_query_examples: source must be one of {PSEUDO_QUERY_SOURCES}, got {source!r}")
    train_rows = corpus.query_rows("train")
    if source == "nearest_image":
        captioned = queries_by_image(corpus, train_rows)
        donors = np.array([i for i in corpus.image_rows("train") if corpus.images[i].id in captioned], np.int64)
        if donors.size == 0:
            raise ValueError("pseudo-queries need TRAIN images with TRAIN captions; the corpus has none")
        features = normalize_rows(corpus.image_features)
        donor_rows = [int(captioned[corpus.images[d].id][0]) for d in donors]
        donor_texts = [corpus.queries[j].text for j in donor_rows]

        def neighbours(rows: np.ndarray) -> np.ndarray:
            return features[rows] @ features[donors].T
    else:
        if aligned is None:
            raise ValueError("pseudo_query_source 'nearest_captions' needs the corpus in the tokenizer's aligned "
                             "space (AlignedCorpus)")
        aligned_text = aligned.text_vectors("pseudo_query_source 'nearest_captions'")
        texts: dict[str, int] = {}
        for j in train_rows:  # distinct caption texts, first row of each
            texts.setdefault(corpus.queries[j].text, int(j))
        if not texts:
            raise ValueError("pseudo-queries need TRAIN captions; the corpus has none")
        donor_texts, donor_rows = list(texts), list(texts.values())
        caption_emb = normalize_rows(aligned_text[donor_rows])

        def neighbours(rows: np.ndarray) -> np.ndarray:
            return normalize_rows(aligned.image[rows]) @ caption_emb.T
    rows_of = table.index()
    zeros = None if image_dim is None else np.zeros(image_dim, np.float32)
    out = []
    for split in splits:
        if split == "train" and not include_train:
            continue
        targets = corpus.image_rows(split)
        if targets.size == 0:
            continue
        _check_covered(corpus, table, split)
        for lo in range(0, targets.size, 1024):
            chunk = targets[lo:lo + 1024]
            nearest = np.argsort(-neighbours(chunk), axis=1, kind="stable")[:, :per_image]
            for i, near in zip(chunk, nearest, strict=True):
                target = np.asarray(table.identifier(rows_of[corpus.images[i].id]), np.int32)
                for d in near:
                    ex = {"inputs": np.asarray(tokenize(donor_texts[d]), np.int32),
                          "query_row": np.int32(PSEUDO_ROW), "image_row": np.int32(i), "targets": target}
                    if text_rows:
                        ex["text_row"] = np.int32(donor_rows[d])
                    out.append(_image_fields(ex, zeros, False))
    return out


def add_relevant(examples: list[Example], corpus: Corpus, table: IdentifierTable, max_relevant: int
                 ) -> list[Example]:
    """Each example plus "relevant" [R, max_len] (PAD-padded identifiers of its query's OTHER relevant images:
    those whose identifier differs from the target, first R in the query's order) and "relevant_valid" [R]
    (eqs. 8-9 with several relevant images, `RetrievalLossConfig.max_relevant`). Memorize and pseudo-query
    rows carry none."""
    rows = table.index()
    r, width = max(max_relevant, 1), table.max_len
    out = []
    for ex in examples:
        relevant = np.zeros((r, width), np.int32)
        valid = np.zeros((r,), bool)
        q = int(ex["query_row"])
        if q >= 0 and max_relevant > 0:
            target = tuple(int(t) for t in np.asarray(ex["targets"]) if t != 0)
            others = []
            for image_id in corpus.queries[q].image_ids:
                ident = table.identifier(rows[image_id])
                if ident != target and ident not in others:
                    others.append(ident)
            for k, ident in enumerate(others[:r]):
                relevant[k, :len(ident)] = ident
                valid[k] = True
        out.append({**ex, "relevant": relevant, "relevant_valid": valid})
    return out


def repeat_at_rate(examples: list[Example], rate: float, seed: int) -> list[Example]:
    """floor(rate) copies of every example plus one more with probability frac(rate) (seeded)."""
    whole, frac = int(np.floor(rate)), rate - np.floor(rate)
    extra = np.random.default_rng(seed).random(len(examples)) < frac
    return [ex for ex, e in zip(examples, extra, strict=True) for _ in range(whole + int(e))]


def build_mixture(corpus: Corpus, table: IdentifierTable, vocab: Vocabulary, tokenize: Tokenize,
                  mixture: TrainMixture, image_dim: int | None, seed: int,
                  aligned: AlignedCorpus | None = None,
                  max_relevant: int = 0, text_rows: bool = False) -> tuple[list[Example], list[Example]]:
    """(memorize-stage examples, main-stream examples); the first list is empty unless sequential.
    `aligned`: the corpus in the tokenizer's aligned space, for pseudo_query_source 'nearest_captions';
    `max_relevant` > 0: every example carries "relevant"/"relevant_valid" (`add_relevant`).

    Query and pseudo-query inputs are `tokenize(text)` (the model's query tokenization, which applies
    `mixture.retrieve_instruction`); memorize inputs are `vocab.encode(mixture.memorize_instruction)`."""
    if mixture.uses_images and image_dim is None:
        raise ValueError("TrainMixture uses learning-to-memorize but T5Config.num_image_tokens is 0: set "
                         "T5Config.num_image_tokens (the image prefix length)")
    stream = repeat_at_rate(retrieve_examples(corpus, table, tokenize, "train", image_dim), mixture.retrieve_rate,
                            seed)
    memorize: list[Example] = []
    if mixture.uses_images:
        memorize = memorize_examples(corpus, table, vocab, mixture.memorize_splits, mixture.memorize_instruction)
        stream += repeat_at_rate(memorize, mixture.memorize_rate, seed + 1)
    if mixture.pseudo_query_rate > 0:
        pseudo = pseudo_query_examples(corpus, table, tokenize, mixture.memorize_splits,
                                       mixture.pseudo_queries_per_image, image_dim, mixture.pseudo_query_source,
                                       aligned, mixture.pseudo_queries_for_train, text_rows)
        stream += repeat_at_rate(pseudo, mixture.pseudo_query_rate, seed + 2)
    if not stream:
        raise ValueError("TrainMixture yields no training examples (all rates are 0?)")
    if max_relevant > 0:
        stream, memorize = add_relevant(stream, corpus, table, max_relevant), add_relevant(memorize, corpus, table,
                                                                                              max_relevant)
    return (memorize if mixture.memorize_mode == "sequential" else []), stream


def condition_examples(examples: list[Example], aligned: AlignedCorpus) -> list[Example]:
    """Query conditioning (`QueryConditioning`): every example's "image_features" becomes its ALIGNED prefix
    vector and "has_image" True: query and pseudo-query rows the aligned text vector of their query
    (`query_vector`), memorize rows the aligned image vector of their image; "target_features" = the target
    image's aligned vector on query rows (interpolation), the row's own prefix elsewhere."""
    text = aligned.text_vectors("QueryConditioning")
    out = []
    for ex in examples:
        image = aligned.image[int(ex["image_row"])]
        query = query_vector(ex, text, "condition_examples")
        prefix = image if query is None else query
        target = image if int(ex["query_row"]) >= 0 else prefix
        out.append({**ex, "image_features": np.asarray(prefix, np.float32), "has_image": np.bool_(True),
                    "target_features": np.asarray(target, np.float32)})
    return out


def prior_examples(examples: list[Example], aligned_text: np.ndarray) -> list[Example]:
    """L_dis over fused scores and dense-to-generative distillation (`RetrievalLossConfig.prior_weight`,
    `distill_weight`): every example gets "prior_query" [d], the aligned text vector its voken prior / its
    distillation teacher is computed from (`query_vector`; zeros on memorize rows, which have neither)."""
    zeros = np.zeros(aligned_text.shape[1], np.float32)
    out = []
    for ex in examples:
        vector = query_vector(ex, aligned_text, "prior_examples")
        out.append({**ex, "prior_query": np.asarray(zeros if vector is None else vector, np.float32)})
    return out


def query_vector(ex: Example, aligned_text: np.ndarray, caller: str) -> np.ndarray | None:
    """The aligned text vector [d] of a row's query: a query row's own (`aligned_text[query_row]`), a pseudo-query
    row's donor TRAIN caption's ("text_row", `build_mixture(..., text_rows=True)`); None on memorize rows."""
    q = int(ex["query_row"])
    if q == PSEUDO_ROW:
        if "text_row" not in ex:
            raise ValueError(f"{caller}: a pseudo-query row without its donor caption's text_row (build_mixture(..., "
                             "text_rows=True))")
        q = int(ex["text_row"])
    elif q < 0:
        return None
    vector = aligned_text[q]
    if not np.isfinite(vector).all():
        raise ValueError(f"{caller}: query row {q} is not a TRAIN query (AlignedCorpus projects only those): a "
                         "held-out caption must not reach a training input")
    return vector


def _check_covered(corpus: Corpus, table: IdentifierTable, split: str) -> None:
    rows = table.index()
    missing = [corpus.images[i].id for i in corpus.image_rows(split) if corpus.images[i].id not in rows]
    if missing:
        raise ValueError(f"identifier table has no identifier for {len(missing)} {split} image(s) of the corpus, "
                         f"first {missing[:5]}")


class SequentialIterator:
    """`first` for `switch_after` batches, then `second`: GRACE's memorize-then-retrieve schedule.

    Checkpointable like a grain iterator (`get_state`/`set_state`, JSON-able state).
    """

    def __init__(self, first: Iterator, second: Iterator, switch_after: int):
        self.first, self.second, self.switch_after = first, second, switch_after
        self.consumed = 0

    def __iter__(self) -> SequentialIterator:
        return self

    def __next__(self) -> Any:
        it = self.first if self.consumed < self.switch_after else self.second
        batch = next(it)
        self.consumed += 1
        return batch

    def get_state(self) -> dict:
        return {"consumed": self.consumed, "first": self.first.get_state(), "second": self.second.get_state()}

    def set_state(self, state: dict | bytes) -> None:
        if isinstance(state, bytes):  # as grain's orbax handler hands over non-grain iterators' states
            state = json.loads(state)
        self.consumed = int(state["consumed"])
        self.first.set_state(state["first"])
        self.second.set_state(state["second"])

    def start_prefetch(self) -> None:
        for it in (self.first, self.second):
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()
