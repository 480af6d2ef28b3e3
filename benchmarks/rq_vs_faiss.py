"""Our trained RQ vs faiss ResidualQuantizer (greedy, max_beam_size=1): reconstruction MSE and encode speed.

Same data (SYNTHETIC image features, L2-normalised, trained on the train split, measured on all images),
same N and M. Like for like: our per-level-codebook mode, alignment weight 0, features used as given
(no projection heads, code_dim = feature dim), MSE of the RQ reconstruction ẑ^(M) (sum of vokens, what
faiss decodes), not of the MLP decoder. Beside it: our shared-codebook mode (the paper's) and the shared
mode with alignment weight 1. Encode throughput: vectors/s of code assignment over all images, median of
--repeats timed runs after a warm-up, both libraries on the same host threads. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import faiss
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.data.corpus import normalize_rows
from avg_jax.data.synthetic import make_synthetic_corpus
from avg_jax.tokenizer.losses import TokenizerLossWeights
from avg_jax.tokenizer.model import RQTokenizerConfig
from avg_jax.tokenizer.quantizer import rq_encode_codes
from avg_jax.tokenizer.train import TokenizerData, encode_images, train_tokenizer


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for jax)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def ours(data: TokenizerData, x_all: np.ndarray, config: RQTokenizerConfig, align: float, args) -> dict:
    tok = train_tokenizer(data, config, TokenizerLossWeights(align=align), steps=args.steps,
                          batch_size=args.batch_size, learning_rate=args.learning_rate, contrastive_steps=0,
                          seed=args.seed, log_every=max(args.steps, 1))
    enc = encode_images(tok, x_all)
    return {"mse": float(np.mean(enc.quantization_error)), "decoder_mse": float(np.mean(
        np.sum((x_all - enc.v_hat) ** 2, axis=1))), "tokenizer": tok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_images", type=int, default=5000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--codebook_size", type=int, default=256, help="N")
    p.add_argument("--num_levels", type=int, default=4, help="M")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--faiss_niter", type=int, default=25, help="k-means iterations per faiss level (ours: 25)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    corpus = make_synthetic_corpus(seed=args.seed, num_images=args.num_images, image_dim=args.dim, text_dim=args.dim)
    data = TokenizerData.from_corpus(corpus, "train")
    x_train = normalize_rows(data.image_features)
    x_all = normalize_rows(corpus.image_features)
    base = RQTokenizerConfig(code_dim=args.dim, codebook_size=args.codebook_size, num_levels=args.num_levels,
                             projection_heads=False)
    per_level = ours(data, x_all, dataclasses.replace(base, shared_codebook=False), 0.0, args)
    shared = ours(data, x_all, base, 0.0, args)
    aligned = ours(data, x_all, base, 1.0, args)

    nbits = int(np.log2(args.codebook_size))
    if 1 << nbits != args.codebook_size:
        raise ValueError(f"--codebook_size must be a power of two for faiss, got {args.codebook_size}")
    rq = faiss.ResidualQuantizer(args.dim, args.num_levels, nbits)
    rq.max_beam_size = 1
    rq.cp.niter = args.faiss_niter
    start = time.perf_counter()
    rq.train(x_train)
    faiss_train_s = time.perf_counter() - start
    faiss_codes = rq.compute_codes(x_all)
    faiss_mse = float(np.mean(np.sum((x_all - rq.decode(faiss_codes)) ** 2, axis=1)))

    books = jnp.asarray(per_level["tokenizer"].params["codebooks"])
    x_dev = jnp.asarray(x_all)
    ours_s = median_seconds(lambda: jax.block_until_ready(rq_encode_codes(x_dev, books, args.num_levels)),
                            args.repeats)
    faiss_s = median_seconds(lambda: rq.compute_codes(x_all), args.repeats)
    n = x_all.shape[0]
    out = {
        "benchmark": "rq_vs_faiss", "data": "synthetic image features (L2-normalised)", "num_vectors": n,
        "num_train": int(x_train.shape[0]), "dim": args.dim, "N": args.codebook_size, "M": args.num_levels,
        "mse_ratio": per_level["mse"] / faiss_mse,
        "throughput_ratio": (n / ours_s) / (n / faiss_s),
        "ours_per_level_mse": per_level["mse"], "faiss_mse": faiss_mse,
        "ours_shared_codebook_mse": shared["mse"], "ours_shared_codebook_align1_mse": aligned["mse"],
        "ours_per_level_decoder_mse": per_level["decoder_mse"],
        "ours_encode_vectors_per_s": n / ours_s, "faiss_encode_vectors_per_s": n / faiss_s,
        "faiss_train_seconds": faiss_train_s, "faiss_niter": args.faiss_niter, "steps": args.steps,
        "repeats": args.repeats, "timing": "median", "faiss_omp_threads": faiss.omp_get_max_threads(),
        "host_cpus": os.cpu_count(), "jax_backend": jax.default_backend(), "machine": platform.machine(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
