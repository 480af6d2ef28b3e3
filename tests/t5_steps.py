"""The incremental decoder of `avg_jax.t5.decoding` as a (cache, jitted step -> full logits) pair for tests."""

import jax
import jax.numpy as jnp

from avg_jax.t5.decoding import cross_attention_inputs, decode_weights, decoder_step, head_matrix, init_self_cache
from avg_jax.t5.layers import MASK_VALUE, output_logits
from avg_jax.t5.model import T5, encoder_input_mask, scale_head_input


def decoder_stepper(params, config, input_ids, rows, max_length):
    """(zero cache of `rows` rows, step(cache, tokens [rows], index) -> (logits [rows, vocab] float32, cache)).

    Encodes `input_ids [batch, length]` once; rows = batch * j broadcast the encoder keys/values over j beams.
    """
    encoded = T5(config).apply({"params": params}, jnp.asarray(input_ids), method=T5.encode)
    weights = decode_weights(params, config)
    cross = cross_attention_inputs(weights, encoded)
    cross_bias = jnp.where(encoder_input_mask(jnp.asarray(input_ids)), 0.0, MASK_VALUE)
    head = head_matrix(params, config).astype(config.compute_dtype)

    @jax.jit
    def step(cache, tokens, index):
        hidden, cache = decoder_step(weights, config, cache, jnp.asarray(tokens, jnp.int32), index, cross, cross_bias)
        return output_logits(scale_head_input(hidden, config), head), cache

    return init_self_cache(config, rows, max_length), step
