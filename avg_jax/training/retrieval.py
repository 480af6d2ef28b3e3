"""Training T5 generative retrieval (AVG / GRACE) on a corpus and its identifier table: `train_retrieval`,
the library function behind `avg-jax train`, the demo and the sweep.

Inputs: a corpus directory, an identifier table directory (its metadata names the SentencePiece model).
The run directory receives:
  checkpoints/            orbax: train state, data-iterator state, operative gin config (resumed on restart)
  metrics.jsonl, tb/      training and periodic-evaluation metrics (JSONL and TensorBoard events)
  operative_config.gin    the gin config in use
  run.json                inputs, T5Config, sequence lengths, the retrieve instruction
  ranked_<split>.jsonl    final ranked outputs of the evaluation split (`avg-jax eval --ranked` format)
  eval_<split>.json       final image-level R@1/5/10 of that split (and fit/... with train_retrieval.fit_queries)
  ranked_train_fit.jsonl  with fit_queries: the final ranked outputs of those TRAIN queries over the TRAIN images
  retrieval/              the trained `RetrievalModel` as a retrieval checkpoint (`avg-jax retrieve --checkpoint`)
                          over the evaluation split's images (all images without an evaluation split), with
                          heads.npz (the tokenizer's dense towers, for rerank) when the identifiers have a tokenizer
Everything that turns a query into model input or a ranking is the `RetrievalModel`'s (avg_jax.retrieval.model).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from avg_jax.data.corpus import Corpus
from avg_jax.data.pipeline import make_batch_iterator
from avg_jax.data.vocab import Vocabulary
from avg_jax.decoding.beam_search import BeamSearchOptions
from avg_jax.decoding.trie import build_trie
from avg_jax.evaluation.dense import head_projections
from avg_jax.evaluation.metrics import FIT_PREFIX
from avg_jax.identifiers.table import IdentifierTable, codebook_rows, table_voken_vectors
from avg_jax.json_io import write_json
from avg_jax.retrieval.model import (
    DISTILL_IMAGES,
    DISTILL_TOKENS,
    PRIOR_VECTORS,
    TRAIN_TRIE,
    QueryConditioning,
    RerankConfig,
    Reranker,
    RetrievalLossConfig,
    RetrievalModel,
    TextHead,
    model_window,
    save_heads,
    table_vocabulary,
    window_voken_vectors,
)
from avg_jax.t5.configs import T5Config
from avg_jax.t5.hf_io import load_hf_t5
from avg_jax.t5.model import init_params
from avg_jax.t5.vocab_expand import expand_vocab
from avg_jax.training.evaluator import FusionSelection, RetrievalEvaluator, rerank_path, select_fusion
from avg_jax.training.examples import (
    AlignedCorpus,
    SequentialIterator,
    TrainMixture,
    build_mixture,
    condition_examples,
    prior_examples,
)
from avg_jax.training.trainer import train_loop

RUN_FILE = "run.json"
FIT_RANKED = "ranked_train_fit.jsonl"  # the final ranked outputs of train_retrieval.fit_queries
RETRIEVAL_DIR = "retrieval"
VOKEN_INITS = ("none", "random", "codebook")


def load_vocabulary(table: IdentifierTable, table_dir: str | Path) -> Vocabulary:
    """The vocabulary of a tokenizer's identifier table: the SentencePiece model its metadata names (or a copy
    beside the table when the directory was moved) through `table_vocabulary`."""
    recorded = table.metadata.get("sentencepiece_model")
    if not recorded:
        raise ValueError(f"{table_dir}: identifier table metadata has no 'sentencepiece_model'")
    path = Path(recorded)
    if not path.exists() and (Path(table_dir) / path.name).exists():
        path = Path(table_dir) / path.name
    return table_vocabulary(table, path)


@gin.configurable(denylist=["model_config", "vocab", "table", "table_dir"])
def initial_t5_params(model_config: T5Config, vocab: Vocabulary, table: IdentifierTable, table_dir: str | Path,
                      voken_embedding_init: str = "none", pretrained_t5: str | None = None,
                      seed: int = 0) -> tuple[dict | None, T5Config]:
    """Starting parameters: None (the trainer's fresh init of the whole vocabulary) or a text-vocabulary T5
    (a HuggingFace checkpoint directory, or fresh) whose embedding gets the new tokens by `expand_vocab`:
    'codebook' = the paper's voken embedding (tokenizer codebook rows), 'random' = its ablation."""
    if voken_embedding_init not in VOKEN_INITS:
        raise ValueError(f"initial_t5_params.voken_embedding_init must be one of {VOKEN_INITS}, got "
                         f"{voken_embedding_init!r}")
    if voken_embedding_init == "none":
        if pretrained_t5:
            raise ValueError("initial_t5_params: a pretrained_t5 needs voken_embedding_init 'codebook' or 'random'")
        return None, model_config
    text_config = model_config.replace(vocab_size=vocab.text_size)
    if pretrained_t5:
        params, loaded = load_hf_t5(pretrained_t5)
        if loaded.vocab_size < vocab.text_size:
            raise ValueError(f"{pretrained_t5}: vocabulary {loaded.vocab_size} < the SentencePiece model's "
                             f"{vocab.text_size} text ids")
        text_config = loaded.replace(dropout_rate=model_config.dropout_rate, dtype=model_config.dtype,
                                     num_image_tokens=model_config.num_image_tokens,
                                     image_feature_dim=model_config.image_feature_dim, remat=model_config.remat)
    else:
        params = init_params(text_config, jax.random.key(seed))
    codebook = codebook_rows(table, table_dir) if voken_embedding_init == "codebook" else None
    params, config = expand_vocab(params, text_config, table.num_new_tokens, init=voken_embedding_init,
                                  codebook=codebook, rng=jax.random.key(seed + 1), text_size=vocab.text_size)
    if config.vocab_size != vocab.size:
        raise ValueError(f"expanded vocabulary {config.vocab_size} != {vocab.size} (text + new tokens, padded)")
    if config.num_image_tokens:  # the image-prefix projection is new: fresh weights beside the loaded ones
        params = _fill_missing(params, init_params(config, jax.random.key(seed + 2)))
    return params, config


def _fill_missing(params: dict, fresh: dict) -> dict:
    """`params` plus every entry of `fresh` that `params` lacks (nested dicts)."""
    out = dict(params)
    for k, v in fresh.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = _fill_missing(out[k], v)
    return out


def _round_up(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


@gin.configurable(denylist=["corpus_dir", "identifiers_dir", "run_dir"])
def train_retrieval(
    corpus_dir: str,
    identifiers_dir: str,
    run_dir: str,
    train_batch_size: int = 32,
    seed: int = 0,
    input_length: int | None = None,
    eval_split: str | None = "test",
    eval_beam_size: int = 10,
    eval_batch_size: int = 32,
    eval_max_queries: int | None = None,
    eval_constrained: bool = True,
    discriminative_images: str = "indexed",
    eval_rerank_weight: float = 0.0,
    eval_rerank_temperature: float = 1.0,
    eval_prior_weight: float = 0.0,
    fit_queries: int = 0,
) -> dict[str, Any]:
    """Train on the TRAIN queries (+ GRACE memorize/pseudo-query examples per `TrainMixture`), evaluate
    periodically on `eval_split` (`eval_max_queries` evenly spaced queries of it; the first ones would be a
    biased sample: corpus order groups similar queries) and finally on all its queries;
    `eval_constrained=False` evaluates by free generation (GRACE's "w/o constrained generation").
    `input_length=None`: the longest tokenized TRAINING input, rounded up to 8; a given length cuts longer
    inputs (training and evaluation alike); the numbers cut are printed.
    `discriminative_images`: the image set of L_dis's candidate trie (eq. 8): 'indexed' (default) = every image
    the model is trained to emit (TRAIN, plus `TrainMixture.memorize_splits` when pseudo-queries or memorize
    rows index them; = TRAIN otherwise), 'train' = TRAIN images only.
    `eval_rerank_weight` > 0 and/or `eval_prior_weight` > 0: the evaluation also reports the ranking fused with
    the dense towers (`RerankConfig`, towers = the tokenizer heads of `identifiers_dir`): the aligned-voken prior
    inside the search (each voken adds prior weight * <text vector, voken vector> / `eval_rerank_temperature`)
    and/or generate-then-rerank (fused score = search score + weight * cosine / `eval_rerank_temperature`),
    under `rerank/`, with ranked_<split>_rerank.jsonl beside ranked_<split>.jsonl.
    `fit_queries` > 0: every evaluation also ranks that many TRAIN queries (evenly spaced over the corpus' train
    queries) over the TRAIN images and reports their metrics under `fit/`: how well the generator fits what
    it was trained on, beside how it generalises (a generator that cannot retrieve its own training queries
    is under-trained, not over-fitted); their final ranked outputs go to ranked_train_fit.jsonl.
    `FusionSelection.split` (gin): the final evaluation's fusion weights are chosen on that held-out split's
    queries instead (`select_fusion`; grid and choice in fusion_<split>.json and under "fusion_selection")."""
    if discriminative_images not in ("indexed", "train"):
        raise ValueError(f"train_retrieval.discriminative_images must be 'indexed' or 'train', got "
                         f"{discriminative_images!r}")
    corpus = Corpus.load(corpus_dir)
    table = IdentifierTable.load(identifiers_dir)
    vocab = load_vocabulary(table, identifiers_dir)
    # The vocabulary and the corpus fix these two fields; gin sets the rest.
    model_config = T5Config(image_feature_dim=int(corpus.image_features.shape[1])).replace(vocab_size=vocab.size)
    towers = TokenizerTowers.load(corpus, table, identifiers_dir)  # None: the identifiers have no tokenizer
    conditioning = QueryConditioning()
    query_head = None
    if conditioning.enabled:  # the prefix projection takes the tokenizer's aligned vectors
        aligned = TokenizerTowers.require(towers, "QueryConditioning", identifiers_dir).aligned
        query_head = TextHead(towers.text_head)
        model_config = model_config.replace(num_image_tokens=conditioning.num_prefix_tokens,
                                            image_feature_dim=int(aligned.text_vectors("QueryConditioning").shape[1]))
    initial_params, model_config = initial_t5_params(model_config, vocab, table, identifiers_dir)
    mixture = TrainMixture()
    indexed = [im.id for im in corpus.images if im.split in mixture.indexed_splits()]  # what the model may emit
    trie_ids = indexed if discriminative_images == "indexed" else [im.id for im in corpus.images
                                                                    if im.split == "train"]
    train_trie = build_trie(table.subset(trie_ids))
    search = BeamSearchOptions()  # the score normalisation and first-step sharing the model decodes with
    model = RetrievalModel(model_config, vocab, window=model_window(table, vocab.size),
                           input_length=input_length or 1, target_length=table.max_len,
                           retrieve_instruction=mixture.retrieve_instruction,
                           score_normalization=search.score_normalization, share_first_step=search.share_first_step,
                           score_forced_steps=search.score_forced_steps,
                           loss=RetrievalLossConfig(), query_head=query_head, max_alpha=conditioning.max_alpha,
                           text_dropout=conditioning.text_dropout)
    image_dim = model_config.image_feature_dim if model_config.num_image_tokens else None
    aligned = None
    if mixture.pseudo_query_rate > 0 and mixture.pseudo_query_source == "nearest_captions":
        aligned = TokenizerTowers.require(towers, "TrainMixture.pseudo_query_source 'nearest_captions'",
                                          identifiers_dir).aligned
    fused_dis = model.loss_config.discriminative_weight > 0 and model.loss_config.prior_weight > 0
    distill = model.loss_config.distill_weight > 0
    memorize_stage, stream = build_mixture(corpus, table, vocab, model.tokenize, mixture, image_dim, seed,
                                           aligned, model.loss_config.max_relevant,
                                           text_rows=model.conditioned or fused_dis or distill)
    if model.conditioned:
        stream, memorize_stage = (condition_examples(part, towers.aligned) for part in (stream, memorize_stage))
    constants = {TRAIN_TRIE: train_trie.tables} if model.loss_config.discriminative_weight > 0 else {}
    if fused_dis or distill:  # the rows' aligned text vectors: the voken prior's / the distillation teacher's query
        needed_by = ("RetrievalLossConfig.prior_weight > 0" if fused_dis
                     else "RetrievalLossConfig.distill_weight > 0")
        aligned_text = TokenizerTowers.require(towers, needed_by, identifiers_dir).aligned.text_vectors(needed_by)
        stream, memorize_stage = (prior_examples(part, aligned_text) for part in (stream, memorize_stage))
    if fused_dis:  # L_dis over generator + aligned-voken prior scores, the evaluation's `Reranker.voken_bias`
        if towers.voken_vectors is None:
            raise ValueError(f"RetrievalLossConfig.prior_weight > 0 needs an RQ identifier table with a codebook "
                             f"({identifiers_dir}: scheme {table.scheme!r})")
        constants[PRIOR_VECTORS] = window_voken_vectors(towers.voken_vectors, towers.first_token, model.window)
    if distill:  # the teacher: the dense towers over every image the model is trained to emit
        tokens = table.subset(indexed).tokens
        constants[DISTILL_IMAGES] = towers.image_vectors(indexed)
        constants[DISTILL_TOKENS] = np.pad(tokens, ((0, 0), (0, model.target_length - tokens.shape[1])))
    stream, memorize_stage = ([{k: v for k, v in ex.items() if k != "text_row"} for ex in part]
                              for part in (stream, memorize_stage))
    if input_length is None:
        # From the training inputs only: no held-out query sets a model setting, not even a length.
        # Evaluation queries longer than this are cut, and `RetrievalModel.encode_queries` reports how many.
        model = model.replace(input_length=_round_up(max(len(ex["inputs"]) for ex in stream + memorize_stage)))
    cut = sum(len(ex["inputs"]) > model.input_length for ex in stream + memorize_stage)
    if cut and jax.process_index() == 0:
        print(f"train_retrieval: {cut} of {len(stream) + len(memorize_stage)} training inputs are longer than "
              f"input_length {model.input_length} and are cut", flush=True)
    stream, memorize_stage = ([{**ex, "inputs": np.asarray(model.truncate(ex["inputs"]), np.int32)} for ex in part]
                              for part in (stream, memorize_stage))
    lengths = {"inputs": model.input_length, "targets": model.target_length}
    if train_batch_size % jax.process_count():
        raise ValueError(f"train_retrieval.train_batch_size {train_batch_size} is not divisible by "
                         f"{jax.process_count()} processes")
    local_batch = train_batch_size // jax.process_count()
    iterator = make_batch_iterator(stream, local_batch, seed, lengths)
    if memorize_stage:
        first = make_batch_iterator(memorize_stage, local_batch, seed + 1, lengths)
        iterator = SequentialIterator(first, iterator, mixture.memorize_steps)

    run_path = epath.Path(run_dir)  # local or gs://
    rerank = RerankConfig(eval_rerank_weight, eval_rerank_temperature, eval_prior_weight)
    evaluator = periodic = None
    if eval_split is not None:
        reranker = None
        if rerank.enabled:
            reranker = TokenizerTowers.require(towers, "evaluation with the dense towers (rerank / voken prior)",
                                               identifiers_dir).reranker(
                rerank, [corpus.images[i].id for i in corpus.image_rows(eval_split)])
        evaluator = RetrievalEvaluator(model, corpus, table, eval_split, beam_size=eval_beam_size,
                                       batch_size=eval_batch_size, constrained=eval_constrained, reranker=reranker)
        if eval_max_queries is not None and eval_max_queries < evaluator.query_rows.size:
            periodic = evaluator.subset(evenly_spaced(evaluator.query_rows, eval_max_queries))
        else:
            periodic = evaluator
    selection = FusionSelection()
    held_out = None  # the evaluator of the split the fusion weights are chosen on
    if selection.split is not None:
        TokenizerTowers.require(towers, "FusionSelection", identifiers_dir)
        held_out = _held_out_evaluator(selection, corpus, model, table, mixture, eval_split, eval_beam_size,
                                       eval_batch_size)
        if held_out is None and jax.process_index() == 0:
            print(f"FusionSelection: corpus {corpus.name!r} has no {selection.split!r} queries; the fixed fusion "
                  "weights stay", flush=True)
    fit = None
    if fit_queries > 0:
        fit = RetrievalEvaluator(model, corpus, table, "train", beam_size=eval_beam_size, batch_size=eval_batch_size,
                                 constrained=eval_constrained,
                                 query_rows=evenly_spaced(corpus.query_rows("train"), fit_queries))
    if jax.process_index() == 0:
        run_path.mkdir(parents=True, exist_ok=True)
        (run_path / RUN_FILE).write_text(json.dumps({
            "corpus": str(Path(corpus_dir).resolve()), "identifiers": str(Path(identifiers_dir).resolve()),
            "sentencepiece_model": str(vocab.path.resolve()), "t5_config": model_config.to_dict(),
            **model.spec(), "train_examples": len(stream), "memorize_stage_examples": len(memorize_stage),
        }, indent=2) + "\n")
    result = train_loop(model, iterator, run_path, evaluate=_with_fit(periodic, fit), constants=constants or None,
                        initial_params=initial_params)
    final: dict[str, Any] = {"step": result.step, "preempted": result.preempted}
    if selection.split is not None and held_out is None:
        final["fusion_selection"] = {"split": selection.split, "skipped": f"no {selection.split!r} queries"}
    if held_out is not None and not result.preempted:
        rerank, grid = select_fusion(held_out, result.state.params,
                                     lambda c: towers.reranker(c, held_out.image_ids), selection,
                                     eval_rerank_temperature)
        evaluator = evaluator.with_reranker(towers.reranker(rerank, evaluator.image_ids))
        eval_rerank_weight, eval_prior_weight = rerank.weight, rerank.prior_weight
        final["fusion_selection"] = {"split": selection.split, "metric": selection.metric,
                                     "queries": int(held_out.query_rows.size), "prior_weight": rerank.prior_weight,
                                     "rerank_weight": rerank.weight, "grid": grid}
        if jax.process_index() == 0:
            write_json(run_path / f"fusion_{selection.split}.json", final["fusion_selection"])
            print(f"fusion chosen on {held_out.query_rows.size} {selection.split} queries by {selection.metric}: "
                  f"prior weight {rerank.prior_weight}, rerank weight {rerank.weight}", flush=True)
    if not result.preempted:
        image_ids = [im.id for im in corpus.images if eval_split is None or im.split == eval_split]
        export_retrieval_checkpoint(run_path / RETRIEVAL_DIR, model, result.state.params, table.subset(image_ids))
        if jax.process_index() == 0 and (run_path / RETRIEVAL_DIR).exists() and towers is not None:
            save_heads(run_path / RETRIEVAL_DIR, image_ids, towers.image_vectors(image_ids),  # heads.npz
                       towers.text_head, rerank, towers.voken_vectors, towers.first_token)
    if evaluator is not None and not result.preempted:
        ranked = run_path / f"ranked_{eval_split}.jsonl"
        if jax.process_index() == 0:
            scores = evaluator.write_ranked(result.state.params, ranked)
        else:  # the same sharded searches, nothing written
            scores = evaluator.score_all(evaluator.timed_rankings(result.state.params)[0])
        final.update(split=eval_split, beam_size=eval_beam_size, **scores)
        if fit is not None:  # process 0 writes its ranked file; the other processes run the same searches
            fit_scores = (fit.write_ranked(result.state.params, run_path / FIT_RANKED) if jax.process_index() == 0
                          else fit.score(fit.rankings(result.state.params)))
            final.update({f"{FIT_PREFIX}{k}": v for k, v in fit_scores.items()})
        if evaluator.reranker is not None:
            final.update(rerank_weight=eval_rerank_weight, rerank_temperature=eval_rerank_temperature,
                         prior_weight=eval_prior_weight, rerank_ranked=str(rerank_path(ranked)))
        if jax.process_index() == 0:
            write_json(run_path / f"eval_{eval_split}.json", final)
            print(f"{eval_split}: " + " ".join(f"{k}={v:.4f}" for k, v in scores.items()
                                               if isinstance(v, float)), flush=True)
    return final


def _held_out_evaluator(selection: FusionSelection, corpus: Corpus, model: RetrievalModel, table: IdentifierTable,
                        mixture: TrainMixture, eval_split: str | None, beam_size: int, batch_size: int
                        ) -> RetrievalEvaluator | None:
    """The evaluator `FusionSelection` chooses on, checked before any training: its split must be held out from
    the evaluation, indexed (the model learns to emit its images) and have queries (None: it has none and
    `if_available`)."""
    split = selection.split
    if eval_split is None or split == eval_split:
        raise ValueError(f"FusionSelection.split {split!r} needs an evaluation split other than it "
                         f"(train_retrieval.eval_split = {eval_split!r}) to apply the chosen weights to")
    if split not in mixture.indexed_splits():
        raise ValueError(f"FusionSelection.split {split!r}: the model is not trained to emit its images (indexed "
                         f"splits {list(mixture.indexed_splits())}; TrainMixture.memorize_splits with pseudo-queries "
                         "or memorize rows), so its queries cannot stand in for the test queries")
    rows = corpus.query_rows(split)
    if rows.size == 0:
        if selection.if_available:
            return None
        raise ValueError(f"FusionSelection.split {split!r}: corpus {corpus.name!r} has no {split!r} queries "
                         "(FusionSelection.if_available = True keeps the fixed weights then)")
    if selection.max_queries is not None:
        rows = evenly_spaced(rows, selection.max_queries)
    evaluator = RetrievalEvaluator(model, corpus, table, split, beam_size=beam_size, batch_size=batch_size,
                                   query_rows=rows)
    evaluator.text_features("FusionSelection")  # fail now, not after training
    return evaluator


def evenly_spaced(rows: np.ndarray, n: int) -> np.ndarray:
    """At most `n` entries of `rows` evenly spaced over it, first and last included (all of them when n >= len)."""
    if n < 1:
        raise ValueError(f"evenly_spaced: n must be >= 1, got {n}")
    return rows[np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int))]


def _with_fit(evaluator: RetrievalEvaluator | None, fit: RetrievalEvaluator | None
              ) -> Callable[[Any, int], dict[str, float]] | None:
    """The periodic evaluation: `evaluator`'s metrics plus `fit`'s (train queries) under `fit/`."""
    if fit is None:
        return evaluator

    def evaluate(params: Any, step: int) -> dict[str, float]:
        out = {} if evaluator is None else dict(evaluator(params, step))
        return {**out, **{f"{FIT_PREFIX}{k}": v for k, v in fit(params, step).items()}}
    return evaluate


@dataclasses.dataclass(frozen=True)
class TokenizerTowers:
    """The identifiers' tokenizer's contrastive heads (the dense towers), loaded and applied to the corpus once
    per run: pseudo-queries, query conditioning, L_dis over fused scores, the evaluation's fusion and the
    checkpoint's heads.npz all read these."""

    aligned: AlignedCorpus  # the corpus' text / image features through the heads
    text_head: dict[str, np.ndarray]  # the text head as heads.npz arrays (`TextHead.arrays`, numpy)
    voken_vectors: np.ndarray | None  # [vokens, d] codebook vectors of tokens first_token, ... (None: no codebook)
    first_token: int
    image_index: dict[str, int]  # image id -> row of aligned.image (`Corpus.image_index`)

    @classmethod
    def load(cls, corpus: Corpus, table: IdentifierTable, identifiers_dir: str) -> TokenizerTowers | None:
        """The towers of `identifiers_dir`'s tokenizer (`avg-jax tokenize` output, `table` its identifier table);
        None when it has none."""
        from avg_jax.tokenizer.train import CONFIG_FILE, load_tokenizer

        if not (Path(identifiers_dir) / CONFIG_FILE).exists():
            return None
        tok = load_tokenizer(identifiers_dir)
        head = tok.params.get("text_head") if tok.config.projection_heads else None
        return cls(AlignedCorpus.project(corpus, *head_projections(tok)),
                   TextHead.arrays(head, tok.config.normalize_embeddings),
                   table_voken_vectors(table, identifiers_dir), table.text_vocab_size, corpus.image_index())

    def image_vectors(self, image_ids: Sequence[str]) -> np.ndarray:
        """[len(image_ids), d] aligned vectors of those images of the corpus."""
        return self.aligned.image[[self.image_index[i] for i in image_ids]]

    def reranker(self, config: RerankConfig, image_ids: Sequence[str]) -> Reranker:
        """The towers fused into a ranking of the images `image_ids` by `config` (what heads.npz restores)."""
        return Reranker(config, image_ids, self.image_vectors(image_ids), TextHead(self.text_head),
                        self.voken_vectors, self.first_token)

    @staticmethod
    def require(towers: TokenizerTowers | None, needed_by: str, identifiers_dir: str) -> TokenizerTowers:
        """`towers`, or an error naming what needs them when the identifiers have no tokenizer."""
        from avg_jax.tokenizer.train import CONFIG_FILE

        if towers is None:
            raise ValueError(f"{needed_by} needs the identifiers' tokenizer (its contrastive heads): "
                             f"{identifiers_dir} has no {CONFIG_FILE}")
        return towers


def export_retrieval_checkpoint(out_dir: epath.PathLike, model: RetrievalModel, params: Any,
                                table: IdentifierTable) -> None:
    """`model.save_checkpoint` from a (possibly sharded, multi-process) training state: all processes gather,
    process 0 writes."""
    params = multihost_utils.process_allgather(params, tiled=True)  # host numpy on every process
    if jax.process_index() != 0:
        return
    if str(out_dir).startswith(("gs://", "s3://")):
        print(f"retrieval checkpoint not exported: {out_dir} is not a local path (the layout's writers are "
              "local-file only); export from the orbax checkpoint after copying the run", flush=True)
        return
    model.save_checkpoint(out_dir, params, table)
