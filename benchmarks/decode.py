"""Constrained decode speed: our jitted trie beam search vs HuggingFace `generate` + prefix_allowed_tokens_fn.

One run, one set of random weights (T5-small size, v1.0, vocabulary 32128 text + 1024 vokens), saved
once and loaded by both sides. Identifiers: M=4 voken codes from N=1024 with skewed, prefix-dependent code
usage (as residual quantisation produces). Batch 32, beam 20, fixed-length identifiers (no EOS step on
either side: HF runs `max_new_tokens=M`, `length_penalty=0`, so its scores are raw sums like ours).

Measurements are interleaved in rounds (every configuration once per round) and reported as medians over
rounds, since the machine is shared. Prints ONE JSON object (keys per ../shared/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.decoding.beam_search import BeamSearchOptions
from avg_jax.decoding.t5_decode import make_t5_searcher
from avg_jax.decoding.trie import build_trie
from avg_jax.t5.configs import T5Config, named_t5_config
from avg_jax.t5.hf_io import save_hf_t5
from avg_jax.t5.model import init_params


def synthetic_identifiers(rng: np.random.Generator, n: int, codes: int, codebook: int, exponent: float = 0.9
                          ) -> np.ndarray:
    """[n, codes] residual-quantisation-like codes: Zipf-skewed usage, re-permuted per parent code."""
    p = 1.0 / np.arange(1, codebook + 1) ** exponent
    p /= p.sum()
    perms = np.stack([rng.permutation(codebook) for _ in range(codes)])  # [codes, codebook]
    out = np.zeros((n, codes), np.int64)
    parent = np.zeros(n, np.int64)
    for level in range(codes):
        rank = rng.choice(codebook, size=n, p=p)
        out[:, level] = perms[level][(rank + parent * 7919) % codebook]
        parent = parent * codebook + out[:, level]
    return out


def random_queries(rng: np.random.Generator, n: int, length: int, text_vocab: int) -> np.ndarray:
    """[n, length] text token ids, real lengths in [length/2, length], PAD after."""
    ids = rng.integers(3, text_vocab, size=(n, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, size=n)
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids


def decode_flops(config: T5Config, query_length: int, beam: int, steps: int, head_columns: int) -> float:
    """Useful FLOPs per query of our decode (matmuls and attention; first step on one row per query)."""
    d, hd, ff, L = config.d_model, config.num_heads * config.d_kv, config.d_ff, query_length
    mlp = 2 * d * ff * (3 if config.gated else 2)
    encoder = config.num_encoder_layers * L * (2 * 4 * d * hd + 2 * 2 * L * hd + mlp)
    cross_kv = config.num_decoder_layers * L * 2 * 2 * d * hd
    rows = 1 + beam * (steps - 1)
    per_row_step = config.num_decoder_layers * (2 * 4 * d * hd + 2 * 2 * steps * hd + 2 * 2 * d * hd
                                                + 2 * 2 * L * hd + mlp) + 2 * d * head_columns
    return float(encoder + cross_kv + rows * per_row_step)


def dot_flops_per_second(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large float32 jnp.dot, the machine's practical peak."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * size ** 3 / float(np.median(times))


class Ours:
    """One jitted search per (mode, trie capacities); timing over batches of queries."""

    def __init__(self, config, params, options, window, tables, max_length=None, **head_options):
        self.search = make_t5_searcher(config, options, window=window, max_length=max_length, **head_options)
        self.params, self.tables = params, tables

    def run(self, batches):
        out = None
        t = time.perf_counter()
        for batch in batches:
            out = jax.block_until_ready(self.search(self.params, self.tables, batch))
        return time.perf_counter() - t, out


def genre_trie(rows: np.ndarray) -> dict:
    """The dict-of-dicts prefix trie HF-based generative retrieval code uses."""
    root: dict = {}
    for row in rows.tolist():
        node = root
        for tok in row:
            node = node.setdefault(tok, {})
    return root


def hf_run(model, torch, batches, trie, beam, steps, use_cache):
    def allowed(_, sent):
        node = trie
        for tok in sent.tolist()[1:]:
            node = node[tok]
        return list(node)

    t = time.perf_counter()
    outs = []
    with torch.no_grad():
        for batch in batches:
            ids = torch.tensor(batch, dtype=torch.long)
            outs.append(model.generate(input_ids=ids, attention_mask=ids != 0, num_beams=beam,
                                       num_return_sequences=beam, prefix_allowed_tokens_fn=allowed,
                                       max_new_tokens=steps, length_penalty=0.0, do_sample=False,
                                       early_stopping=True, use_cache=use_cache, output_scores=True,
                                       return_dict_in_generate=True))
    return time.perf_counter() - t, outs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="T5 size (named_t5_config); 'tiny' for smoke runs")
    parser.add_argument("--text_vocab", type=int, default=32128)
    parser.add_argument("--codebook", type=int, default=1024, help="N vokens")
    parser.add_argument("--codes", type=int, default=4, help="M codes per identifier")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--query_length", type=int, default=16)
    parser.add_argument("--images", type=int, default=1000, help="image-set size of the HF comparison")
    parser.add_argument("--scales", default="1000,10000,100000,1000000")
    parser.add_argument("--our_batches", type=int, default=2, help="batches per timing of our decode")
    parser.add_argument("--hf_batches", type=int, default=1, help="batches per timing of HF with cache")
    parser.add_argument("--hf_nocache_queries", type=int, default=32, help="queries per HF cache-off timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip_hf", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    config = named_t5_config(args.size, vocab_size=args.text_vocab + args.codebook, dropout_rate=0.0)
    params = jax.device_get(init_params(config, jax.random.key(args.seed)))
    window = (args.text_vocab, args.codebook)
    steps = args.codes

    def trie_for(n):
        codes = synthetic_identifiers(rng, n, args.codes, args.codebook)
        t = time.perf_counter()
        trie = build_trie(tokens=(args.text_vocab + codes).astype(np.int32),
                          lengths=np.full(n, args.codes, np.int32), fixed_length=True)
        return trie, time.perf_counter() - t

    trie, _ = trie_for(args.images)
    queries = random_queries(rng, args.batch * max(args.our_batches, args.hf_batches), args.query_length,
                             args.text_vocab)
    batches = [queries[i * args.batch:(i + 1) * args.batch] for i in range(args.our_batches)]
    n_ours = len(batches) * args.batch

    modes = {
        "vocab": Ours(config, params, BeamSearchOptions(args.beam, "vocab"), window, trie.tables),
        "vocab_chunked": Ours(config, params, BeamSearchOptions(args.beam, "vocab"), window, trie.tables,
                              head_chunk_size=4096),
        "window": Ours(config, params, BeamSearchOptions(args.beam, "window"), window, trie.tables),
        "vocab_unshared_first_step": Ours(config, params, BeamSearchOptions(args.beam, "vocab",
                                                                            share_first_step=False),
                                          window, trie.tables),
        "unconstrained": Ours(config, params, BeamSearchOptions(args.beam, "vocab"), None, None,
                              max_length=steps),
    }
    compile_s = {}
    for name, m in modes.items():
        t = time.perf_counter()
        m.run(batches[:1])
        compile_s[name] = time.perf_counter() - t

    hf = None
    if not args.skip_hf:
        import torch
        import transformers
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_t5(params, config, Path(tmp))
            hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp).eval()
        gtrie = genre_trie(trie.group_tokens)
        hf_batches = [queries[i * args.batch:(i + 1) * args.batch] for i in range(args.hf_batches)]
        nocache_batches = [queries[:args.hf_nocache_queries]]
        hf_run(hf, torch, [queries[:2]], gtrie, args.beam, steps, True)  # warm-up

    times: dict[str, list[float]] = {k: [] for k in [*modes, "hf_cache", "hf_nocache"]}
    results = {}
    for _ in range(args.rounds):
        for name, m in modes.items():
            dt, results[name] = m.run(batches)
            times[name].append(dt)
        if hf is not None:
            dt, hf_out = hf_run(hf, torch, hf_batches, gtrie, args.beam, steps, True)
            times["hf_cache"].append(dt)
            dt, _ = hf_run(hf, torch, nocache_batches, gtrie, args.beam, steps, False)
            times["hf_nocache"].append(dt)
    qps = {name: n_ours / float(np.median(t)) for name, t in times.items() if t and name in modes}

    report: dict = {
        "device": str(jax.devices()[0].device_kind), "num_cpu_devices": jax.device_count(),
        "config": {"size": args.size, "vocab": config.vocab_size, "d_model": config.d_model,
                   "layers": [config.num_encoder_layers, config.num_decoder_layers], "batch": args.batch,
                   "beam": args.beam, "codes": args.codes, "codebook": args.codebook,
                   "query_length": args.query_length, "images": args.images},
        "rounds": args.rounds, "queries_per_timing": n_ours, "compile_s": compile_s,
        "qps": qps,
    }
    if hf is not None:
        report["qps"]["hf_cache"] = args.hf_batches * args.batch / float(np.median(times["hf_cache"]))
        report["qps"]["hf_nocache"] = len(nocache_batches[0]) / float(np.median(times["hf_nocache"]))
        # Parity check on the compared queries: same ranked identifiers, scores within 1e-4.
        ours_tokens = np.asarray(results["vocab"].tokens)[:args.batch]
        ours_scores = np.asarray(results["vocab"].scores)[:args.batch]
        hf_tokens = hf_out[0].sequences.numpy()[:, 1:].reshape(args.batch, args.beam, steps)
        hf_scores = hf_out[0].sequences_scores.numpy().reshape(args.batch, args.beam)
        report["hf_agreement"] = float(np.mean((hf_tokens == ours_tokens).all(axis=(1, 2))))
        report["hf_max_score_diff"] = float(np.abs(hf_scores - ours_scores).max())
        report["speedup_vs_hf"] = qps["vocab"] / report["qps"]["hf_cache"]
        report["speedup_vs_hf_nocache"] = qps["vocab"] / report["qps"]["hf_nocache"]
        report["speedup_vs_hf_voken_head"] = qps["window"] / report["qps"]["hf_cache"]
        report["speedup_vs_hf_nocache_voken_head"] = qps["window"] / report["qps"]["hf_nocache"]

    # Voken-only head: how far its ranking moves from the full-softmax one (recall needs a trained model).
    same_top1 = np.asarray(results["window"].groups)[:, 0] == np.asarray(results["vocab"].groups)[:, 0]
    report["voken_head_top1_agreement"] = float(same_top1.mean())

    dot = dot_flops_per_second()
    flops_vocab = decode_flops(config, args.query_length, args.beam, steps, config.vocab_size + args.codebook)
    flops_window = decode_flops(config, args.query_length, args.beam, steps, args.codebook)
    report["dot_gflops"] = dot / 1e9
    report["decode_gflop_per_query"] = {"vocab": flops_vocab / 1e9, "window": flops_window / 1e9}
    report["flop_utilization"] = flops_vocab * qps["vocab"] / dot
    report["flop_utilization_voken_head"] = flops_window * qps["window"] / dot
    report["constraint_overhead"] = qps["unconstrained"] / qps["vocab"] - 1.0
    report["first_step_sharing_speedup"] = qps["vocab"] / qps["vocab_unshared_first_step"]
    report["chunked_head_speedup"] = qps["vocab_chunked"] / qps["vocab"]

    # Image-set size: same model, same queries; q/s of the HF-compatible mode.
    scale = {}
    for n in [int(s) for s in args.scales.split(",") if s]:
        big, build_s = trie_for(n)
        m = Ours(config, params, BeamSearchOptions(args.beam, "vocab"), window, big.tables)
        m.run(batches[:1])
        dts = [m.run(batches)[0] for _ in range(args.rounds)]
        scale[n] = {"qps": n_ours / float(np.median(dts)), "build_s": build_s,
                    "bytes_per_identifier": big.bytes_per_identifier(), "num_nodes": big.num_nodes,
                    "num_groups": big.num_groups, "max_fanout": big.tables.max_fanout}
        del big, m
    report["scale"] = scale
    sizes = sorted(scale)
    if sizes:
        report["scale_1m_vs_1k"] = scale[sizes[0]]["qps"] / scale[sizes[-1]]["qps"]
        report["bytes_per_identifier"] = scale[sizes[-1]]["bytes_per_identifier"]
        report["scale_sizes_compared"] = [sizes[0], sizes[-1]]
    print(json.dumps(report, indent=1, sort_keys=True, default=str))
    sys.stdout.flush()
    return report


if __name__ == "__main__":
    main()
