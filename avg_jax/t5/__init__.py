"""T5 encoder-decoder in Flax (v1.0 / v1.1) with vocabulary expansion, HF import/export and orbax checkpoints."""

from avg_jax.t5.configs import T5Config, named_t5_config
from avg_jax.t5.model import T5, encoder_input_mask, init_params, param_logical_axes

__all__ = ["T5", "T5Config", "encoder_input_mask", "init_params", "named_t5_config",
           "param_logical_axes"]
