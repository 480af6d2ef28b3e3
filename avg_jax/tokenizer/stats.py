"""Tokenizer statistics: reconstruction/alignment error, codebook usage, caption-neighbour prefix sharing."""

from __future__ import annotations

import numpy as np

from avg_jax.data.corpus import Corpus, normalize_rows, queries_by_image
from avg_jax.tokenizer.model import embed_texts
from avg_jax.tokenizer.train import EncodedImages, TrainedTokenizer


def codebook_usage(codes: np.ndarray, codebook_size: int) -> list[dict[str, float | int]]:
    """Per level: vokens used (of N), their fraction, and the perplexity exp(H) of the code distribution."""
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / max(counts.sum(), 1)
        out.append({"level": level, "used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
                    "perplexity": float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0})
    return out


def caption_features_per_image(corpus: Corpus, rows: np.ndarray, split: str | None) -> list[np.ndarray]:
    """For image rows, the text-feature rows of their captions of `split` (None: any split)."""
    by_image = queries_by_image(corpus, corpus.query_rows(split))
    return [np.array(by_image.get(corpus.images[i].id, []), np.int64) for i in rows]


def reconstruction_and_alignment(tok: TrainedTokenizer, enc: EncodedImages, corpus: Corpus,
                                 ) -> dict[str, dict[str, float]]:
    """Per split: mean ||x_i − v̂_i||² (recon of the input feature, eq. 3), ||v_i − ẑ^(M)||² (quantization) and
    the eq. 5 align error in the code space."""
    text_emb = (np.asarray(embed_texts(tok.config, tok.params, corpus.text_features))
                if corpus.text_features is not None else None)
    out = {}
    for split in ("train", "val", "test"):
        rows = corpus.image_rows(split)
        if rows.size == 0:
            continue
        stats = {"num_images": int(rows.size),
                 "recon_error": float(np.mean(np.sum((corpus.image_features[rows] - enc.v_hat[rows]) ** 2, axis=1))),
                 "quantization_error": float(np.mean(enc.quantization_error[rows]))}
        if text_emb is not None:
            per_image = [np.mean(np.sum((enc.v_hat_code[i] - text_emb[c]) ** 2, axis=1))
                         for i, c in zip(rows, caption_features_per_image(corpus, rows, split), strict=True)
                         if c.size]
            stats["align_error"] = float(np.mean(per_image)) if per_image else float("nan")
            stats["num_images_with_captions"] = len(per_image)
        out[split] = stats
    return out


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the common prefix of rows of two [n, M] code arrays."""
    same = np.cumprod(a == b, axis=1)
    return same.sum(axis=1)


def caption_neighbour_prefix_sharing(corpus: Corpus, codes: np.ndarray, split: str) -> dict[str, float]:
    """How often an image and its most caption-similar other image share identifier prefixes.

    Caption similarity is the cosine of the mean RAW caption features of two images (the corpus' text
    features, independent of any tokenizer). For every image of `split` with captions, its neighbour is
    the other image of the split with the most similar captions; we report the fraction of such pairs
    sharing the first voken, the mean common-prefix length, and the same for random pairs (chance).
    """
    if corpus.text_features is None:
        raise ValueError("caption_neighbour_prefix_sharing needs text features")
    rows = corpus.image_rows(split)
    caps = caption_features_per_image(corpus, rows, split)
    keep = np.array([c.size > 0 for c in caps])
    rows = rows[keep]
    if rows.size < 2:
        raise ValueError(f"caption_neighbour_prefix_sharing: fewer than 2 {split!r} images with captions")
    mean = normalize_rows(np.stack([corpus.text_features[c].mean(0) for c, k in zip(caps, keep, strict=True) if k]))
    sim = mean @ mean.T
    np.fill_diagonal(sim, -np.inf)
    neighbour = np.argmax(sim, axis=1)
    c = codes[rows]
    prefix = common_prefix_length(c, c[neighbour])
    rng = np.random.default_rng(0)
    other = (np.arange(rows.size) + rng.integers(1, rows.size, rows.size)) % rows.size
    chance = common_prefix_length(c, c[other])
    return {"split": split, "num_images": int(rows.size),
            "share_first_voken": float(np.mean(prefix >= 1)), "mean_common_prefix": float(np.mean(prefix)),
            "share_first_voken_random_pairs": float(np.mean(chance >= 1)),
            "mean_common_prefix_random_pairs": float(np.mean(chance))}
