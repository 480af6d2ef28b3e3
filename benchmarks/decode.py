"""Constrained decode speed: our jitted trie beam search vs HuggingFace `generate` + prefix_allowed_tokens_fn.

One run, one set of random weights (T5-small size, v1.0, vocabulary 32128 text + 1024 vokens), saved
once and loaded by both sides. Identifiers: M=4 voken codes from N=1024 with skewed, prefix-dependent code
usage (as residual quantisation produces). Batch 32, beam 20, fixed-length identifiers (no EOS step on
either side: HF runs `max_new_tokens=M`, `length_penalty=0`, so its scores are raw sums like ours).

Measurements are interleaved in rounds (every configuration once per round) and reported as medians over
rounds, since the machine is shared. Prints ONE JSON object (keys per ../shared/BENCHMARKS.md).

'vocab_voken_prior' is the 'vocab' search with a per-query token bias over the vokens (the aligned-voken prior
of `RerankConfig.prior_weight`); `voken_prior_overhead` = its extra time relative to 'vocab'.

Every mode also runs with bfloat16 activations ('*_bf16': float32 parameters, accumulation and scores):
its ratios are the '*_bf16' keys, its FLOP utilisation is against a bfloat16 `jnp.dot` (float32 result),
and `bf16_top1_agreement` / `hf_agreement_bf16` say how far its rankings move from float32's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.decoding.trie import build_trie
from avg_jax.retrieval.model import RetrievalModel
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


def dot_timer(size: int = 2048, dtype: str = "float32"):
    """A timed large jnp.dot of `dtype` inputs, float32 result (the machine's practical peak) -> FLOP/s."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()

    def measure() -> float:
        t = time.perf_counter()
        for _ in range(3):
            f(a).block_until_ready()
        return 3 * 2 * size ** 3 / (time.perf_counter() - t)

    return measure


def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args)
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

    outs = []
    with torch.no_grad():
        for batch in batches:
            ids = torch.tensor(batch, dtype=torch.long)
            outs.append(model.generate(input_ids=ids, attention_mask=ids != 0, num_beams=beam,
                                       num_return_sequences=beam, prefix_allowed_tokens_fn=allowed,
                                       max_new_tokens=steps, length_penalty=0.0, do_sample=False,
                                       early_stopping=True, use_cache=use_cache, output_scores=True,
                                       return_dict_in_generate=True))
    return outs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="T5 size (named_t5_config); 'tiny' for smoke runs")
    parser.add_argument("--text_vocab", type=int, default=32128)
    parser.add_argument("--codebook", type=int, default=1024, help="N vokens")
    parser.add_argument("--codes", type=int, default=4, help="M codes per identifier")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--query_length", type=int, default=16)
    parser.add_argument("--scales", default="1000,10000,100000,1000000",
                        help="image-set sizes; the first one is also the HF comparison's")
    parser.add_argument("--hf_nocache_queries", type=int, default=16, help="queries per HF cache-off timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip_hf", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    config = named_t5_config(args.size, vocab_size=args.text_vocab + args.codebook, dropout_rate=0.0)
    params = jax.device_get(init_params(config, jax.random.key(args.seed)))
    window = (args.text_vocab, args.codebook)
    steps, beam = args.codes, args.beam
    queries = random_queries(rng, args.batch, args.query_length, args.text_vocab)

    sizes = [int(x) for x in args.scales.split(",") if x]
    tries, build_s = {}, {}
    for n in sizes:
        tokens = (args.text_vocab + synthetic_identifiers(rng, n, args.codes, args.codebook)).astype(np.int32)
        build_s[n], tries[n] = timed(lambda tokens=tokens: build_trie(
            tokens=tokens, lengths=np.full(len(tokens), args.codes, np.int32), fixed_length=True))
    trie = tries[sizes[0]]

    # Every mode goes through the RetrievalModel (over token ids: no vocabulary), as retrieval does.
    model = RetrievalModel(config, None, window=window, input_length=args.query_length, target_length=steps)
    bf16 = model.replace(config=dataclasses.replace(config, dtype="bfloat16"))

    def searcher(tables, mode=model, token_bias=None, **kw):
        search = mode.search_fn(beam, **kw)
        return lambda: jax.block_until_ready(search(params, tables, queries, token_bias=token_bias))

    # The aligned-voken prior's per-query token bias (a [batch, vokens] array; its host-side [q, d] x [d, N]
    # product is not timed): what fusing the dense expert into every step costs the search.
    prior_bias = jnp.asarray(rng.normal(size=(args.batch, args.codebook)), jnp.float32)

    runs = {  # every configuration on the same batch of queries, interleaved in each round
        "vocab": searcher(trie.tables),
        "vocab_bf16": searcher(trie.tables, bf16),
        "window_bf16": searcher(trie.tables, bf16.replace(score_normalization="window")),
        "vocab_unchunked": searcher(trie.tables, head_chunk_size=0),
        "window": searcher(trie.tables, model.replace(score_normalization="window")),
        "vocab_unshared_first_step": searcher(trie.tables, model.replace(share_first_step=False)),
        "vocab_voken_prior": searcher(trie.tables, token_bias=prior_bias),
        "unconstrained": searcher(None, model.replace(window=(0, config.vocab_size)), max_length=steps),
        **{f"scale_{n}": searcher(tries[n].tables) for n in sizes[1:]},
    }
    compile_s = {name: timed(run)[0] for name, run in runs.items()}
    results = {name: runs[name]() for name in ("vocab", "window", "vocab_bf16", "window_bf16")}
    query_counts = dict.fromkeys(runs, args.batch)

    hf_outputs = None
    if not args.skip_hf:
        import torch
        import transformers
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_t5(params, config, Path(tmp))
            hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp).eval()
        gtrie = genre_trie(trie.group_tokens)
        nocache = queries[:args.hf_nocache_queries]
        runs["hf_cache"] = lambda: hf_run(hf, torch, [queries], gtrie, beam, steps, True)
        runs["hf_nocache"] = lambda: hf_run(hf, torch, [nocache], gtrie, beam, steps, False)
        query_counts.update(hf_cache=args.batch, hf_nocache=len(nocache))
        hf_outputs = runs["hf_cache"]()  # also the warm-up

    measure_dot, measure_dot_bf16 = dot_timer(), dot_timer(dtype="bfloat16")
    rounds = []
    for _ in range(args.rounds):
        qps = {"dot_gflops": measure_dot() / 1e9, "dot_gflops_bf16": measure_dot_bf16() / 1e9}
        for name, run in runs.items():
            qps[name] = query_counts[name] / timed(run)[0]
        rounds.append(qps)

    def median(fn):
        return float(np.median([fn(r) for r in rounds]))

    flops_vocab = decode_flops(config, args.query_length, beam, steps, config.vocab_size + args.codebook)
    flops_window = decode_flops(config, args.query_length, beam, steps, args.codebook)
    report: dict = {
        "device": str(jax.devices()[0].device_kind),
        "config": {"size": args.size, "vocab": config.vocab_size, "d_model": config.d_model,
                   "layers": [config.num_encoder_layers, config.num_decoder_layers], "batch": args.batch,
                   "beam": beam, "codes": args.codes, "codebook": args.codebook,
                   "query_length": args.query_length, "hf_compared_images": sizes[0]},
        "rounds": args.rounds, "note": "q/s and ratios are medians over rounds; each ratio is taken within a round",
        "compile_s": compile_s, "trie_build_s": {n: build_s[n] for n in sizes},
        "qps": {name: median(lambda r, name=name: r[name]) for name in rounds[0]},
        "decode_gflop_per_query": {"vocab": flops_vocab / 1e9, "window": flops_window / 1e9},
        "flop_utilization": median(lambda r: flops_vocab * r["vocab"] / (r["dot_gflops"] * 1e9)),
        "flop_utilization_voken_head": median(lambda r: flops_window * r["window"] / (r["dot_gflops"] * 1e9)),
        "flop_utilization_bf16": median(lambda r: flops_vocab * r["vocab_bf16"] / (r["dot_gflops_bf16"] * 1e9)),
        "flop_utilization_voken_head_bf16": median(
            lambda r: flops_window * r["window_bf16"] / (r["dot_gflops_bf16"] * 1e9)),
        "constraint_overhead": median(lambda r: r["unconstrained"] / r["vocab"] - 1.0),
        "first_step_sharing_speedup": median(lambda r: r["vocab"] / r["vocab_unshared_first_step"]),
        "chunked_head_speedup": median(lambda r: r["vocab"] / r["vocab_unchunked"]),
        "voken_prior_overhead": median(lambda r: r["vocab"] / r["vocab_voken_prior"] - 1.0),
    }
    # Voken-only head: how far its ranking moves from the full-softmax one (recall needs a trained model).
    def top1_agreement(a: str, b: str) -> float:
        return float(np.mean(np.asarray(results[a].groups)[:, 0] == np.asarray(results[b].groups)[:, 0]))

    report["voken_head_top1_agreement"] = top1_agreement("window", "vocab")
    report["bf16_top1_agreement"] = top1_agreement("vocab_bf16", "vocab")
    report["bf16_voken_head_top1_agreement"] = top1_agreement("window_bf16", "window")
    if hf_outputs is not None:
        for key, ours in (("speedup_vs_hf", "vocab"), ("speedup_vs_hf_voken_head", "window"),
                          ("speedup_vs_hf_bf16", "vocab_bf16"), ("speedup_vs_hf_voken_head_bf16", "window_bf16")):
            report[key] = median(lambda r, ours=ours: r[ours] / r["hf_cache"])
            report[key.replace("hf", "hf_nocache", 1)] = median(lambda r, ours=ours: r[ours] / r["hf_nocache"])
        # Parity on the compared queries: same ranked identifiers, scores within 1e-4.
        hf_tokens = hf_outputs[0].sequences.numpy()[:, 1:].reshape(args.batch, beam, steps)
        hf_scores = hf_outputs[0].sequences_scores.numpy().reshape(args.batch, beam)
        for suffix, ours in (("", "vocab"), ("_bf16", "vocab_bf16")):
            ours_tokens, ours_scores = np.asarray(results[ours].tokens), np.asarray(results[ours].scores)
            report[f"hf_agreement{suffix}"] = float(np.mean((hf_tokens == ours_tokens).all(axis=(1, 2))))
            report[f"hf_max_score_diff{suffix}"] = float(np.abs(hf_scores - ours_scores).max())

    scale_key = {sizes[0]: "vocab", **{n: f"scale_{n}" for n in sizes[1:]}}
    report["scale"] = {n: {"qps": report["qps"][scale_key[n]], "build_s": build_s[n],
                           "bytes_per_identifier": tries[n].bytes_per_identifier(),
                           "num_nodes": tries[n].num_nodes, "num_groups": tries[n].num_groups,
                           "max_fanout": tries[n].tables.max_fanout} for n in sizes}
    report["scale_1m_vs_1k"] = median(lambda r: r["vocab"] / r[scale_key[sizes[-1]]])
    report["scale_sizes_compared"] = [sizes[0], sizes[-1]]
    report["bytes_per_identifier"] = tries[sizes[-1]].bytes_per_identifier()
    print(json.dumps(report, indent=1, sort_keys=True, default=str))
    sys.stdout.flush()
    return report


if __name__ == "__main__":
    main()
