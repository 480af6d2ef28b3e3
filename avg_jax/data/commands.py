"""`avg-jax data ...` subcommands: make the synthetic corpus, convert real sources, extract features, inspect."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from avg_jax import cli, config
from avg_jax.data.corpus import SPLITS, Corpus
from avg_jax.data.stats import corpus_stats


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build, convert and inspect corpora")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("make-synthetic", help="write the built-in SYNTHETIC benchmark corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    cli.add_gin_flags(p)
    p.set_defaults(func=make_synthetic)

    p = sub.add_parser("convert-karpathy", help="Karpathy-split JSON (Flickr30K / COCO) + feature .npy -> corpus")
    p.add_argument("--json", required=True, help="dataset_flickr30k.json or dataset_coco.json as distributed")
    p.add_argument("--image_features", help=".npy, row i = images[i] of the JSON")
    p.add_argument("--text_features", help=".npy, one row per sentence in JSON order")
    p.add_argument("--image_root", help="folder the JSON's [filepath/]filename paths are relative to")
    _add_convert_flags(p)
    p.set_defaults(func=convert_karpathy)

    p = sub.add_parser("convert-jsonl", help="your own data: JSONL (one line per image) + image folder -> corpus")
    p.add_argument("--records", required=True, help='JSONL: {"image", "split", "captions" | "caption", "id"?}')
    p.add_argument("--image_root", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--image_features", help=".npy, row i = line i + 1 of the JSONL")
    p.add_argument("--text_features", help=".npy, one row per caption in file order")
    _add_convert_flags(p)
    p.set_defaults(func=convert_jsonl)

    p = sub.add_parser("convert-tfds", help="TFDS coco_captions (prepared; extra 'seqio') -> corpus + image folder")
    p.add_argument("--image_dir", required=True, help="where the decoded images are written")
    p.add_argument("--data_dir", help="TFDS data_dir holding the prepared coco_captions")
    _add_convert_flags(p)
    p.set_defaults(func=convert_tfds)

    p = sub.add_parser("extract", help="compute L2-normalised features of a corpus' images and/or captions")
    p.add_argument("corpus_dir")
    p.add_argument("--out", help="write the corpus with new features here (default: update corpus_dir)")
    p.add_argument("--only", choices=("images", "texts"), help="extract only image or only text features")
    _add_extractor_flags(p, required=True)
    cli.add_gin_flags(p)
    p.set_defaults(func=extract)

    p = sub.add_parser("prepare-emoji", help="build the real emoji text-to-image benchmark (npm packages, "
                                             "EfficientNet-Lite0 image and MiniLM text features)")
    p.add_argument("--out", required=True, help="corpus directory to write")
    p.add_argument("--packages_dir", help="directory holding the unpacked npm packages (each NAME/package/...); "
                                          "default: fetch them with `npm pack` into OUT/packages")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--no_progress", action="store_true")
    cli.add_gin_flags(p)
    p.set_defaults(func=prepare_emoji)

    p = sub.add_parser("inspect", help="counts per split, feature dims, caption lengths, duplicates")
    p.add_argument("corpus_dir")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    cli.add_gin_flags(p)
    p.set_defaults(func=inspect)


def make_synthetic(args: argparse.Namespace) -> int:
    from avg_jax.data.synthetic import make_synthetic_corpus

    config.parse_gin(args.gin_file, args.gin_param)
    corpus = make_synthetic_corpus(seed=args.seed)
    out = corpus.save(args.out)
    config.write_operative_config(out)
    print(f"wrote SYNTHETIC corpus to {out}: {corpus.num_images} images, {corpus.num_queries} queries")
    return 0


def prepare_emoji(args: argparse.Namespace) -> int:
    from avg_jax.data.emoji import prepare_emoji_corpus

    config.parse_gin(args.gin_file, args.gin_param)
    corpus, report = prepare_emoji_corpus(args.out, args.packages_dir, args.batch_size, not args.no_progress)
    config.write_operative_config(args.out)
    counts = {s: (len(corpus.image_rows(s)), len(corpus.query_rows(s))) for s in ("train", "val", "test")}
    print(f"wrote emoji corpus to {args.out}: " + ", ".join(f"{s} {i} images / {q} queries" for s, (i, q) in
                                                             counts.items() if i) +
          f"; skipped {report['skipped_without_google_image']} without image, "
          f"{report['skipped_without_emojibase_label']} without label")
    return 0


def _add_extractor_flags(p: argparse.ArgumentParser, required: bool) -> None:
    from avg_jax.data.extract import EXTRACTORS

    p.add_argument("--extractor", required=required, choices=sorted(EXTRACTORS),
                   help="feature extractor" + ("" if required else " for the features no .npy file provides"))
    p.add_argument("--model_path", help="local checkpoint directory (hf-clip: a HuggingFace CLIP model)")
    p.add_argument("--device", help="torch device for model extractors (default cpu)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def _add_convert_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="corpus directory to write")
    p.add_argument("--skip_bad_records", action="store_true",
                   help="drop malformed source records (reported with a count and the first offenders)")
    _add_extractor_flags(p, required=False)
    cli.add_gin_flags(p)


def _extractor(args: argparse.Namespace):
    from avg_jax.data.extract import make_extractor

    options = {k: getattr(args, k) for k in ("model_path", "device") if getattr(args, k) is not None}
    return make_extractor(args.extractor, **options)


def _write_converted(corpus: Corpus, args: argparse.Namespace) -> int:
    """Optionally extract the features the source did not provide, then save corpus + operative config."""
    from avg_jax.data.extract import extract_corpus_features

    out = Path(args.out)
    if args.extractor:
        corpus = extract_corpus_features(corpus, _extractor(args), out, images=corpus.image_features.shape[1] == 0,
                                         texts=corpus.text_features is None, batch_size=args.batch_size,
                                         progress=not args.no_progress)
    corpus.save(out)
    config.write_operative_config(out)
    dims = f"image dim {corpus.image_features.shape[1]}, text dim " + (
        "none" if corpus.text_features is None else str(corpus.text_features.shape[1]))
    print(f"wrote corpus {corpus.name!r} to {out}: {corpus.num_images} images, {corpus.num_queries} queries, {dims}")
    if corpus.image_features.shape[1] == 0:
        print(f"no image features yet: run `avg-jax data extract {out} --extractor hf-clip --model_path CLIP_DIR`")
    return 0


def convert_karpathy(args: argparse.Namespace) -> int:
    from avg_jax.data.karpathy import load_karpathy_json

    config.parse_gin(args.gin_file, args.gin_param)
    corpus = load_karpathy_json(args.json, args.image_features, args.text_features, image_root=args.image_root,
                                skip_bad_records=args.skip_bad_records)
    return _write_converted(corpus, args)


def convert_jsonl(args: argparse.Namespace) -> int:
    from avg_jax.data.jsonl_folder import load_jsonl_folder

    config.parse_gin(args.gin_file, args.gin_param)
    corpus = load_jsonl_folder(args.records, args.image_root, args.image_features, args.text_features,
                               skip_bad_records=args.skip_bad_records)
    return _write_converted(corpus, args)


def convert_tfds(args: argparse.Namespace) -> int:
    from avg_jax.data.tfds_coco import load_tfds_coco_captions

    config.parse_gin(args.gin_file, args.gin_param)
    corpus = load_tfds_coco_captions(args.image_dir, args.data_dir, skip_bad_records=args.skip_bad_records)
    return _write_converted(corpus, args)


def extract(args: argparse.Namespace) -> int:
    from avg_jax.data.extract import extract_corpus_features

    config.parse_gin(args.gin_file, args.gin_param)
    corpus = Corpus.load(args.corpus_dir)
    corpus = extract_corpus_features(corpus, _extractor(args), args.corpus_dir, images=args.only != "texts",
                                     texts=args.only != "images", batch_size=args.batch_size,
                                     progress=not args.no_progress)
    out = corpus.save(args.out or args.corpus_dir)
    config.write_operative_config(out)
    print(f"wrote features to {out}: image dim {corpus.image_features.shape[1]}, text dim "
          f"{None if corpus.text_features is None else corpus.text_features.shape[1]}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    corpus = Corpus.load(Path(args.corpus_dir))
    stats = corpus_stats(corpus)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    if corpus.synthetic:
        print("NOTE: this corpus is SYNTHETIC (generated scenes and random-network features, not real images).")
    print(f"corpus {stats['name']!r} at {args.corpus_dir}")
    for s in SPLITS:
        print(f"  {s:5s}: {stats['images_per_split'][s]:7d} images  {stats['queries_per_split'][s]:8d} queries")
    print(f"  feature dims: image {stats['image_dim']}, text {stats['text_dim']}")
    print(f"  caption length (words), mean {stats['caption_words_mean']:.1f}:")
    peak = max(stats["caption_words_histogram"].values()) or 1
    for k, v in stats["caption_words_histogram"].items():
        print(f"    {k:>6s} {v:8d} {'#' * round(40 * v / peak)}")
    print(f"  duplicate caption texts: {stats['duplicate_caption_texts']}")
    if stats["image_dim"] == 0:
        print("  no image features yet: run `avg-jax data extract` on this directory")
    else:
        print(f"  duplicate image feature rows: {stats['duplicate_image_features']}")
    return 0
