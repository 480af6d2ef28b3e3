"""AVG's training losses (paper §3.2): generative next-voken loss (eq. 7) and the discriminative listwise
loss over beam-search candidates (eqs. 8-9), as pure functions of logits, candidates and scores.

Conventions: identifiers are rows of token ids padded with PAD (0) after their end; a sequence's score is
the sum of its tokens' log-probabilities under the full-vocabulary softmax, the same score the
constrained beam search ranks by.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from avg_jax.data.vocab import PAD_ID

NEG_INF = float("-inf")


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, 0 at PAD positions: [..., T, V] x [..., T] -> [..., T] float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(targets != PAD_ID, logp, 0.0)


DIS_SCORES = ("log_prob", "prob")


def sequence_scores(logits: jax.Array, targets: jax.Array, kind: str = "log_prob") -> jax.Array:
    """Each target sequence's score s: [..., T, V] x [..., T] -> [...]. 'log_prob': the sum of its token
    log-probabilities, log p(identifier), what the beam search ranks by; 'prob': the sum of its token
    probabilities, eq. 9's s_j as the paper words it ("the sum of the corresponding vokens' generation
    probabilities"), bounded by the identifier length. PAD positions add 0 either way."""
    logp = token_log_probs(logits, targets)
    if kind == "prob":
        return jnp.where(targets != PAD_ID, jnp.exp(logp), 0.0).sum(axis=-1)
    if kind != "log_prob":
        raise ValueError(f"sequence_scores: kind must be one of {DIS_SCORES}, got {kind!r}")
    return logp.sum(axis=-1)


def token_bias_sums(sequences: jax.Array, token_bias: jax.Array, column_offset: int) -> jax.Array:
    """Each sequence's summed per-token bias: sequences [b, k, T] (token ids, PAD-padded), token_bias
    [b, columns] over token ids column_offset ... column_offset + columns - 1 -> [b, k]; PAD and tokens outside
    the columns add 0 (the score `beam_search(token_bias=...)` adds to an identifier)."""
    column, inside = window_columns(sequences, column_offset, token_bias.shape[-1])
    picked = jnp.take_along_axis(token_bias[:, None, :], column, axis=-1)
    return jnp.where(inside, picked, 0.0).sum(axis=-1)


def window_columns(tokens: jax.Array, column_offset: int, columns: int) -> tuple[jax.Array, jax.Array]:
    """Token ids -> (their column in a window of `columns` token ids from `column_offset`, clipped into it;
    whether the token is a non-PAD token inside the window)."""
    column = tokens - column_offset
    inside = (tokens != PAD_ID) & (column >= 0) & (column < columns)
    return jnp.clip(column, 0, columns - 1), inside


GEN_REDUCTIONS = ("sum", "mean")


def generative_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array, z_loss: float = 0.0,
                    reduction: str = "sum") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 7: -sum_j log p(voken_j | query, voken_<j) per example, averaged over examples with weight > 0.

    `reduction` over an example's tokens: 'sum' = eq. 7 (the sequence NLL, the same scale as the eq. 8
    scores); 'mean' = divided by the example's number of target tokens (the per-token cross-entropy the
    authors' code averages, the scale their λ = 0.5 of eq. 10 was tuned against).
    logits [batch, T, V], targets [batch, T] (PAD-padded), weights [batch] (0 for padding rows). The
    optional z-loss `z_loss * log(Z)^2` per target token keeps the softmax normaliser near 1 (PaLM/t5x);
    it is reduced over tokens the same way.
    """
    check_reduction(reduction, "generative loss")
    mask = targets != PAD_ID  # [batch, T]
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [batch, T]
    gen = row_mean(-token_log_probs(logits, targets), mask, weights, reduction)
    z = row_mean(z_loss * lse**2, mask, weights, reduction)
    correct = (jnp.argmax(logits, axis=-1) == targets) | ~mask
    accuracy = weighted_mean(jnp.all(correct, axis=-1), weights)
    return gen + z, {"gen_loss": gen, "z_loss": z, "sequence_accuracy": accuracy}


def check_reduction(reduction: str, what: str) -> None:
    """A clear error for a token reduction outside `GEN_REDUCTIONS`."""
    if reduction not in GEN_REDUCTIONS:
        raise ValueError(f"{what} reduction must be one of {GEN_REDUCTIONS}, got {reduction!r}")


def row_mean(per_position: jax.Array, mask: jax.Array, weights: jax.Array, reduction: str) -> jax.Array:
    """Eq. 7's reduction of a per-position loss [b, T]: over each row's `mask`ed positions ('sum', or 'mean' =
    divided by the row's count of them), then averaged over the rows with `weights` [b] > 0."""
    per_row = jnp.sum(jnp.where(mask, per_position, 0.0), axis=-1)
    if reduction == "mean":
        per_row = per_row / jnp.maximum(mask.sum(axis=-1), 1).astype(jnp.float32)
    return weighted_mean(per_row, weights)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ weights · values / Σ weights over rows [b] (0 when every weight is 0)."""
    return jnp.sum(weights * values) / jnp.maximum(weights.sum(), 1e-9)


def match_positive(candidates: jax.Array, valid: jax.Array, positive: jax.Array) -> jax.Array:
    """Which valid candidates equal the positive identifier: [b, k, L] x [b, k] x [b, L] -> [b, k] bool."""
    return jnp.all(candidates == positive[:, None, :], axis=-1) & valid


def inject_positive(candidates: jax.Array, valid: jax.Array, positive: jax.Array, rng: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Make sure the positive identifier is among each query's candidates (paper §3.2).

    Where the beam missed it, one non-positive candidate is replaced by it: an invalid slot (a beam wider
    than the trie) if there is one, else a slot drawn uniformly at random from `rng`.
    Returns (candidates [b, k, L], positive_index [b], valid [b, k], positive_was_found [b]).
    """
    hit = match_positive(candidates, valid, positive)  # [b, k]
    found = jnp.any(hit, axis=-1)  # [b]
    draw = jax.random.uniform(rng, valid.shape) + jnp.where(valid, 0.0, 2.0)  # invalid slots first
    slot = jnp.argmax(draw, axis=-1)  # [b]
    positive_index = jnp.where(found, jnp.argmax(hit, axis=-1), slot)
    replace = (jnp.arange(valid.shape[1]) == slot[:, None]) & ~found[:, None]  # [b, k]
    candidates = jnp.where(replace[:, :, None], positive[:, None, :], candidates)
    return candidates, positive_index, valid | replace, found


def duplicate_free(candidates: jax.Array, valid: jax.Array) -> jax.Array:
    """Valid candidates that do not repeat an earlier valid candidate's tokens: [b, k, L] -> [b, k] bool."""
    k = candidates.shape[1]
    same = jnp.all(candidates[:, :, None, :] == candidates[:, None, :, :], axis=-1)  # [b, k(j), k(i)]
    earlier = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]  # [j, i]: i < j
    repeated = jnp.any(same & earlier[None] & valid[:, None, :], axis=-1)
    return valid & ~repeated


def relevant_mask(candidates: jax.Array, relevant: jax.Array, relevant_valid: jax.Array,
                  positive_index: jax.Array) -> jax.Array:
    """Candidates that are another relevant image's identifier (not negatives of this query): [b, k] bool.

    candidates [b, k, L], relevant [b, R, L] (the query's relevant identifiers, PAD-padded to L),
    relevant_valid [b, R]; the positive's own slot is never masked."""
    same = jnp.all(candidates[:, :, None, :] == relevant[:, None, :, :], axis=-1)  # [b, k, R]
    hit = jnp.any(same & relevant_valid[:, None, :], axis=-1)  # [b, k]
    return hit & (jnp.arange(candidates.shape[1])[None, :] != positive_index[:, None])


def listwise_loss(scores: jax.Array, positive_index: jax.Array, keep: jax.Array) -> jax.Array:
    """Eq. 9: -log softmax(s)[positive] over the kept candidates, per example: [b, k] -> [b]."""
    masked = jnp.where(keep, scores.astype(jnp.float32), NEG_INF)
    positive = jnp.take_along_axis(masked, positive_index[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(masked, axis=-1) - positive


def trie_teacher(query_vectors: jax.Array, image_vectors: jax.Array, image_tokens: jax.Array, targets: jax.Array,
                 temperature: float, column_offset: int, columns: int) -> tuple[jax.Array, jax.Array]:
    """The dense towers' ranking as next-token targets along each target's own prefix (dense-to-generative
    distillation, an extension; not in the paper).

    The teacher's image distribution p(i | q) = softmax_i(<t_q, v_i> / temperature) over a set of images is
    marginalised onto the trie: at position l, p(c | target_<l) ∝ Σ p(i | q) over the images i whose identifier
    agrees with the target on positions < l and has token c at l, i.e. the probability the dense ranking gives
    to each child of the target's prefix. query_vectors [b, d] (the queries' aligned text vectors), image_vectors
    [I, d] (the images' aligned vectors), image_tokens [I, T] (their identifiers, PAD-padded to the targets'
    length T), targets [b, T]; tokens column_offset ... column_offset + columns - 1 are the teacher's columns.
    Returns (teacher [b, T, columns]: each defined row sums to 1, the others are 0; defined [b, T] bool: the
    target has a token there and some image on its prefix has one in the columns)."""
    scores = jnp.einsum("bd,id->bi", query_vectors.astype(jnp.float32), image_vectors.astype(jnp.float32))
    p = jax.nn.softmax(scores / temperature, axis=-1)  # [b, I]
    same = image_tokens[None, :, :] == targets[:, None, :]  # [b, I, T]
    on_prefix = jnp.cumprod(same, axis=-1, dtype=jnp.int32)  # [b, I, l]: equal on positions <= l
    on_prefix = jnp.concatenate([jnp.ones_like(on_prefix[..., :1]), on_prefix[..., :-1]], axis=-1)  # < l
    column, inside = window_columns(image_tokens, column_offset, columns)  # [I, T]
    mass = p[:, :, None] * (on_prefix * inside[None]).astype(jnp.float32)  # [b, I, T]
    b, _, t = mass.shape
    teacher = jnp.zeros((b, t, columns), jnp.float32).at[
        jnp.arange(b)[:, None, None], jnp.arange(t)[None, None, :], column[None]].add(mass)
    total = teacher.sum(axis=-1)  # [b, T]
    defined = (targets != PAD_ID) & (total > 0)
    return jnp.where(defined[..., None], teacher / jnp.where(defined, total, 1.0)[..., None], 0.0), defined


def distillation_loss(logits: jax.Array, teacher: jax.Array, defined: jax.Array, column_offset: int,
                      weights: jax.Array, reduction: str = "sum") -> jax.Array:
    """Cross-entropy of the generator's next-token distribution (full-vocabulary log-softmax of `logits`
    [b, T, V], read at the teacher's columns) against `teacher` [b, T, columns] at the `defined` [b, T] positions
    (`trie_teacher`), reduced over a row's positions like eq. 7 (`reduction` 'sum' or 'mean') and averaged over
    the rows with `weights` [b] > 0."""
    check_reduction(reduction, "distillation loss")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = logp[..., column_offset: column_offset + teacher.shape[-1]]
    ce = -jnp.sum(jnp.where(teacher > 0, teacher * logp, 0.0), axis=-1)  # [b, T]
    return row_mean(ce, defined, weights, reduction)
