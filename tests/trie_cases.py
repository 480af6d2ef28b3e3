"""Identifier sets shared by the trie and beam-search tests (plain helpers, no fixtures)."""

import numpy as np
import pygtrie
from hypothesis import strategies as st

from avg_jax.data.vocab import EOS_ID


def pad_identifiers(identifiers):
    """Token tuples -> (tokens [n, max_len] PAD-padded, lengths [n])."""
    max_len = max(len(s) for s in identifiers)
    tokens = np.zeros((len(identifiers), max_len), np.int32)
    for i, s in enumerate(identifiers):
        tokens[i, :len(s)] = s
    return tokens, np.array([len(s) for s in identifiers], np.int32)


@st.composite
def identifier_sets(draw, max_tokens=4, max_size=30, max_token=9):
    """Random identifier sets with heavy prefix sharing (small alphabet) and duplicates.

    Fixed-length sets have 1..max_tokens tokens each; variable-length ones 0..max_tokens-1 tokens plus
    EOS, so identifiers are often prefixes of others.
    """
    variable = draw(st.booleans())
    alphabet = st.integers(3, draw(st.integers(4, max_token)))
    if variable:
        seqs = draw(st.lists(st.lists(alphabet, max_size=max_tokens - 1), min_size=1, max_size=max_size))
        return [(*s, EOS_ID) for s in seqs]
    length = draw(st.integers(1, max_tokens))
    seqs = draw(st.lists(st.lists(alphabet, min_size=length, max_size=length), min_size=1, max_size=max_size))
    return [tuple(s) for s in seqs]


def reference_trie(identifiers):
    """pygtrie: identifier tuple -> list of table rows (in table order)."""
    ref = pygtrie.Trie()
    for i, s in enumerate(identifiers):
        ref.setdefault(s, []).append(i)
    return ref


def reference_children(ref, prefix):
    """Sorted tokens that may follow `prefix` in the pygtrie `ref`."""
    return sorted({k[len(prefix)] for k in ref.iterkeys(prefix=prefix) if len(k) > len(prefix)})
