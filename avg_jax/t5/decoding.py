"""TEMPORARY SHIM (replaced by the decoder branch)."""
from avg_jax.decoding.t5_decode import t5_beam_search  # noqa: F401
