"""Diagnostic ceilings of voken retrieval without T5: how well the tokenizer's codes could rank at best.

Both rank a split's images for each of its queries from the trained RQ tokenizer alone (`avg-jax tokenize`
output: heads + codebook):
  'ceiling'        score(q, i) = <text_head(query feature), ẑ^(M)_i>: the aligned query vector against the
                   image's QUANTIZED vector (the sum of its M voken vectors). What a perfect decoder of the
                   vokens' geometry could reach: the information the identifiers keep about the image. Not a
                   bound on a generator, which reads the query's text (on the synthetic demo at M = 2 it passes it).
  'ceiling_codes'  the query's own RQ codes (its aligned text vector quantized with the tokenizer's codebook)
                   against each image's codes: images ranked by the longest shared code prefix (levels of the
                   identifier), ties broken by the 'ceiling' score. What generating the query's own code would
                   give: the cross-modal agreement of the codes themselves.
Image-level metrics (`metrics.evaluate_images`) over the full ranking (every image of the split).
The codes are the tokenizer's RQ codes (no collision suffix: images sharing all M codes tie on the prefix).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from avg_jax.data.corpus import Corpus
from avg_jax.evaluation import metrics
from avg_jax.evaluation.dense import split_rows
from avg_jax.tokenizer.model import embed_texts
from avg_jax.tokenizer.quantizer import rq_encode_codes
from avg_jax.tokenizer.train import TrainedTokenizer, encode_images

MODES = ("ceiling", "ceiling_codes")


def shared_prefix_lengths(query_codes: np.ndarray, image_codes: np.ndarray) -> np.ndarray:
    """[q, n] length of the longest common prefix of each query's codes [q, M] and each image's [n, M]."""
    equal = query_codes[:, None, :] == image_codes[None, :, :]  # [q, n, M]
    return np.cumprod(equal, axis=-1).sum(axis=-1)


def ceiling_scores(tok: TrainedTokenizer, text_features: np.ndarray, image_features: np.ndarray, mode: str
                   ) -> np.ndarray:
    """[q, n] ranking keys (higher = better) of `mode` for queries' text features and images' features.

    'ceiling_codes' keys are prefix length + a tie-break in [0, 1) monotone in the 'ceiling' score."""
    if mode not in MODES:
        raise ValueError(f"ceiling mode must be one of {MODES}, got {mode!r}")
    text_features = np.asarray(text_features, np.float32)
    v_t = np.asarray(embed_texts(tok.config, tok.params, jnp.asarray(text_features)), np.float32)  # [q, d]
    images = encode_images(tok, np.asarray(image_features, np.float32))
    score = v_t @ images.z_q.T  # [q, n]
    if mode == "ceiling":
        return score
    query_codes, _ = rq_encode_codes(jnp.asarray(v_t), jnp.asarray(tok.params["codebooks"]), tok.config.num_levels)
    prefix = shared_prefix_lengths(np.asarray(query_codes), images.codes)
    # |<v_t, z_q>| <= |v_t| |z_q|: map the score monotonically into [0, 1) per query row.
    lo, hi = score.min(axis=1, keepdims=True), score.max(axis=1, keepdims=True)
    tie = (score - lo) / np.maximum(hi - lo, 1e-12) * 0.5
    return prefix.astype(np.float64) + tie


def rank_by_scores(scores: np.ndarray, image_ids: Sequence[str], k: int | None = None) -> list[list[str]]:
    """Image ids of each row of `scores` [q, n], best first (stable: ties keep the split's image order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    order = order if k is None else order[:, :k]
    return [[image_ids[i] for i in row] for row in order]


def ceiling_diagnostic(corpus: Corpus, tok: TrainedTokenizer, split: str = "test", mode: str = "ceiling",
                       ks: Sequence[int] = metrics.DEFAULT_KS) -> tuple[dict[str, float], list[list[str]]]:
    """Image-level metrics and ranked image ids (per `corpus.query_rows(split)` query) of the `mode` ceiling of a
    loaded tokenizer (`load_tokenizer` of an `avg-jax tokenize` output directory)."""
    image_rows, query_rows = split_rows(corpus, split, "the ceiling")
    image_ids = [corpus.images[i].id for i in image_rows]
    ranked = []
    for start in range(0, len(query_rows), 1024):  # bounded [chunk, n, M] prefix comparisons
        rows = query_rows[start:start + 1024]
        keys = ceiling_scores(tok, corpus.text_features[rows], corpus.image_features[image_rows], mode)
        ranked += rank_by_scores(keys, image_ids, k=max(max(ks), metrics.MRR_CUTOFF))
    relevant = [corpus.queries[j].image_ids for j in query_rows]
    return metrics.evaluate_images(ranked, relevant, ks), ranked
