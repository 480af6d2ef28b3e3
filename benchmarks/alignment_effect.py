"""Does the alignment loss (AVG eq. 5) make caption-similar images share identifier prefixes?

Trains the tokenizer on the SYNTHETIC benchmark twice, identical except for the alignment weight
(0 = IRGen, > 0 = AVG), and reports `caption_neighbour_prefix_sharing` (avg_jax/tokenizer/stats.py): for
each image, its most caption-similar other image (cosine of mean raw caption features) — how often the
two share the first voken, and their mean common-prefix length, on train and test images. Prints one JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import gin

from avg_jax.data.synthetic import make_synthetic_corpus
from avg_jax.tokenizer.losses import TokenizerLossWeights
from avg_jax.tokenizer.model import RQTokenizerConfig
from avg_jax.tokenizer.stats import caption_neighbour_prefix_sharing, reconstruction_and_alignment
from avg_jax.tokenizer.train import TokenizerData, encode_images, train_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num_images", type=int, default=5000)
    p.add_argument("--align", type=float, nargs="+", default=[1.0], help="alignment weight(s) of the AVG run(s)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--contrastive_steps", type=int, default=500)
    p.add_argument("--finetune_image_head", type=int, default=1)
    p.add_argument("--contrastive_weight", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    gin.clear_config()
    corpus = make_synthetic_corpus(seed=args.seed, num_images=args.num_images)
    data = TokenizerData.from_corpus(corpus, "train")
    config = RQTokenizerConfig()
    out = {"corpus": "synthetic", "num_images": args.num_images, "config": vars(args),
           "tokenizer": {k: getattr(config, k) for k in ("codebook_size", "num_levels", "code_dim", "shared_codebook")},
           "metric": "caption_neighbour_prefix_sharing"}
    runs = [("irgen_align_0", 0.0)] + [(f"avg_align_{w:g}", w) for w in args.align]
    for name, weight in runs:
        start = time.perf_counter()
        tok = train_tokenizer(data, config, TokenizerLossWeights(align=weight), steps=args.steps,
                              contrastive_steps=args.contrastive_steps, seed=args.seed,
                              finetune_image_head=bool(args.finetune_image_head),
                              contrastive_weight=args.contrastive_weight, log_every=max(args.steps, 1))
        enc = encode_images(tok, corpus.image_features)
        out[name] = {"train_seconds": time.perf_counter() - start,
                     "prefix_sharing": {s: caption_neighbour_prefix_sharing(corpus, enc.codes, s)
                                        for s in ("train", "test")},
                     "errors": reconstruction_and_alignment(tok, enc, corpus)}
    base = out["irgen_align_0"]["prefix_sharing"]
    for name, _ in runs[1:]:
        a = out[name]["prefix_sharing"]
        out[name]["gain_over_irgen"] = {
            f"{m}_{s}": a[s][m] - base[s][m] for s in ("train", "test")
            for m in ("share_first_voken", "mean_common_prefix")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
