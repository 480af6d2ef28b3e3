"""The dense two-tower baseline: exact inner-product search over image embeddings.

Two backends return the same ranked image rows: a jit-compiled `jnp` matmul + `lax.top_k` whose image
matrix is sharded row-wise over one mesh axis (each shard keeps its local top-k, the candidates are merged
by a second top-k), and faiss `IndexFlatIP` on CPU (extra `bench`). Features are either already aligned
across modalities (e.g. CLIP) or mapped into a shared space by projection heads passed in as callables
(the tokenizer's contrastive heads), so this module does not depend on how the heads were trained.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from avg_jax.data.corpus import Corpus, normalize_rows
from avg_jax.evaluation import metrics
from avg_jax.partitioning import make_device_mesh

if TYPE_CHECKING:
    from avg_jax.tokenizer.train import TrainedTokenizer

Projection = Callable[[np.ndarray], np.ndarray]
BACKENDS = ("jax", "faiss")
PROJECTIONS = ("none", "ridge", "heads")


@functools.partial(jax.jit, static_argnames=("k", "mesh", "axis"))
def sharded_top_k(queries: jax.Array, images: jax.Array, num_images: jax.Array, *, k: int, mesh: Mesh,
                  axis: str) -> tuple[jax.Array, jax.Array]:
    """Exact top-k inner products; `images` [n_padded, d] is row-sharded over `axis`, rows >= num_images are
    padding. Returns scores [q, k] (descending) and global image rows [q, k] int32."""
    num_shards = mesh.shape[axis]
    rows_per_shard = images.shape[0] // num_shards
    local_k = min(k, rows_per_shard)

    def local_search(q, im, n):  # q [q, d] replicated, im [rows_per_shard, d]
        scores = jnp.dot(q, im.T, preferred_element_type=jnp.float32)  # [q, rows_per_shard]
        rows = jax.lax.axis_index(axis) * rows_per_shard + jnp.arange(rows_per_shard, dtype=jnp.int32)
        scores = jnp.where(rows[None, :] < n, scores, -jnp.inf)
        top_scores, top_local = jax.lax.top_k(scores, local_k)  # [q, local_k]
        # Merge: every shard's candidates, [q, shards * local_k], then the global top-k.
        cand_scores = jax.lax.all_gather(top_scores, axis, axis=1, tiled=True)
        cand_rows = jax.lax.all_gather(rows[top_local], axis, axis=1, tiled=True)
        best, pick = jax.lax.top_k(cand_scores, k)
        return best, jnp.take_along_axis(cand_rows, pick, axis=1)

    # The merged result is identical on every shard (computed from all-gathered candidates); the static
    # replication check cannot infer that through all_gather, hence check_vma=False.
    return jax.shard_map(local_search, mesh=mesh, in_specs=(P(), P(axis, None), P()),
                         out_specs=(P(), P()), check_vma=False)(queries, images, num_images)


class JaxExactIndex:
    """Image embeddings placed once on the mesh (rows sharded over `axis`), searched in fixed-size query
    batches so the compiled search is reused across calls."""

    def __init__(self, image_embeddings: np.ndarray, mesh: Mesh | None = None, axis: str = "data",
                 dtype: jnp.dtype = jnp.float32):
        image_embeddings = _check_matrix(image_embeddings, "image embeddings")
        self.mesh = mesh or (make_device_mesh(-1, 1) if axis == "data" else make_device_mesh(1, -1))
        self.axis = axis
        self.num_images, self.dim = image_embeddings.shape
        shards = self.mesh.shape[axis]
        padded = -(-self.num_images // shards) * shards
        if padded > self.num_images:  # zero rows up to a multiple of the shard count (masked in the search)
            pad = np.zeros((padded - self.num_images, self.dim), image_embeddings.dtype)
            image_embeddings = np.concatenate([image_embeddings, pad])
        self.images = jax.device_put(jnp.asarray(image_embeddings, dtype),
                                     NamedSharding(self.mesh, P(axis, None)))  # [n_padded, d]
        self.replicated = NamedSharding(self.mesh, P())
        self.dtype = dtype

    def search(self, queries: np.ndarray, k: int, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Scores [q, k] float32 and image rows [q, k] int64 of the k best images for each query."""
        queries = _check_matrix(queries, "query embeddings", self.dim)
        k = _check_k(k, self.num_images)
        num_valid = jax.device_put(jnp.int32(self.num_images), self.replicated)
        scores, rows = [], []
        for start in range(0, queries.shape[0], batch_size):
            chunk = queries[start:start + batch_size]
            padded = np.zeros((batch_size, self.dim), np.float32)
            padded[:len(chunk)] = chunk
            q = jax.device_put(jnp.asarray(padded, self.dtype), self.replicated)
            s, r = sharded_top_k(q, self.images, num_valid, k=k, mesh=self.mesh, axis=self.axis)
            scores.append(np.asarray(s)[:len(chunk)])
            rows.append(np.asarray(r)[:len(chunk)])
        if not scores:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(scores), np.concatenate(rows).astype(np.int64)


def faiss_search(queries: np.ndarray, image_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same exact search with faiss `IndexFlatIP` on CPU: scores [q, k] and image rows [q, k]."""
    import faiss  # extra `bench`

    image_embeddings = _check_matrix(image_embeddings, "image embeddings")
    queries = _check_matrix(queries, "query embeddings", image_embeddings.shape[1])
    k = _check_k(k, image_embeddings.shape[0])
    index = faiss.IndexFlatIP(image_embeddings.shape[1])
    index.add(np.ascontiguousarray(image_embeddings, np.float32))
    scores, rows = index.search(np.ascontiguousarray(queries, np.float32), k)
    return scores, rows.astype(np.int64)


def fit_ridge_map(source: np.ndarray, target: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """Least-squares linear map W [d_src, d_tgt] with `source @ W ≈ target` (ridge `l2`): the simplest
    alignment of two unaligned feature spaces, fitted on training (query, image) pairs only."""
    source = np.asarray(source, np.float64)
    gram = source.T @ source + l2 * np.eye(source.shape[1])
    return np.linalg.solve(gram, source.T @ np.asarray(target, np.float64)).astype(np.float32)


def tokenizer_head_projections(tokenizer_dir: str) -> tuple[Projection, Projection]:
    """(text, image) projections by a trained tokenizer's contrastive heads (`avg-jax tokenize` output)."""
    from avg_jax.tokenizer.train import load_tokenizer

    return head_projections(load_tokenizer(tokenizer_dir))


def head_projections(tok: TrainedTokenizer) -> tuple[Projection, Projection]:
    """(text, image) projections by a loaded tokenizer's contrastive heads (`load_tokenizer`)."""
    from avg_jax.tokenizer.model import RQTokenizer

    model = RQTokenizer(tok.config)
    embed_text = jax.jit(lambda x: model.apply({"params": tok.params}, x, method=RQTokenizer.embed_text))
    embed_image = jax.jit(lambda x: model.apply({"params": tok.params}, x, method=RQTokenizer.embed_image))

    def chunked(fn: Callable[[jax.Array], jax.Array], dim: int, what: str) -> Projection:
        def project(x: np.ndarray) -> np.ndarray:
            x = _check_matrix(x, f"{what} features", dim)
            return np.concatenate([np.asarray(fn(x[i:i + 4096])) for i in range(0, len(x), 4096)]
                                  or [np.zeros((0, tok.config.code_dim), np.float32)])
        return project

    return chunked(embed_text, tok.text_dim, "text"), chunked(embed_image, tok.image_dim, "image")


@gin.configurable(denylist=["corpus"])
def ridge_text_projection(corpus: Corpus, split: str = "train", l2: float = 1.0) -> Projection:
    """Text -> image-feature map fitted on every (query, relevant image) pair of `split` by ridge regression:
    a linear two-tower baseline for corpora whose text and image features are not aligned."""
    rows = corpus.query_rows(split)
    if corpus.text_features is None or rows.size == 0:
        raise ValueError(f"corpus {corpus.name!r}: fitting the ridge map needs {split!r} queries with text features")
    index = corpus.image_index()
    pairs = [(j, index[i]) for j in rows for i in corpus.queries[j].image_ids]
    text_rows, image_rows = (np.array(c, dtype=np.int64) for c in zip(*pairs, strict=True))
    w = fit_ridge_map(corpus.text_features[text_rows], normalize_rows(corpus.image_features[image_rows]), l2)
    return lambda text: np.asarray(text, np.float32) @ w


def baseline_projections(corpus: Corpus, projection: str, tokenizer_dir: str | None = None
                         ) -> tuple[Projection | None, Projection | None]:
    """(text, image) projections of the dense baseline `projection`: 'none' (features already aligned), 'ridge'
    (`ridge_text_projection` on the train split) or 'heads' (`tokenizer_head_projections(tokenizer_dir)`)."""
    if projection == "none":
        return None, None
    if projection == "ridge":
        return ridge_text_projection(corpus), None
    if projection == "heads" and tokenizer_dir:
        return tokenizer_head_projections(tokenizer_dir)
    raise ValueError(f"dense projection {projection!r} (tokenizer {tokenizer_dir!r}): expected one of "
                     f"{PROJECTIONS}, 'heads' with a tokenizer directory")


def split_rows(corpus: Corpus, split: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, query rows) of `split` for a ranking by query features (`what` names it in errors)."""
    if corpus.text_features is None:
        raise ValueError(f"corpus {corpus.name!r} has no text_features.npy: {what} needs query features")
    image_rows, query_rows = corpus.image_rows(split), corpus.query_rows(split)
    if image_rows.size == 0 or query_rows.size == 0:
        raise ValueError(f"corpus {corpus.name!r}: split {split!r} has {image_rows.size} images and "
                         f"{query_rows.size} queries; need at least one of each")
    return image_rows, query_rows


@gin.configurable(denylist=["corpus", "text_projection", "image_projection"])
def dense_baseline(corpus: Corpus, split: str = "test", k: int = 10, backend: str = "jax",
                   text_projection: Projection | None = None, image_projection: Projection | None = None,
                   ks: Sequence[int] = metrics.DEFAULT_KS, batch_size: int = 256
                   ) -> tuple[dict[str, float], list[list[str]]]:
    """Rank the `split` images for every `split` query by cosine similarity of (projected) features.

    Returns image-level metrics and the ranked image ids per query (in `corpus.query_rows(split)` order)."""
    if backend not in BACKENDS:
        raise ValueError(f"dense_baseline: backend must be one of {BACKENDS}, got {backend!r}")
    image_rows, query_rows = split_rows(corpus, split, "the dense baseline")
    image_emb = corpus.image_features[image_rows]
    text_emb = corpus.text_features[query_rows]
    if image_projection is not None:
        image_emb = np.asarray(image_projection(image_emb))
    if text_projection is not None:
        text_emb = np.asarray(text_projection(text_emb))
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"corpus {corpus.name!r}: text features have dim {text_emb.shape[1]} but image features "
                         f"{image_emb.shape[1]}; unaligned features need projection heads (text_projection / "
                         "image_projection) into a shared space")
    image_emb, text_emb = normalize_rows(image_emb), normalize_rows(text_emb)
    k = min(k, len(image_rows))
    if backend == "jax":
        _, rows = JaxExactIndex(image_emb).search(text_emb, k, batch_size)
    else:
        _, rows = faiss_search(text_emb, image_emb, k)
    split_ids = [corpus.images[i].id for i in image_rows]
    ranked = [[split_ids[r] for r in row] for row in rows]
    relevant = [corpus.queries[j].image_ids for j in query_rows]
    return metrics.evaluate_images(ranked, relevant, ks), ranked


def _check_matrix(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array [rows, dim], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what}: dim {x.shape[1]} does not match the index dim {dim}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: rows {np.flatnonzero(~np.isfinite(x).all(axis=1))[:5].tolist()} contain NaN/inf")
    return x.astype(np.float32, copy=False)


def _check_k(k: int, num_images: int) -> int:
    if not 1 <= k <= num_images:
        raise ValueError(f"k must be in [1, {num_images}] (the number of images), got {k}")
    return int(k)
