"""Train-step throughput of our Flax T5 vs transformers' PyTorch T5, same config, weights, batch and optimizer.

Both sides start from the same weights (the PyTorch model is initialised, saved with `save_pretrained` and
imported with `load_hf_t5`), train with AdamW and dropout on the same fixed batch, and are timed in the same
process. Prints one JSON object: tokens/s (input + target tokens per second) of each side, medians over
`--repeats` timed runs of `--steps` steps after `--warmup` steps (compilation excluded, reported apart).
Repeats alternate between the two sides so background load hits both alike.
`mfu` is model FLOPs utilisation (6 * non-embedding params * tokens + attention) when `--peak_tflops` is
given or the backend is a known GPU; null on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from avg_jax.t5.configs import named_t5_config
from avg_jax.t5.hf_io import config_to_hf, load_hf_t5
from avg_jax.t5.model import T5

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def _batch(args, vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    input_ids = rng.integers(2, vocab_size, (args.batch, args.input_length))
    lengths = rng.integers(args.input_length // 2, args.input_length + 1, args.batch)
    input_ids[np.arange(args.input_length)[None, :] >= lengths[:, None]] = 0  # right padding
    labels = rng.integers(2, vocab_size, (args.batch, args.target_length))
    decoder_input_ids = np.concatenate([np.zeros((args.batch, 1), np.int64), labels[:, :-1]], axis=1)
    return {"input_ids": input_ids, "labels": labels, "decoder_input_ids": decoder_input_ids}


def _warm(step, args) -> tuple[float, float]:
    """Run the warmup steps: (seconds of the first step, compilation included; its loss)."""
    start = time.perf_counter()
    first_loss = step()
    first_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    return first_s, first_loss


def _timed(step, steps: int) -> float:
    """Seconds per step over `steps` consecutive steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench_ours(params, config, batch, args):
    model = T5(config)
    optimizer = optax.adamw(args.learning_rate, weight_decay=args.weight_decay)
    opt_state = optimizer.init(params)
    data = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}

    def loss_fn(params, rng):
        logits = model.apply({"params": params}, data["input_ids"], data["decoder_input_ids"], deterministic=False,
                             rngs={"dropout": rng})
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, data["labels"]))

    @jax.jit
    def train_step(params, opt_state, rng):
        rng, dropout_rng = jax.random.split(rng)
        loss, grads = jax.value_and_grad(loss_fn)(params, dropout_rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rng, loss

    state = [jax.device_put(params), opt_state, jax.random.key(args.seed)]

    def step():
        state[0], state[1], state[2], loss = train_step(*state)
        return float(jax.block_until_ready(loss))

    return step


def bench_torch(model, batch, args):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    input_ids = torch.tensor(batch["input_ids"])
    attention_mask = input_ids != 0
    labels = torch.tensor(batch["labels"])
    torch.manual_seed(args.seed)

    def step():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def train_flops(config, args) -> float:
    """Model FLOPs of one train step: 6 * matmul params per token + attention score/value matmuls."""
    d, h, dk, f = config.d_model, config.num_heads, config.d_kv, config.d_ff
    ffn = (3 if config.gated else 2) * d * f
    attn = 4 * d * h * dk
    enc_tokens, dec_tokens = args.batch * args.input_length, args.batch * args.target_length
    forward = 2 * (enc_tokens * config.num_encoder_layers * (attn + ffn)
                   + dec_tokens * config.num_decoder_layers * (2 * attn + ffn)
                   + dec_tokens * d * config.vocab_size)
    forward += 2 * 2 * h * dk * args.batch * (config.num_encoder_layers * args.input_length ** 2
                                              + config.num_decoder_layers * (args.target_length ** 2
                                                                             + args.target_length * args.input_length))
    return 3.0 * forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "base", "large", "xl", "xxl"])
    parser.add_argument("--version", default="1.0", choices=["1.0", "1.1"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--input_length", type=int, default=32)
    parser.add_argument("--target_length", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="our compute dtype (PyTorch runs float32 unless --torch_autocast)")
    parser.add_argument("--torch_autocast", action="store_true", help="bf16 autocast for PyTorch too")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak, for mfu")
    parser.add_argument("--torch_threads", type=int, default=1,
                        help="torch.set_num_threads; 0 = torch's default (one per core). Default 1: on a shared, "
                             "oversubscribed CPU torch's multi-thread pool collapsed (23 s/step for T5-small at "
                             "2 threads vs 1.9 s at 1), so 1 is its best setting there; use 0 on an idle machine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step compiles)")

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    config = named_t5_config(args.size, args.version)
    torch.manual_seed(args.seed)
    hf_model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config_to_hf(config)))
    if not config.tie_word_embeddings:
        hf_model.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf_model.shared.weight) * config.d_model ** -0.5)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        params, config = load_hf_t5(tmp, dtype=args.dtype)
    batch = _batch(args, config.vocab_size)

    ours = bench_ours(params, config, batch, args)
    ours_compile, ours_loss = _warm(ours, args)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.torch_autocast):
        theirs = bench_torch(hf_model, batch, args)
        torch_compile, torch_loss = _warm(theirs, args)
        ours_steps, torch_steps = [], []
        for _ in range(args.repeats):  # interleaved, so both sides see the same machine load
            ours_steps.append(_timed(ours, args.steps))
            torch_steps.append(_timed(theirs, args.steps))

    tokens = args.batch * (args.input_length + args.target_length)
    ours_step, torch_step = statistics.median(ours_steps), statistics.median(torch_steps)
    device = jax.devices()[0]
    peak = args.peak_tflops
    if peak is None and device.platform == "gpu":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device.device_kind), None)
    flops = train_flops(config, args)
    result = {
        "benchmark": "t5_step",
        "speedup_vs_torch": (tokens / ours_step) / (tokens / torch_step),
        "ours_tokens_per_s": tokens / ours_step,
        "torch_tokens_per_s": tokens / torch_step,
        "ours_step_s_median": ours_step,
        "torch_step_s_median": torch_step,
        "ours_step_s_repeats": ours_steps,
        "torch_step_s_repeats": torch_steps,
        "ours_first_step_s_incl_compile": ours_compile,
        "torch_first_step_s": torch_compile,
        "first_step_loss_ours": ours_loss,
        "first_step_loss_torch": torch_loss,
        "model_tflops_per_step": flops / 1e12,
        "ours_achieved_tflops": flops / ours_step / 1e12,
        "mfu": None if peak is None else flops / ours_step / (peak * 1e12),
        "config": {"size": args.size, "version": args.version, "dtype": args.dtype,
                   "torch_autocast_bf16": args.torch_autocast, "params": int(sum(np.size(x) for x in
                                                                                   jax.tree_util.tree_leaves(params)))},
        "batch": args.batch, "input_length": args.input_length, "target_length": args.target_length,
        "tokens_per_step": tokens, "steps_per_repeat": args.steps, "repeats": args.repeats, "warmup": args.warmup,
        "optimizer": f"AdamW(lr={args.learning_rate}, wd={args.weight_decay}), dropout {config.dropout_rate}",
        "device": f"{device.platform}:{device.device_kind}", "torch_threads": torch.get_num_threads(),
        "xla_cpu_threads": "XLA default (all cores)",
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
