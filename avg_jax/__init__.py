"""avg_jax: generative text-to-image retrieval (AVG, GRACE, IRGen) in JAX/Flax."""

__version__ = "0.1.0"
