"""Corpus format, data sources (synthetic, Karpathy JSON, TFDS, JSONL + images), features, input pipelines."""
