"""Ranked outputs of a retrieval system on a corpus split: read and validate them, score them, write metrics.json.

Ranked-output JSONL, one line per query of the evaluated split (what `avg-jax retrieve --queries` writes):
    {"query_row": 12, "text": "...", "image_ids": ["img3", "img9", ...], "identifiers": [[32101, 32457], ...]}
`query_row` is the row in the corpus' queries.jsonl (preferred); without it `text` is looked up among the
split's queries and must be unambiguous. `image_ids` is the ranking after identifier groups were expanded;
the optional `identifiers` (ranked token-id lists) enable identifier-level recall.
Every query of the split must appear exactly once: a missing or duplicated query is an error, not a skip.
`query_novelty` groups the queries by how new their text is to training (`avg-jax eval --by_novelty`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from avg_jax.data.corpus import Corpus
from avg_jax.evaluation import metrics
from avg_jax.json_io import read_jsonl, write_json, write_jsonl

METRICS_FILE = "metrics.json"
# How new a query's text is to training (`query_novelty`), in this order.
NOVELTY_GROUPS = ("seen text", "new text", "new word")


@dataclasses.dataclass
class RankedOutputs:
    """Ranked outputs aligned with `query_rows` (corpus query rows of the evaluated split, file order)."""

    query_rows: np.ndarray  # [num_queries] int64
    image_ids: list[list[str]]
    identifiers: list[list[tuple[int, ...]]] | None

    def subset(self, keep: np.ndarray) -> RankedOutputs:
        """The outputs of the queries where the boolean `keep` [num_queries] is true."""
        idx = np.flatnonzero(keep)
        return RankedOutputs(self.query_rows[idx], [self.image_ids[i] for i in idx],
                             None if self.identifiers is None else [self.identifiers[i] for i in idx])


def read_ranked_jsonl(path: str | Path, corpus: Corpus, split: str) -> RankedOutputs:
    """Parse and validate a ranked-output file against the corpus split (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ranked-output file missing: {path}")
    split_rows = corpus.query_rows(split)
    in_split = set(split_rows.tolist())
    by_text: dict[str, list[int]] = {}
    for j in split_rows:
        by_text.setdefault(corpus.queries[j].text, []).append(int(j))
    image_ids = {im.id for im in corpus.images if im.split == split}
    rows, ranked, identifiers, seen = [], [], [], {}
    for n, obj in read_jsonl(path):
        where = f"{path} line {n}"
        row = _query_row(obj, where, corpus, in_split, by_text, split)
        if row in seen:
            raise ValueError(f"{where}: query row {row} already ranked on line {seen[row]}")
        seen[row] = n
        ids = obj.get("image_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{where}: field 'image_ids' must be a list of image id strings, got {ids!r}")
        unknown = [i for i in ids if i not in image_ids]
        if unknown:
            raise ValueError(f"{where}: field 'image_ids' names images not in split {split!r}: {unknown[:5]}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: field 'image_ids' repeats an image id")
        rows.append(row)
        ranked.append(ids)
        identifiers.append(_identifiers(obj, where))
    missing = sorted(in_split - set(rows))
    if missing:
        raise ValueError(f"{path}: {len(missing)} of the {len(in_split)} {split!r} queries have no ranking, "
                         f"first query rows {missing[:5]}")
    has_ids = [i is not None for i in identifiers]
    if any(has_ids) and not all(has_ids):
        raise ValueError(f"{path}: field 'identifiers' is present on some lines but not on line "
                         f"{has_ids.index(False) + 1}")
    return RankedOutputs(np.array(rows, dtype=np.int64), ranked, identifiers if all(has_ids) else None)


def _query_row(obj: dict, where: str, corpus: Corpus, in_split: set[int], by_text: dict[str, list[int]],
               split: str) -> int:
    if "query_row" in obj:
        row = obj["query_row"]
        if not isinstance(row, int) or row not in in_split:
            raise ValueError(f"{where}: field 'query_row' = {row!r} is not a {split!r} query row of the corpus")
        if "text" in obj and obj["text"] != corpus.queries[row].text:
            raise ValueError(f"{where}: field 'text' {obj['text']!r} differs from corpus query row {row} "
                             f"{corpus.queries[row].text!r}")
        return row
    if "text" not in obj:
        raise ValueError(f"{where}: needs field 'query_row' or 'text'")
    matches = by_text.get(obj["text"], [])
    if len(matches) != 1:
        raise ValueError(f"{where}: field 'text' {obj['text']!r} matches {len(matches)} {split!r} queries; "
                         "give 'query_row'")
    return matches[0]


def _identifiers(obj: dict, where: str) -> list[tuple[int, ...]] | None:
    if "identifiers" not in obj:
        return None
    idents = obj["identifiers"]
    if not isinstance(idents, list) or not all(
            isinstance(t, list) and t and all(isinstance(x, int) for x in t) for t in idents):
        raise ValueError(f"{where}: field 'identifiers' must be a list of non-empty token-id lists")
    return [tuple(t) for t in idents]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def query_novelty(corpus: Corpus, query_rows: Sequence[int]) -> list[str]:
    """One of NOVELTY_GROUPS per query row: 'seen text' = its text (lower-cased, word by word) is the text of a
    TRAIN query; 'new text' = it is not, but each of its words occurs in some TRAIN query; 'new word' = it has a
    word no TRAIN query has. Every text a generator trained from scratch reads (queries, pseudo-queries) is a
    TRAIN query's, so the groups separate what it memorised, what it must compose and what it never read."""
    train = [_words(corpus.queries[j].text) for j in corpus.query_rows("train")]
    seen_texts = {tuple(w) for w in train}
    seen_words = {x for w in train for x in w}
    out = []
    for j in query_rows:
        words = _words(corpus.queries[j].text)
        out.append(NOVELTY_GROUPS[0] if tuple(words) in seen_texts
                   else NOVELTY_GROUPS[1] if all(x in seen_words for x in words) else NOVELTY_GROUPS[2])
    return out


def evaluate_ranked(corpus: Corpus, outputs: RankedOutputs,
                    groups: dict[tuple[int, ...], list[str]] | None = None,
                    ks: Sequence[int] = metrics.DEFAULT_KS, num_results: int | None = None,
                    prefix_k: int | None = None) -> dict[str, float]:
    """Image-level metrics of the ranked image ids; with identifiers and groups also identifier-level ones
    (`num_results`: the beam that produced them; cutoffs beyond it are left out, see evaluation.metrics) and,
    given `prefix_k`, the identifier prefix recall at that cutoff (`metrics.identifier_prefix_recall`)."""
    relevant = [corpus.queries[j].image_ids for j in outputs.query_rows]
    out = metrics.evaluate_images(outputs.image_ids, relevant, ks, num_results)
    if groups is not None and outputs.identifiers is not None:
        out.update(metrics.identifier_level_metrics(outputs.identifiers, relevant, groups, ks, num_results))
        if prefix_k is not None:
            out.update(metrics.identifier_prefix_recall(outputs.identifiers, relevant, groups, prefix_k))
    return out


def paired_comparison(corpus: Corpus, a: RankedOutputs, b: RankedOutputs, ks: Sequence[int] = metrics.DEFAULT_KS,
                      names: tuple[str, str] = ("A", "B")) -> dict[str, float]:
    """`metrics.paired_recall` of two systems' image rankings over the same queries of a split (matched by query
    row, whatever the files' order); an error names the first query only one of them has."""
    rank_of = []
    for outputs in (a, b):
        rank_of.append({int(j): metrics.first_relevant_rank(ids, corpus.queries[j].image_ids)
                        for j, ids in zip(outputs.query_rows, outputs.image_ids, strict=True)})
    missing = sorted(set(rank_of[0]) ^ set(rank_of[1]))
    if missing:
        name = names[1] if missing[0] in rank_of[0] else names[0]
        raise ValueError(f"paired comparison of {names[0]} and {names[1]}: {name} has no ranking for query row "
                         f"{missing[0]} ({len(missing)} queries differ)")
    rows = sorted(rank_of[0])
    return metrics.paired_recall(np.array([rank_of[0][j] for j in rows]), np.array([rank_of[1][j] for j in rows]), ks)


def write_metrics(out_dir: str | Path, corpus: Corpus, corpus_dir: str, split: str,
                  systems: dict[str, dict[str, float]]) -> Path:
    """metrics.json: the corpus, split and one metrics dict per system (values are fractions, not %)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / METRICS_FILE
    write_json(path, {"corpus": str(corpus_dir), "corpus_name": corpus.name, "synthetic": corpus.synthetic,
                      "split": split, "systems": systems})
    return path


def write_ranked_jsonl(path: str | Path, corpus: Corpus, query_rows: Sequence[int], ranked: Sequence[list[str]]
                       ) -> None:
    """The ranked-output JSONL of `ranked` image ids per corpus query row (no identifiers)."""
    write_jsonl(path, ({"query_row": int(j), "text": corpus.queries[j].text, "image_ids": ids}
                       for j, ids in zip(query_rows, ranked, strict=True)))
