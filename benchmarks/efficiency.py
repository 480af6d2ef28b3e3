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
from pathlib import Path

import numpy as np

from avg_jax.evaluation.efficiency import TIMING, dense_search_qps, generative_qps, median_seconds, random_unit_rows
from avg_jax.evaluation.report import plot_qps


def faiss_search_qps(images: np.ndarray, queries: list[np.ndarray], k: int, args) -> tuple[float, int]:
    """Search-only q/s of faiss IndexFlatIP on the same vectors."""
    import faiss

    flat = faiss.IndexFlatIP(images.shape[1])
    flat.add(images)
    sec, reps = median_seconds(lambda i: flat.search(queries[i % len(queries)], k), args.repeats,
                               args.min_seconds)
    return queries[0].shape[0] / sec, reps


def both_dense_qps(images: np.ndarray, queries: list[np.ndarray], k: int, args) -> dict[str, float]:
    """Both dense backends on the same vectors (each index is freed before the next is built)."""
    qps = dense_search_qps(images, queries, k, args.repeats, args.min_seconds, args.dtype)
    out = dict(zip(("jax_search_qps", "jax_repeats"), qps, strict=True))
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


def generative_model_qps(sizes: list[int], args) -> tuple[dict[int, float], dict]:
    """Our constrained decode's q/s per image-set size (T5-small-size model, random weights, one compiled
    search per size) and the model's description."""
    import jax

    from avg_jax.data.vocab import pad_vocab_size
    from avg_jax.retrieval.model import RetrievalModel
    from avg_jax.t5 import configs, model

    text_vocab = 32128
    config = configs.named_t5_config(args.t5_size, vocab_size=pad_vocab_size(text_vocab + args.codebook),
                                     dropout_rate=0.0, dtype=args.dtype)
    params = model.init_params(config, jax.random.PRNGKey(args.seed))
    retrieval_model = RetrievalModel(config, None, window=(text_vocab, config.vocab_size - text_vocab),
                                     input_length=args.query_tokens, target_length=args.levels)
    out, details = generative_qps(retrieval_model, params, text_vocab, sizes, args.levels, args.codebook, args.batch,
                                  args.beam, args.query_tokens, args.gen_repeats, args.seed)
    model_info = {"model": f"T5-{args.t5_size} size (d_model {config.d_model}, {config.num_encoder_layers}+"
                           f"{config.num_decoder_layers} layers, random weights)",
                  "vocab": config.vocab_size, "beam": args.beam, "levels_M": args.levels,
                  "codebook_N": args.codebook,
                  "score_normalization": retrieval_model.score_normalization,
                  "dtype": config.dtype, "query_tokens": args.query_tokens, "per_size": details}
    return out, model_info


def crossover(sizes: list[int], generative: dict[int, float], dense: dict[int, float]) -> dict:
    """Smallest size where generative q/s >= dense q/s; else an extrapolation from dense's 1/N scaling."""
    for n in sizes:
        if generative[n] >= dense[n]:
            return {"measured": n, "extrapolated": None}
    last = sizes[-1]
    return {"measured": None, "extrapolated": int(last * dense[last] / generative[last])}


def plot(result: dict, path: Path) -> None:
    series = [("dense_jax_search_qps", "dense exact, jit jnp.dot + top_k (search only)", "C0", "-"),
              ("dense_faiss_search_qps", "dense exact, faiss IndexFlatIP (search only)", "C1", "-"),
              ("dense_with_encoder_qps", "dense best + query encoder (CLIP-L text tower)", "C2", "--"),
              ("generative_qps", "generative: constrained beam search", "C3", "-")]
    gen = result["generative_model"]
    gen_label = f" ({gen['model'].split(' (')[0]}, beam {gen['beam']}, M={gen['levels_M']})"
    enc = result.get("query_encoder") or {}
    plot_qps(path, result["sizes"],
             [(label + (gen_label if key == "generative_qps" else ""), result[key], colour, style)
              for key, label, colour, style in series if result.get(key)],
             f"{result['device']}: d={result['dim']}, batch {result['batch']}, k={result['k']}"
             + (f", encoder {enc['tokens']} tokens" if enc else ""), crossover=result["crossover_images"])


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

    sizes = sorted(int(s) for s in args.sizes.split(","))
    rng = np.random.default_rng(args.seed)
    queries = [random_unit_rows(rng, args.batch, args.dim) for _ in range(8)]
    per_size = {n: both_dense_qps(random_unit_rows(rng, n, args.dim), queries, args.k, args) for n in sizes}
    dense_jax = {n: per_size[n]["jax_search_qps"] for n in sizes}
    dense_faiss = {n: per_size[n]["faiss_search_qps"] for n in sizes} if not args.no_faiss else None
    best = {n: max(dense_jax[n], dense_faiss[n] if dense_faiss else 0.0) for n in sizes}
    encoder = None if args.no_encoder else query_encoder_qps(args)
    # Encoder and search run one after the other on the same cores: times add.
    with_encoder = {n: 1.0 / (1.0 / best[n] + 1.0 / encoder["qps"]) for n in sizes} if encoder else None
    generative, generative_model = generative_model_qps(sizes, args)
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
        "timing": TIMING,
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
