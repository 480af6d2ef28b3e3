"""T5 constrained decoding against HuggingFace PyTorch: `generate` with a pygtrie prefix function, and
teacher-forced scores of every identifier."""

import dataclasses

import jax
import numpy as np
import pygtrie
import pytest
from trie_cases import reference_children

from avg_jax.data.vocab import EOS_ID
from avg_jax.decoding.beam_search import BeamSearchOptions
from avg_jax.decoding.trie import build_trie, identifier_window
from avg_jax.t5.decoding import chunked_logsumexp, t5_beam_search
from avg_jax.t5.hf_io import load_hf_t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT, NEW, M = 96, 32, 3  # text vocabulary, new tokens (vokens), identifier length
NUM_QUERIES = 56


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def hf_model(request, tmp_path_factory):
    """(HF model, our params, our config): a tiny random HF T5 with TEXT + NEW tokens, imported."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=TEXT + NEW, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj="relu" if request.param == "1.0" else "gated-gelu",
        tie_word_embeddings=request.param == "1.0", decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    if request.param == "1.1":
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.5)
    model.eval()
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    model.save_pretrained(path)
    params, ours = load_hf_t5(path)
    return model, params, ours


def searcher(config, options, window=None, **head_options):
    """jit(params, tables, input_ids) -> BeamSearchResult of `t5_beam_search`."""
    return jax.jit(lambda params, tables, ids: t5_beam_search(params, config, ids, tables, options=options,
                                                              window=window, **head_options))


def random_queries(rng, n, width=10):
    inputs = np.zeros((n, width), np.int32)
    for q in range(n):
        length = rng.integers(1, width + 1)
        inputs[q, :length] = rng.integers(2, TEXT, length)
    return inputs


def voken_identifiers(rng, n):
    """Fixed-length voken identifiers with shared prefixes and a few duplicates."""
    codes = rng.integers(0, NEW, size=(n, M))
    codes[: n // 3, 0] = 5
    codes[: n // 6, 1] = 7
    codes[-3:] = codes[:3]
    return (TEXT + codes).astype(np.int32)


def hf_generate(model, inputs, ref, beam, steps):
    """HF beam search constrained by a pygtrie prefix function; raw summed log-prob scores."""
    def allowed(_, sent):
        return reference_children(ref, tuple(sent[1:].tolist()))

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(inputs, dtype=torch.long),
                             attention_mask=torch.tensor(inputs != 0), num_beams=beam,
                             num_return_sequences=beam, prefix_allowed_tokens_fn=allowed, max_new_tokens=steps,
                             length_penalty=0.0, do_sample=False, early_stopping=True, output_scores=True,
                             return_dict_in_generate=True)
    n = inputs.shape[0]
    return (out.sequences.numpy()[:, 1:].reshape(n, beam, steps), out.sequences_scores.numpy().reshape(n, beam))


def hf_teacher_forced(model, inputs, identifiers, ref=None, window=None):
    """[queries, identifiers] sums of token log-probs (full softmax, or over a window, or over allowed)."""
    n, k = inputs.shape[0], len(identifiers)
    width = max(map(len, identifiers))
    targets = np.zeros((k, width), np.int64)
    for i, ident in enumerate(identifiers):
        targets[i, :len(ident)] = ident
    decoder_inputs = np.concatenate([np.zeros((k, 1), np.int64), targets[:, :-1]], axis=1)
    scores = np.zeros((n, k))
    with torch.no_grad():
        for q in range(n):
            x = torch.tensor(np.repeat(inputs[q:q + 1], k, 0), dtype=torch.long)
            logits = model(input_ids=x, attention_mask=x != 0,
                           decoder_input_ids=torch.tensor(decoder_inputs)).logits.double().numpy()
            for i, ident in enumerate(identifiers):
                for t, tok in enumerate(ident):
                    row = logits[i, t]
                    if window is not None:
                        row = np.where((np.arange(row.size) >= window[0]) & (np.arange(row.size) < sum(window)),
                                       row, -np.inf)
                    if ref is not None:
                        keep = reference_children(ref, ident[:t])
                        row = np.where(np.isin(np.arange(row.size), keep), row, -np.inf)
                    scores[q, i] += row[tok] - np.logaddexp.reduce(row)
    return scores


def test_matches_hf_generate(hf_model):
    """Same identifiers in the same order, scores within 1e-4, on 56 queries (head chunk 48 ∤ vocab 128)."""
    model, params, config = hf_model
    rng = np.random.default_rng(1)
    tokens = voken_identifiers(rng, 150)
    trie = build_trie(tokens=tokens, lengths=np.full(len(tokens), M, np.int32))
    ref = pygtrie.Trie({tuple(r.tolist()): True for r in tokens})
    beam = 6
    inputs = random_queries(rng, NUM_QUERIES)
    expected_tokens, expected_scores = hf_generate(model, inputs, ref, beam, M)
    window = identifier_window(trie, config.vocab_size, TEXT)
    assert window == (TEXT, NEW)
    search = searcher(config, BeamSearchOptions(beam_size=beam), window=window, head_chunk_size=48)
    result = search(params, trie.tables, inputs)
    np.testing.assert_array_equal(np.asarray(result.tokens), expected_tokens)
    np.testing.assert_allclose(np.asarray(result.scores), expected_scores, atol=1e-4, rtol=0)
    groups = np.asarray(result.groups)
    assert (trie.group_tokens[groups] == expected_tokens).all()


@pytest.mark.parametrize("norm", ["vocab", "window", "allowed"])
def test_exhaustive_teacher_forcing_voken_ids(hf_model, norm):
    """beam >= #identifiers: every identifier ranked by HF teacher-forced score (normalisation modes)."""
    model, params, config = hf_model
    rng = np.random.default_rng(2)
    tokens = np.unique(voken_identifiers(rng, 14), axis=0)
    trie = build_trie(tokens=tokens, lengths=np.full(len(tokens), M, np.int32))
    identifiers = [tuple(r) for r in trie.group_tokens.tolist()]
    ref = pygtrie.Trie({i: True for i in identifiers})
    window = identifier_window(trie, config.vocab_size, TEXT)
    inputs = random_queries(rng, 4)
    expected = hf_teacher_forced(model, inputs, identifiers, ref=ref if norm == "allowed" else None,
                                 window=window if norm == "window" else None)
    search = searcher(config, BeamSearchOptions(beam_size=16, score_normalization=norm), window=window,
                              head_chunk_size=0)  # 'vocab': the single-matmul head (generate test: chunked)
    result = search(params, trie.tables, inputs)
    check_ranking(result, expected, len(identifiers))


def test_exhaustive_teacher_forcing_variable_length_text_ids(hf_model):
    """GRACE-style text identifiers ending with EOS, prefixes of each other, full-vocabulary window."""
    model, params, config = hf_model
    identifiers = [(5, EOS_ID), (5, 9, EOS_ID), (5, 9, 30, EOS_ID), (7, 7, EOS_ID), (60, EOS_ID), (5, 11, EOS_ID)]
    tokens = np.zeros((len(identifiers), 4), np.int32)
    for i, ident in enumerate(identifiers):
        tokens[i, :len(ident)] = ident
    trie = build_trie(tokens=tokens, lengths=np.array([len(i) for i in identifiers], np.int32))
    assert identifier_window(trie, config.vocab_size, TEXT) == (0, config.vocab_size)
    inputs = random_queries(np.random.default_rng(3), 3)
    group_ids = [tuple(r[:n]) for r, n in zip(trie.group_tokens.tolist(), trie.group_lengths, strict=True)]
    expected = hf_teacher_forced(model, inputs, group_ids)
    search = searcher(config, BeamSearchOptions(beam_size=8))
    check_ranking(search(params, trie.tables, inputs), expected, len(identifiers))


def test_bfloat16_search_scores_close_to_float32_reference(hf_model):
    """bf16 activations (float32 accumulation): every identifier returned once, scores near HF's float32 ones."""
    model, params, config = hf_model
    rng = np.random.default_rng(4)
    tokens = np.unique(voken_identifiers(rng, 14), axis=0)
    trie = build_trie(tokens=tokens, lengths=np.full(len(tokens), M, np.int32))
    identifiers = [tuple(r) for r in trie.group_tokens.tolist()]
    inputs = random_queries(rng, 4)
    expected = hf_teacher_forced(model, inputs, identifiers)  # [queries, identifiers] float32 model
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    search = searcher(bf16, BeamSearchOptions(beam_size=16), window=identifier_window(trie, bf16.vocab_size, TEXT))
    result = search(params, trie.tables, inputs)
    groups, scores = np.asarray(result.groups), np.asarray(result.scores)
    n = len(identifiers)
    for q in range(len(inputs)):
        assert sorted(groups[q, :n].tolist()) == list(range(n)) and (groups[q, n:] == -1).all()
        assert (np.diff(scores[q, :n]) <= 0).all()
        np.testing.assert_allclose(scores[q, :n], expected[q, groups[q, :n]], atol=0.05 * M, rtol=0)
        best, second = np.sort(expected[q])[::-1][:2]
        if best - second > 0.1 * M:  # a clear winner stays first despite bf16 rounding
            assert groups[q, 0] == np.argmax(expected[q])


def check_ranking(result, expected, num_groups):
    """Our groups/scores equal the identifiers sorted by the reference score (same order, 1e-5)."""
    groups, scores = np.asarray(result.groups), np.asarray(result.scores)
    for q in range(expected.shape[0]):
        order = np.argsort(-expected[q], kind="stable")
        np.testing.assert_array_equal(groups[q, :num_groups], order)
        np.testing.assert_allclose(scores[q, :num_groups], expected[q, order], atol=1e-5, rtol=0)
        assert (groups[q, num_groups:] == -1).all() and np.isneginf(scores[q, num_groups:]).all()


def test_chunked_logsumexp():
    rng = np.random.default_rng(0)
    x, rows = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(37, 8)).astype(np.float32)
    logits = x.astype(np.float64) @ rows.T.astype(np.float64)
    for chunk in (4, 37, 64):
        np.testing.assert_allclose(chunked_logsumexp(x, rows, chunk), np.logaddexp.reduce(logits, axis=1),
                                   rtol=1e-5)
