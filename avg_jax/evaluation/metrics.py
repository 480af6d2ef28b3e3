"""Retrieval metrics on ranked outputs: image-level R@K (the paper's standard), identifier-level R@K (what the
official AVG code reports), collision rate, MRR@10 and the share of queries with empty output.

Image level: a query is a hit at K if one of its relevant images is among the first K *images* of its
ranking, after each generated identifier has been expanded to the images that share it (in identifier-table
order). Identifier level: a hit at K if one of the first K generated *identifiers* equals the identifier of a
relevant image, however many images share that identifier. With colliding identifiers the second number is
inflated; both are reported with the collision rate so the gap is visible. Identifier prefix recall (a
diagnostic of where a hierarchical identifier is lost): a hit at depth d if one of the first K generated
identifiers agrees with a relevant image's identifier on its first d tokens (d = 1: the first voken, the
coarsest level of an RQ identifier).

Rankings from a beam of b < K results (the paper's Table 7, beams 1 and 5): R@K and identifier R@K for K > b,
and MRR@10 for b < 10, are inapplicable (the paper's "-") and are left out of the returned dict (so
metrics.json has no such key, and tables show "-"). This holds at image level too, although an identifier
shared by several images can expand one beam to more than b images: the cutoff is the number of generated
identifiers, as in the paper.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
FIT_PREFIX = "fit/"  # metrics of TRAIN queries over the TRAIN images (`train_retrieval.fit_queries`)
MRR_CUTOFF = 10
Identifier = tuple[int, ...]


def first_relevant_rank(ranked: Sequence[Hashable], relevant: Collection[Hashable]) -> int:
    """1-based position of the first relevant item in `ranked`, 0 when none is relevant."""
    for position, item in enumerate(ranked, start=1):
        if item in relevant:
            return position
    return 0


def recall_at_k(first_ranks: np.ndarray, k: int) -> float:
    """Share of queries whose first relevant item lies within the top k (ranks are 1-based, 0 = miss)."""
    first_ranks = np.asarray(first_ranks)
    if first_ranks.size == 0:
        return float("nan")
    return float(np.mean((first_ranks >= 1) & (first_ranks <= k)))


def mrr_at_k(first_ranks: np.ndarray, k: int = MRR_CUTOFF) -> float:
    """Mean reciprocal rank of the first relevant item, counted 0 beyond rank k or on a miss."""
    first_ranks = np.asarray(first_ranks)
    if first_ranks.size == 0:
        return float("nan")
    hit = (first_ranks >= 1) & (first_ranks <= k)
    return float(np.mean(np.where(hit, 1.0 / np.maximum(first_ranks, 1), 0.0)))


def sign_test(wins_a: int, wins_b: int) -> float:
    """Exact two-sided sign-test p-value of `wins_a` against `wins_b` discordant pairs (ties left out):
    P(|X − n/2| >= |wins_a − n/2|) for X ~ Binomial(n = wins_a + wins_b, 1/2); 1.0 when n = 0."""
    if wins_a < 0 or wins_b < 0:
        raise ValueError(f"sign test counts must be >= 0, got {wins_a}, {wins_b}")
    n, low = wins_a + wins_b, min(wins_a, wins_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2**n)


def paired_key(field: str, k: int) -> str:
    """The `paired_recall` key of `field` ('a_only', 'b_only' or 'p') at cutoff k."""
    return f"{field}@{k}"


def paired_recall(first_ranks_a: np.ndarray, first_ranks_b: np.ndarray, ks: Sequence[int] = DEFAULT_KS
                  ) -> dict[str, float]:
    """Two systems' R@K on the SAME queries (first-relevant ranks in one query order, 0 = miss), per K: the
    queries only A finds within K ("a_only@K"), only B ("b_only@K"), and the sign test over them ("p@K";
    keys by `paired_key`)."""
    a, b = np.asarray(first_ranks_a), np.asarray(first_ranks_b)
    if a.shape != b.shape:
        raise ValueError(f"paired recall needs the same queries: {a.shape} vs {b.shape} ranks")
    out = {}
    for k in ks:
        hit_a, hit_b = (a >= 1) & (a <= k), (b >= 1) & (b <= k)
        only_a, only_b = int(np.sum(hit_a & ~hit_b)), int(np.sum(hit_b & ~hit_a))
        out.update({paired_key("a_only", k): only_a, paired_key("b_only", k): only_b,
                    paired_key("p", k): sign_test(only_a, only_b)})
    return out


def _check_lengths(ranked: Sequence, relevant: Sequence, what: str) -> None:
    if len(ranked) != len(relevant):
        raise ValueError(f"{what}: {len(ranked)} ranked lists but {len(relevant)} relevance sets")
    for j, rel in enumerate(relevant):
        if not rel:
            raise ValueError(f"{what}: query {j} has no relevant image (field 'image_ids' is empty)")


def applicable_ks(ks: Sequence[int], num_results: int | None) -> tuple[int, ...]:
    """The cutoffs a system returning `num_results` identifiers (its beam; None = unbounded) can be scored at."""
    if num_results is not None and num_results < 1:
        raise ValueError(f"num_results (the beam size) must be >= 1, got {num_results}")
    return tuple(k for k in ks if num_results is None or k <= num_results)


def ranking_metrics(ranked: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]],
                    ks: Sequence[int] = DEFAULT_KS, prefix: str = "",
                    num_results: int | None = None) -> dict[str, float]:
    """R@K for each applicable k (see the module docstring), MRR@10 and the share of empty rankings over
    `ranked` (one list per query)."""
    _check_lengths(ranked, relevant, "ranking_metrics")
    ranks = np.array([first_relevant_rank(r, set(rel)) for r, rel in zip(ranked, relevant, strict=True)],
                     dtype=np.int64)
    out = {f"{prefix}recall@{k}": recall_at_k(ranks, k) for k in applicable_ks(ks, num_results)}
    if applicable_ks((MRR_CUTOFF,), num_results):
        out[f"{prefix}mrr@{MRR_CUTOFF}"] = mrr_at_k(ranks, MRR_CUTOFF)
    out[f"{prefix}empty_rate"] = float(np.mean([len(r) == 0 for r in ranked])) if ranked else float("nan")
    return out


def image_to_identifier(groups: Mapping[Identifier, Sequence[str]]) -> dict[str, Identifier]:
    """Invert identifier groups (identifier -> images sharing it) into image id -> identifier."""
    out: dict[str, Identifier] = {}
    for identifier, images in groups.items():
        for image_id in images:
            if image_id in out:
                raise ValueError(f"identifier groups: image {image_id!r} appears under two identifiers "
                                 f"{out[image_id]} and {tuple(identifier)}")
            out[image_id] = tuple(identifier)
    return out


def expand_identifiers(ranked_identifiers: Iterable[Sequence[int]],
                       groups: Mapping[Identifier, Sequence[str]]) -> list[str]:
    """Ranked identifiers -> ranked image ids: each identifier expands to its group in table order.

    An identifier absent from `groups` is an error (constrained decoding never produces one), and an
    identifier repeated in the ranking contributes its images only once."""
    images: list[str] = []
    seen: set[Identifier] = set()
    for identifier in ranked_identifiers:
        key = tuple(int(t) for t in identifier)
        if key in seen:
            continue
        seen.add(key)
        if key not in groups:
            raise ValueError(f"ranked identifier {key} is not in the identifier table's groups")
        images.extend(groups[key])
    return images


def collision_rate(groups: Mapping[Identifier, Sequence[str]]) -> float:
    """Share of images whose full identifier is shared with at least one other image."""
    sizes = np.array([len(v) for v in groups.values()], dtype=np.int64)
    if sizes.sum() == 0:
        return float("nan")
    return float(sizes[sizes > 1].sum() / sizes.sum())


def _relevant_identifiers(relevant_image_ids: Sequence[Collection[str]], groups: Mapping[Identifier, Sequence[str]]
                          ) -> list[set[Identifier]]:
    """Per query, the identifiers of its relevant images (an image without one is an error)."""
    ident_of = image_to_identifier(groups)
    out = []
    for j, rel in enumerate(relevant_image_ids):
        missing = [i for i in rel if i not in ident_of]
        if missing:
            raise ValueError(f"query {j}: relevant image(s) {missing[:5]} have no identifier in the table")
        out.append({ident_of[i] for i in rel})
    return out


def identifier_level_metrics(ranked_identifiers: Sequence[Sequence[Sequence[int]]],
                             relevant_image_ids: Sequence[Collection[str]],
                             groups: Mapping[Identifier, Sequence[str]],
                             ks: Sequence[int] = DEFAULT_KS, num_results: int | None = None) -> dict[str, float]:
    """The official AVG code's recall: a hit if a generated identifier equals a relevant image's identifier."""
    _check_lengths(ranked_identifiers, relevant_image_ids, "identifier_level_metrics")
    relevant_identifiers = _relevant_identifiers(relevant_image_ids, groups)
    ranked = [[tuple(int(t) for t in ident) for ident in ranking] for ranking in ranked_identifiers]
    out = ranking_metrics(ranked, relevant_identifiers, ks, prefix="identifier_", num_results=num_results)
    out["collision_rate"] = collision_rate(groups)
    return out


def prefix_recall_key(depth: int, k: int) -> str:
    """The metrics key of identifier prefix recall at `depth` and cutoff `k`."""
    return f"identifier_prefix{depth}_recall@{k}"


def identifier_prefix_recall(ranked_identifiers: Sequence[Sequence[Sequence[int]]],
                             relevant_image_ids: Sequence[Collection[str]],
                             groups: Mapping[Identifier, Sequence[str]], k: int = MRR_CUTOFF
                             ) -> dict[str, float]:
    """`identifier_prefix{d}_recall@{k}` for d = 1 .. the longest identifier in `groups`: the share of queries
    with one of their first k generated identifiers equal to a relevant image's identifier on the first d tokens
    (both at least d long). Decreasing in d; where every identifier has one length L, depth L is identifier-level
    R@k. Tells at which identifier position the generator leaves the relevant images (module docstring)."""
    _check_lengths(ranked_identifiers, relevant_image_ids, "identifier_prefix_recall")
    max_len = max(len(i) for i in groups)
    hits = np.zeros(max_len + 1, np.int64)  # hits[d]: queries whose deepest shared prefix is d
    for ranking, targets in zip(ranked_identifiers, _relevant_identifiers(relevant_image_ids, groups), strict=True):
        deepest = 0
        for generated in ranking[:k]:
            for target in targets:
                depth = 0
                while depth < min(len(generated), len(target)) and int(generated[depth]) == target[depth]:
                    depth += 1
                deepest = max(deepest, depth)
        hits[deepest] += 1
    at_least = np.cumsum(hits[::-1])[::-1] / max(len(ranked_identifiers), 1)  # at_least[d] = share with >= d
    return {prefix_recall_key(d, k): float(at_least[d]) for d in range(1, max_len + 1)}


def evaluate_identifiers(ranked_identifiers: Sequence[Sequence[Sequence[int]]],
                         relevant_image_ids: Sequence[Collection[str]],
                         groups: Mapping[Identifier, Sequence[str]],
                         ks: Sequence[int] = DEFAULT_KS, num_results: int | None = None) -> dict[str, float]:
    """Image-level metrics (after group expansion) and identifier-level metrics side by side."""
    ranked_images = [expand_identifiers(r, groups) for r in ranked_identifiers]
    out = ranking_metrics(ranked_images, relevant_image_ids, ks, num_results=num_results)
    out.update(identifier_level_metrics(ranked_identifiers, relevant_image_ids, groups, ks, num_results))
    out["num_queries"] = len(ranked_identifiers)
    return out


def evaluate_images(ranked_image_ids: Sequence[Sequence[str]], relevant_image_ids: Sequence[Collection[str]],
                    ks: Sequence[int] = DEFAULT_KS, num_results: int | None = None) -> dict[str, float]:
    """Image-level metrics for rankings that are already image ids (dense retrieval, expanded decodes)."""
    out = ranking_metrics(ranked_image_ids, relevant_image_ids, ks, num_results=num_results)
    out["num_queries"] = len(ranked_image_ids)
    return out


def format_table(rows: Mapping[str, Mapping[str, float]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """A plain-text table, one row per system, with the image-level and (when present) identifier-level R@K."""
    cols = [f"recall@{k}" for k in ks] + [f"mrr@{MRR_CUTOFF}", "empty_rate"]
    extra = [f"identifier_recall@{k}" for k in ks] + ["collision_rate"]
    if any(c in m for m in rows.values() for c in extra):
        cols += extra
    headers = ["system", "queries"] + [c.replace("identifier_recall", "id_R").replace("recall", "R") for c in cols]
    lines = []
    for name, m in rows.items():
        vals = [pct(m.get(c), 2) for c in cols]
        lines.append([name, str(int(m.get("num_queries", 0))), *vals])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    body = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in lines]
    return "\n".join(body) + "\n(all values in %, except queries)"


def chance_metrics(num_images: int, num_relevant: Sequence[int], ks: Sequence[int] = DEFAULT_KS
                   ) -> dict[str, float]:
    """Expected R@K and MRR@10 of a uniformly random ranking of `num_images` images, averaged over queries with
    `num_relevant[j]` relevant images each (exact: R@K = 1 - C(n-r, k) / C(n, k) for r relevant of n)."""
    n = int(num_images)

    def miss_first(r: int, k: int) -> float:  # P(no relevant image among the first k of n)
        return math.comb(n - r, k) / math.comb(n, k) if k <= n - r else 0.0

    out = {f"recall@{k}": float(np.mean([1.0 - miss_first(r, min(k, n)) for r in num_relevant])) for k in ks}
    # P(first relevant at position p) = miss_first(r, p - 1) - miss_first(r, p)
    cutoff = min(MRR_CUTOFF, n)
    out[f"mrr@{MRR_CUTOFF}"] = float(np.mean([
        sum((miss_first(r, p - 1) - miss_first(r, p)) / p for p in range(1, cutoff + 1)) for r in num_relevant]))
    return out


def pct(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage with `digits` decimals; '-' for a missing (None) or non-finite value."""
    return f"{100 * value:.{digits}f}" if isinstance(value, numbers.Real) and math.isfinite(value) else "-"
