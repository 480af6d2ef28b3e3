"""Build the identifier table of every image of a corpus (`tokenize_corpus`: RQ vokens or a GRACE scheme).

What `avg-jax tokenize` (avg_jax/tokenizer/commands.py), the demo and the sweep call. Writes into out_dir:
  identifiers.json, tokens.npy, lengths.npy   the IdentifierTable (all images, train + val + test)
  spm.model                                   the text vocabulary, when none was given (trained on TRAIN captions)
  checkpoint/, tokenizer_config.json          tokenizer params (orbax) and shapes (schemes that train heads)
  tokenizer_checkpoints/                      the training runs (resumable: rerun with the same --out)
  codebook.npy                                float32 [C, N, code_dim] vokens (rq; C = 1 shared or M)
  stats.json                                  statistics
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gin
import numpy as np

from avg_jax.data.corpus import Corpus, queries_by_image
from avg_jax.data.vocab import Vocabulary, train_sentencepiece
from avg_jax.identifiers import grace
from avg_jax.identifiers.table import IdentifierTable, make_identifier_table, position_usage_stats
from avg_jax.tokenizer.model import embed_images, embed_texts
from avg_jax.tokenizer.stats import caption_neighbour_prefix_sharing, codebook_usage, reconstruction_and_alignment
from avg_jax.tokenizer.train import (
    CODEBOOK_FILE,
    TOKENIZER_RUN_DIR,
    TokenizerData,
    encode_images,
    save_tokenizer,
    train_tokenizer,
)

SCHEMES = ("rq", "grace_numeric", "grace_string", "grace_semantic", "grace_structured", "grace_atomic")
SUFFIX_SCOPES = ("all", "split")
SPM_NAME = "spm"
STATS_FILE = "stats.json"


def build_vocabulary(corpus: Corpus, out: Path, sentencepiece_model: str | None, vocab_size: int,
                     num_extra_ids: int, scheme: str) -> Vocabulary:
    """The given SentencePiece model, or one trained on the TRAIN captions (+ the identifier numbers 1..n for
    GRACE numeric/string, so digits and number pieces exist, as in a pretrained LM's vocabulary)."""
    if sentencepiece_model:
        return Vocabulary(sentencepiece_model, num_extra_ids=num_extra_ids)
    texts = [corpus.queries[j].text for j in corpus.query_rows("train")]
    if scheme in ("grace_numeric", "grace_string"):
        texts += [str(n) for n in range(1, corpus.num_images + 1)]
    path = train_sentencepiece(texts, out / SPM_NAME, vocab_size=vocab_size)
    return Vocabulary(path, num_extra_ids=num_extra_ids)


@gin.configurable(denylist=["corpus_dir", "out_dir"])
def tokenize_corpus(
    corpus_dir: str,
    out_dir: str,
    scheme: str = "rq",
    collision_policy: str = "suffix",
    seed: int = 0,
    sentencepiece_model: str | None = None,
    sentencepiece_vocab_size: int = 1000,
    num_extra_ids: int = 0,
    suffix_scope: str = "all",
    pseudo_pairs_per_image: int = 0,
) -> tuple[IdentifierTable, dict[str, Any]]:
    """Build and save the identifier table of every image; returns it with the statistics written.

    `suffix_scope` (scheme 'rq', collision policy 'suffix'): 'all' (default) ranks the images sharing a voken
    body over all splits; 'split' ranks them within their split (`make_identifier_table(suffix_scope=...)`),
    so an evaluation image's suffix does not depend on the training images sharing its body.
    `pseudo_pairs_per_image` k > 0 (scheme 'rq'): the tokenizer's RQ stage also trains (reconstruction,
    alignment, codebook) on the val/test images, each paired with the TRAIN captions of its k nearest TRAIN
    images (image-feature cosine; `TokenizerData.from_corpus(pseudo_splits=...)`), so the codebook is fitted to
    every image it will tokenize; the heads' contrastive warm-up (the dense baseline) keeps to real TRAIN pairs.
    0 (default) = TRAIN pairs only."""
    if scheme not in SCHEMES:
        raise ValueError(f"tokenize_corpus.scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    if suffix_scope not in SUFFIX_SCOPES:
        raise ValueError(f"tokenize_corpus.suffix_scope must be one of {SUFFIX_SCOPES}, got {suffix_scope!r}")
    if pseudo_pairs_per_image < 0:
        raise ValueError(f"tokenize_corpus.pseudo_pairs_per_image must be >= 0, got {pseudo_pairs_per_image}")
    if suffix_scope != "all" and scheme != "rq":
        raise ValueError(f"tokenize_corpus.suffix_scope={suffix_scope!r} is implemented for scheme 'rq' only")
    corpus = Corpus.load(corpus_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_vocabulary(corpus, out, sentencepiece_model, sentencepiece_vocab_size, num_extra_ids, scheme)
    image_ids = [im.id for im in corpus.images]
    extra_stats: dict[str, Any] = {}
    if scheme == "rq":
        table, extra_stats = _rq_table(corpus, out, vocab.text_size, collision_policy, seed, suffix_scope,
                                       pseudo_pairs_per_image)
    elif scheme == "grace_numeric":
        table = grace.grace_numeric_identifiers(image_ids, vocab, seed)
    elif scheme == "grace_string":
        table = grace.grace_string_identifiers(image_ids, vocab, seed, collision_policy)
    elif scheme == "grace_semantic":
        table = _semantic_table(corpus, out, vocab, collision_policy, seed)
    elif scheme == "grace_structured":
        table = grace.grace_structured_identifiers(image_ids, corpus.image_features, vocab.text_size, seed)
    else:
        table = grace.grace_atomic_identifiers(image_ids, vocab.text_size)
    table.metadata.update({"sentencepiece_model": str(vocab.path.resolve()), "num_extra_ids": num_extra_ids,
                           "corpus": str(Path(corpus_dir).resolve()), "corpus_synthetic": corpus.synthetic})
    table.save(out)
    stats = {"scheme": scheme, "num_images": table.num_images, "max_len": table.max_len,
             "num_new_tokens": table.num_new_tokens, "text_vocab_size": table.text_vocab_size,
             "collision_policy": table.metadata["collision_policy"],
             "collisions_before_policy": table.metadata["collisions_before_policy"],
             "unique_identifiers": len(table.groups()),
             "position_usage": position_usage_stats(table.tokens, table.lengths), **extra_stats}
    (out / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    return table, stats


def _rq_table(corpus: Corpus, out: Path, text_vocab_size: int, collision_policy: str, seed: int,
              suffix_scope: str = "all", pseudo_pairs_per_image: int = 0) -> tuple[IdentifierTable, dict[str, Any]]:
    data = (TokenizerData.from_corpus(corpus, "train", ("val", "test"), pseudo_pairs_per_image)
            if pseudo_pairs_per_image else TokenizerData.from_corpus(corpus, "train"))
    tok = train_tokenizer(data, seed=seed, run_dir=out / TOKENIZER_RUN_DIR)
    save_tokenizer(tok, out)
    enc = encode_images(tok, corpus.image_features)
    cfg = tok.config
    level_offset = 0 if cfg.shared_codebook else np.arange(cfg.num_levels) * cfg.codebook_size
    vokens = text_vocab_size + level_offset + enc.codes  # [num_images, M]
    table = make_identifier_table(
        [im.id for im in corpus.images], vokens, np.full(corpus.num_images, cfg.num_levels), scheme="rq",
        num_scheme_tokens=cfg.num_codebooks * cfg.codebook_size, text_vocab_size=text_vocab_size,
        variable_length=False, collision_policy=collision_policy, order_key=enc.quantization_error,
        suffix_scope=[im.split for im in corpus.images] if suffix_scope == "split" else None,
        metadata={"codebook_size": cfg.codebook_size, "num_levels": cfg.num_levels,
                  "shared_codebook": cfg.shared_codebook, "code_dim": cfg.code_dim,
                  "codebook_file": CODEBOOK_FILE,
                  "voken_token": ("text_vocab_size + code" if cfg.shared_codebook
                                  else "text_vocab_size + level * codebook_size + code"),
                  "suffix_order": "ascending ||v_i - z_q^(M)||^2 (distance of the image to its code)",
                  "loss_weights": dataclasses.asdict(tok.loss_weights)})
    stats: dict[str, Any] = {"errors": reconstruction_and_alignment(tok, enc, corpus),
                             "codebook_usage": codebook_usage(enc.codes, cfg.codebook_size),
                             "final_training_losses": tok.history[-1] if tok.history else {}}
    stats["caption_neighbour_prefix_sharing"] = [
        caption_neighbour_prefix_sharing(corpus, enc.codes, split) for split in ("train", "test")
        if (corpus.image_rows(split).size > 1 and corpus.query_rows(split).size)]
    return table, stats


def _semantic_table(corpus: Corpus, out: Path, vocab: Vocabulary, collision_policy: str, seed: int,
                    ) -> IdentifierTable:
    """Heads-only training (InfoNCE on train pairs), then own / nearest training captions (see grace.py)."""
    tok = train_tokenizer(TokenizerData.from_corpus(corpus, "train"), seed=seed, steps=0,
                          run_dir=out / TOKENIZER_RUN_DIR)
    save_tokenizer(tok, out)
    train_rows = corpus.query_rows("train")
    image_emb = np.asarray(embed_images(tok.config, tok.params, corpus.image_features))
    caption_emb = np.asarray(embed_texts(tok.config, tok.params, corpus.text_features[train_rows]))
    by_image = queries_by_image(corpus, train_rows)
    own = [corpus.queries[by_image[im.id][0]].text if im.split == "train" and im.id in by_image else None
           for im in corpus.images]
    return grace.grace_semantic_identifiers([im.id for im in corpus.images], own, image_emb,
                                            [corpus.queries[j].text for j in train_rows], caption_emb, vocab,
                                            collision_policy)
