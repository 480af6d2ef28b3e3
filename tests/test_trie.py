"""Trie tables against pygtrie: children, transitions, masks, groups, capacities and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from trie_cases import identifier_sets, pad_identifiers, reference_children, reference_trie

from avg_jax.data.vocab import EOS_ID
from avg_jax.decoding import trie as trie_lib


@jax.jit
def _walk_batch(tables, tokens, lengths):
    """States reached by prefixes `tokens [P, L]` of `lengths [P]` (one compiled walk per shape)."""
    state = jnp.zeros(tokens.shape[0], jnp.int32)
    for k in range(tokens.shape[1]):
        state = jnp.where(k < lengths, trie_lib.next_state(tables, state, tokens[:, k]), state)
    return state


@jax.jit
def _inspect(tables, states):
    """Allowed mask over a 16-token vocabulary and the child lists of `states`."""
    return trie_lib.allowed_mask(tables, states, 16), *trie_lib.children(tables, states)


def walk_all(trie, prefixes, rows=256, width=6):
    """States of many prefixes, padded to a fixed batch so hypothesis examples share compilations."""
    assert len(prefixes) <= rows and max(map(len, prefixes)) <= width
    tokens = np.zeros((rows, width), np.int32)
    for i, p in enumerate(prefixes):
        tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in prefixes] + [0] * (rows - len(prefixes)), np.int32)
    return np.asarray(_walk_batch(shape_only(trie.tables), tokens, lengths))[:len(prefixes)]


def shape_only(tables):
    """Tables with `max_length` (static, unused by lookups) fixed, so examples share compilations."""
    return tables.replace(max_length=0)


def walk(trie, prefix):
    return int(walk_all(trie, [prefix])[0])


CAPACITY = {"node_capacity": 256, "edge_capacity": 256, "max_fanout": 8, "root_fanout": 8}


def check_against_pygtrie(identifiers, trie):
    ref = reference_trie(identifiers)
    prefixes = sorted({s[:k] for s in identifiers for k in range(len(s) + 1)})
    states = walk_all(trie, prefixes)
    assert len(set(states.tolist())) == len(prefixes) == trie.num_nodes  # one node per distinct prefix
    assert (states < trie.num_nodes).all()
    padded = np.full(256, trie.tables.sink, np.int32)
    padded[:len(states)] = states
    masks, tok, nxt, valid = (np.asarray(a)[:len(states)] for a in _inspect(shape_only(trie.tables), padded))
    node_group = np.asarray(trie.tables.node_group)
    state_of = dict(zip(prefixes, states.tolist(), strict=True))
    for p, state, mask, t, n, v in zip(prefixes, states, masks, tok, nxt, valid, strict=True):
        expected = reference_children(ref, p)
        assert np.flatnonzero(mask).tolist() == expected, p
        assert t[v].tolist() == expected
        assert n[v].tolist() == [state_of[(*p, e)] for e in expected]
        group = int(node_group[state])
        if ref.has_key(p):
            assert group >= 0
            assert trie.group_tokens[group][:trie.group_lengths[group]].tolist() == list(p)
            assert trie.group_image_ids(group) == [trie.image_ids[i] for i in ref[p]]
        else:
            assert group == -1
    # A token leaving the trie leads to the sink, and the sink is a dead end.
    sink = trie.tables.sink
    assert walk(trie, (15,)) == sink
    assert int(trie_lib.num_children(trie.tables, jnp.int32(sink))) == 0
    assert int(trie.tables.node_group[sink]) == -1
    assert trie.num_groups == len(ref)


@settings(max_examples=40, deadline=None)
@given(identifier_sets())
def test_matches_pygtrie(identifiers):
    tokens, lengths = pad_identifiers(identifiers)
    trie = trie_lib.build_trie(tokens=tokens, lengths=lengths, **CAPACITY)
    assert trie.fixed_length == (identifiers[0][-1] != EOS_ID)
    check_against_pygtrie(identifiers, trie)


def test_prefix_identifiers_and_shared_groups():
    identifiers = [(5, EOS_ID), (5, 6, EOS_ID), (5, 6, 7, EOS_ID), (5, 6, EOS_ID), (9, EOS_ID)]
    tokens, lengths = pad_identifiers(identifiers)
    trie = trie_lib.build_trie(tokens=tokens, lengths=lengths, image_ids=["a", "b", "c", "d", "e"])
    check_against_pygtrie(identifiers, trie)
    node = walk(trie, (5, 6, EOS_ID))
    assert trie.group_image_ids(int(trie.tables.node_group[node])) == ["b", "d"]  # table order
    groups = [int(trie.tables.node_group[walk(trie, s)]) for s in [(5, 6, EOS_ID), (9, EOS_ID)]]
    assert trie.ranked_images([*groups, -1], [-1.0, -2.0, float("-inf")]) == [("b", -1.0), ("d", -1.0),
                                                                                ("e", -2.0)]
    assert trie.ranked_images(groups, [-1.0, -2.0], k=1) == [("b", -1.0)]


def test_identifier_table_like_object():
    class Table:  # the IdentifierTable contract's fields
        image_ids = ("x", "y")
        tokens = np.array([[32100, 32101], [32100, 32102]], np.int32)
        lengths = np.array([2, 2], np.int32)
        fixed_length = True

    trie = trie_lib.build_trie(Table())
    assert trie.fixed_length and trie.num_groups == 2 and trie.token_range == (32100, 32103)
    assert trie.group_image_ids(1) == ["y"]


def test_capacities_keep_shapes_and_compiled_function():
    rng = np.random.default_rng(0)
    walk_jit = jax.jit(lambda tables, s, t: trie_lib.next_state(tables, s, t))
    shapes = set()
    for n in (50, 70, 90):
        tokens = rng.integers(3, 40, size=(n, 3)).astype(np.int32)
        trie = trie_lib.build_trie(tokens=tokens, lengths=np.full(n, 3), node_capacity=512, edge_capacity=512,
                                   max_fanout=64, root_fanout=64)
        shapes.add(jax.tree.map(lambda a: a.shape, trie.tables))
        state = jnp.zeros((), jnp.int32)
        for tok in tokens[0]:
            state = walk_jit(trie.tables, state, jnp.int32(tok))
        assert int(trie.tables.node_group[state]) >= 0
    assert len(shapes) == 1
    assert walk_jit._cache_size() == 1
    with pytest.raises(ValueError, match="node_capacity=8 is smaller"):
        trie_lib.build_trie(tokens=tokens, lengths=np.full(n, 3), node_capacity=8)


def test_bucket_size():
    for n in [0, 1, 7, 8, 9, 100, 1023, 1025, 4_000_001]:
        b = trie_lib.bucket_size(n)
        assert b >= max(n, trie_lib.MIN_BUCKET) and b <= max(n * 1.125, trie_lib.MIN_BUCKET)


@pytest.mark.parametrize(("tokens", "lengths", "match"), [
    ([[5, 0, 6]], [3], "PAD"),
    ([[5, 6, 7]], [2], "non-PAD token after its length"),
    ([[5, 6], [5, 0]], [2, 1], "must all have length 2"),
    ([[5, EOS_ID, 7, EOS_ID]], [4], "EOS before its last token"),
    ([[5, EOS_ID], [5, 6]], [2, 2], "must all end with EOS"),
    ([[5, 6]], [3], "outside"),
    ([[5, 6]], [2, 2], "expected tokens"),
])
def test_bad_identifiers_raise(tokens, lengths, match):
    with pytest.raises(ValueError, match=match):
        trie_lib.build_trie(tokens=np.array(tokens), lengths=np.array(lengths))


def test_fixed_length_flag_mismatch():
    with pytest.raises(ValueError, match="fixed_length"):
        trie_lib.build_trie(tokens=np.array([[5, EOS_ID]]), lengths=np.array([2]), fixed_length=True)
