"""Queries/s against image-set size: dense exact search (jit jnp.dot + top_k, faiss IndexFlatIP) vs our
trie-constrained generative decode, measured in one run (paper Fig. 4 / Table 2, done honestly).

Dense is measured search-only and including a query-encoder forward pass. The default query encoder is
the text tower of CLIP ViT-L/14 (the encoder the AVG authors' dense baseline used: 12 layers, width 768,
123M parameters; random weights, which cost the same arithmetic as trained ones) at the stated token length.
The generative column runs our constrained beam search with a T5-small-size model over random identifier
tables of each size; its cost includes the T5 encoder. Dense uses its strongest exact baseline (batched
jit matmul), not the one-query-at-a-time float64 search behind the paper's CLIP figure.

Prints ONE JSON object (keys per shared/BENCHMARKS.md: `crossover_images` + per-size q/s tables) and draws
a PNG. `crossover_images` is the smallest measured size at which the generative decode is at least as fast as
the faster dense backend (search only); null when it lies beyond the largest size measured, in which case
`crossover_images_extrapolated` extends dense's measured 1/N scaling from the largest size.

    python benchmarks/efficiency.py                       # 1K .. 1M, d=768, batch 32, k=10
    python benchmarks/efficiency.py --sizes 1000,10000 --no_encoder   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def median_seconds(fn: Callable[[int], object], min_repeats: int, min_seconds: float) -> tuple[float, int]:
    """Median wall time of fn(i) over at least `min_repeats` calls and `min_seconds` in total (after 1 warm-up)."""
    fn(-1)
    times: list[float] = []
    while len(times) < min_repeats or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn(len(times))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def jax_search_qps(images: np.ndarray, queries: list[np.ndarray], k: int, args) -> tuple[float, int]:
    """Search-only q/s of our jit jnp.dot + top_k index (`avg_jax.evaluation.dense.JaxExactIndex`)."""
    import jax

    from avg_jax.evaluation import dense

    batch = queries[0].shape[0]
    index = dense.JaxExactIndex(images, dtype=args.dtype)
    sec, reps = median_seconds(
        lambda i: jax.block_until_ready(index.search(queries[i % len(queries)], k, batch_size=batch)),
        args.repeats, args.min_seconds)
    return batch / sec, reps


def faiss_search_qps(images: np.ndarray, queries: list[np.ndarray], k: int, args) -> tuple[float, int]:
    """Search-only q/s of faiss IndexFlatIP on the same vectors."""
    import faiss

    flat = faiss.IndexFlatIP(images.shape[1])
    flat.add(images)
    sec, reps = median_seconds(lambda i: flat.search(queries[i % len(queries)], k), args.repeats,
                               args.min_seconds)
    return queries[0].shape[0] / sec, reps


def dense_search_qps(images: np.ndarray, queries: list[np.ndarray], k: int, args) -> dict[str, float]:
    """Both dense backends on the same vectors (each index is freed before the next is built)."""
    out = dict(zip(("jax_search_qps", "jax_repeats"), jax_search_qps(images, queries, k, args), strict=True))
    if not args.no_faiss:
        out.update(zip(("faiss_search_qps", "faiss_repeats"), faiss_search_qps(images, queries, k, args),
                       strict=True))
    return out


def query_encoder_qps(args) -> dict:
    """q/s of the query encoder's forward pass (CLIP ViT-L/14 text tower, random weights, PyTorch)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    model = transformers.CLIPTextModelWithProjection(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.query_tokens))
    with torch.inference_mode():
        sec, reps = median_seconds(lambda _: model(input_ids=ids).text_embeds, max(2, args.repeats // 2), 0.0)
    params = sum(p.numel() for p in model.parameters())
    return {"name": "CLIP ViT-L/14 text tower (random weights)", "params": params, "layers": 12, "width": 768,
            "tokens": args.query_tokens, "batch": args.batch, "qps": args.batch / sec, "repeats": reps,
            "framework": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}


def random_identifiers(n: int, levels: int, codebook: int, text_vocab: int, rng: np.random.Generator
                       ) -> np.ndarray:
    """n distinct fixed-length voken identifiers [n, levels] int32 (model ids: text_vocab + code)."""
    if n > codebook ** levels:
        raise ValueError(f"{n} distinct identifiers need codebook ** levels >= n, got {codebook} ** {levels}")
    codes = np.empty((0, levels), np.int64)
    while len(codes) < n:  # redraw the few duplicates (1024^4 codes: collisions are rare)
        extra = rng.integers(0, codebook, (n - len(codes), levels))
        codes = np.unique(np.concatenate([codes, extra]), axis=0)
    return (rng.permutation(codes)[:n] + text_vocab).astype(np.int32)


def generative_qps(sizes: list[int], args) -> tuple[dict[int, float], dict]:
    """Our constrained decode's q/s per image-set size (T5-small-size model, random weights, one compiled
    search per size) and the model's description."""
    import jax

    from avg_jax.data.vocab import pad_vocab_size
    from avg_jax.decoding import trie
    from avg_jax.decoding.beam_search import BeamSearchOptions
    from avg_jax.t5 import configs, model
    from avg_jax.t5.decoding import t5_beam_search

    text_vocab = 32128
    config = configs.named_t5_config(args.t5_size, vocab_size=pad_vocab_size(text_vocab + args.codebook),
                                     dropout_rate=0.0, dtype=args.dtype)
    params = model.init_params(config, jax.random.PRNGKey(args.seed))
    options = BeamSearchOptions(beam_size=args.beam)
    rng = np.random.default_rng(args.seed + 1)
    input_ids = [jax.numpy.asarray(rng.integers(2, text_vocab, (args.batch, args.query_tokens)), jax.numpy.int32)
                 for _ in range(4)]
    out, details = {}, {}
    for n in sizes:
        tokens = random_identifiers(n, args.levels, args.codebook, text_vocab, rng)
        t0 = time.perf_counter()
        built = trie.build_trie(tokens=tokens, lengths=np.full(n, args.levels, np.int32), fixed_length=True)
        build_s = time.perf_counter() - t0
        window = trie.identifier_window(built, config.vocab_size, text_vocab)
        search = jax.jit(lambda params, tables, ids, window=window: t5_beam_search(
            params, config, ids, tables, options=options, window=window))
        sec, reps = median_seconds(
            lambda i, search=search, built=built: jax.block_until_ready(
                search(params, built.tables, input_ids[i % len(input_ids)])),
            args.gen_repeats, 0.0)
        out[n] = args.batch / sec
        details[str(n)] = {"repeats": reps, "trie_build_s": round(build_s, 2),
                           "bytes_per_identifier": round(built.bytes_per_identifier(), 1)}
    model_info = {"model": f"T5-{args.t5_size} size (d_model {config.d_model}, {config.num_encoder_layers}+"
                           f"{config.num_decoder_layers} layers, random weights)",
                  "vocab": config.vocab_size, "beam": args.beam, "levels_M": args.levels,
                  "codebook_N": args.codebook, "score_normalization": options.score_normalization,
                  "dtype": config.dtype,
                  "query_tokens": args.query_tokens, "per_size": details}
    return out, model_info


def crossover(sizes: list[int], generative: dict[int, float], dense: dict[int, float]) -> dict:
    """Smallest size where generative q/s >= dense q/s; else an extrapolation from dense's 1/N scaling."""
    for n in sizes:
        if generative[n] >= dense[n]:
            return {"measured": n, "extrapolated": None}
    last = sizes[-1]
    return {"measured": None, "extrapolated": int(last * dense[last] / generative[last])}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    series = [("dense_jax_search_qps", "dense exact, jit jnp.dot + top_k (search only)", "C0", "-"),
              ("dense_faiss_search_qps", "dense exact, faiss IndexFlatIP (search only)", "C1", "-"),
              ("dense_with_encoder_qps", "dense best + query encoder (CLIP-L text tower)", "C2", "--"),
              ("generative_qps", "generative: constrained beam search", "C3", "-")]
    for key, label, colour, style in series:
        values = result.get(key)
        if values:
            if key == "generative_qps":
                gen = result["generative_model"]
                label = f"{label} ({gen['model'].split(' (')[0]}, beam {gen['beam']}, M={gen['levels_M']})"
            ax.plot(sizes, [values[str(n)] for n in sizes], style, marker="o", color=colour, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image-set size (identifiers)")
    ax.set_ylabel("queries / second")
    enc = result.get("query_encoder") or {}
    ax.set_title(f"{result['device']}: d={result['dim']}, batch {result['batch']}, k={result['k']}"
                 + (f", encoder {enc['tokens']} tokens" if enc else ""), fontsize=10)
    if result["crossover_images"]:
        ax.axvline(result["crossover_images"], color="grey", ls=":", label="crossover")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000,300000,1000000")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--query_tokens", type=int, default=32, help="query length for the encoder forward pass")
    p.add_argument("--repeats", type=int, default=5, help="minimum timed batches per measurement (median)")
    p.add_argument("--min_seconds", type=float, default=1.0, help="minimum timed seconds per measurement")
    p.add_argument("--t5_size", default="small", help="generative: T5 size (small as in the paper's T5-small)")
    p.add_argument("--beam", type=int, default=20, help="generative: beam size")
    p.add_argument("--levels", type=int, default=4, help="generative: identifier length M")
    p.add_argument("--codebook", type=int, default=1024, help="generative: codebook size N")
    p.add_argument("--gen_repeats", type=int, default=3, help="generative: timed batches per size (median)")
    p.add_argument("--no_faiss", action="store_true")
    p.add_argument("--no_encoder", action="store_true")
    p.add_argument("--out_dir", default="bench_out", help="where efficiency.png goes")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="operands of the jit dense search and of the T5 decode (float32 accumulation either way); "
                        "faiss and the PyTorch query encoder stay float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import jax

    from avg_jax.data.corpus import normalize_rows

    sizes = sorted(int(s) for s in args.sizes.split(","))
    rng = np.random.default_rng(args.seed)
    queries = [normalize_rows(rng.standard_normal((args.batch, args.dim), dtype=np.float32)) for _ in range(8)]
    per_size: dict[int, dict] = {}
    for n in sizes:
        images = np.empty((n, args.dim), np.float32)
        for start in range(0, n, 100_000):  # chunked: 1M x 768 is 3 GB
            images[start:start + 100_000] = normalize_rows(
                rng.standard_normal((min(100_000, n - start), args.dim), dtype=np.float32))
        per_size[n] = dense_search_qps(images, queries, args.k, args)
        del images
    dense_jax = {n: per_size[n]["jax_search_qps"] for n in sizes}
    dense_faiss = {n: per_size[n]["faiss_search_qps"] for n in sizes} if not args.no_faiss else None
    best = {n: max(dense_jax[n], dense_faiss[n] if dense_faiss else 0.0) for n in sizes}
    encoder = None if args.no_encoder else query_encoder_qps(args)
    # Encoder and search run one after the other on the same cores: times add.
    with_encoder = {n: 1.0 / (1.0 / best[n] + 1.0 / encoder["qps"]) for n in sizes} if encoder else None
    generative, generative_model = generative_qps(sizes, args)
    cross = crossover(sizes, generative, best)
    cross_enc = crossover(sizes, generative, with_encoder) if with_encoder else {"measured": None,
                                                                                  "extrapolated": None}

    def table(d):
        return None if d is None else {str(n): round(v, 3) for n, v in d.items()}

    device = f"{jax.devices()[0].platform} x{jax.device_count()}"
    result = {
        "crossover_images": cross["measured"],
        "crossover_images_extrapolated": cross["extrapolated"],
        "crossover_images_with_encoder": cross_enc["measured"],
        "crossover_images_with_encoder_extrapolated": cross_enc["extrapolated"],
        "sizes": sizes, "dim": args.dim, "batch": args.batch, "k": args.k, "device": device,
        "dense_jax_search_qps": table(dense_jax), "dense_faiss_search_qps": table(dense_faiss),
        "dense_best_search_qps": table(best), "dense_with_encoder_qps": table(with_encoder),
        "generative_qps": table(generative), "generative_model": generative_model, "dtype": args.dtype,
        "query_encoder": encoder,
        "repeats": {str(n): {k: v for k, v in per_size[n].items() if k.endswith("repeats")} for n in sizes},
        "timing": "median wall time per batch after one warm-up batch; q/s = batch / median",
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "efficiency.png")
    result["png"] = str(out / "efficiency.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
