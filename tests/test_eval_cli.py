"""`avg-jax eval` and `avg-jax eval-dense` end to end on a small corpus, and ranked-file validation."""

import json

import numpy as np
import pytest

from avg_jax import cli
from avg_jax.evaluation import metrics
from avg_jax.evaluation import ranked as ranked_io


@pytest.fixture(scope="module")
def corpus_dir(tiny_corpus, tmp_path_factory):
    return str(tiny_corpus.save(tmp_path_factory.mktemp("corpus") / "c"))


def test_eval_dense_then_eval_ranked(corpus_dir, tiny_corpus, tmp_path, capsys):
    out = tmp_path / "dense"
    assert cli.main(["eval-dense", "--corpus", corpus_dir, "--projection", "ridge", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "dense-ridge-jax" in printed
    dense_metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "operative_config.gin").exists()
    m = dense_metrics["systems"]["dense-ridge-jax"]
    assert m["num_queries"] == len(tiny_corpus.query_rows("test"))
    # Recompute R@K from ranked.jsonl independently of our metric code.
    lines = [json.loads(x) for x in (out / "ranked.jsonl").read_text().splitlines()]
    hits = {k: np.mean([bool(set(r["image_ids"][:k]) & set(tiny_corpus.queries[r["query_row"]].image_ids))
                        for r in lines]) for k in (1, 5, 10)}
    for k in (1, 5, 10):
        assert m[f"recall@{k}"] == pytest.approx(hits[k])
    # The same file through `avg-jax eval` (two names for the same system) gives the same numbers.
    out2 = tmp_path / "eval"
    ranked = str(out / "ranked.jsonl")
    assert cli.main(["eval", "--corpus", corpus_dir, "--ranked", f"a={ranked}", "--ranked", f"b={ranked}",
                     "--out", str(out2)]) == 0
    systems = json.loads((out2 / "metrics.json").read_text())["systems"]
    assert systems["a"] == pytest.approx(m) and systems["b"] == pytest.approx(m)


def test_eval_dense_unaligned_features_is_a_clean_error(corpus_dir, tmp_path, capsys):
    assert cli.main(["eval-dense", "--corpus", corpus_dir, "--out", str(tmp_path)]) == 2
    assert "text features have dim 48 but image features 64" in capsys.readouterr().err


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_ranked_file_validation(tiny_corpus, tmp_path):
    rows = tiny_corpus.query_rows("test")
    test_images = [tiny_corpus.images[i].id for i in tiny_corpus.image_rows("test")]
    good = [{"query_row": int(j), "image_ids": test_images[:3]} for j in rows]
    parsed = ranked_io.read_ranked_jsonl(_write(tmp_path / "ok.jsonl", good), tiny_corpus, "test")
    assert parsed.query_rows.tolist() == rows.tolist() and parsed.identifiers is None
    texts = [tiny_corpus.queries[j].text for j in rows]
    dup = next(t for t in texts if texts.count(t) > 1)  # synthetic captions repeat within a split
    by_text = [{"text": t, "image_ids": []} if texts.count(t) == 1 else {"query_row": int(j), "image_ids": []}
               for j, t in zip(rows, texts, strict=True)]
    assert ranked_io.read_ranked_jsonl(_write(tmp_path / "t.jsonl", by_text), tiny_corpus, "test").query_rows.tolist() \
        == rows.tolist()
    cases = {
        "have no ranking": good[1:],
        "already ranked on line 1": [good[0], *good],
        "names images not in split 'test'": [{**good[0], "image_ids": ["nope"]}, *good[1:]],
        "repeats an image id": [{**good[0], "image_ids": [test_images[0]] * 2}, *good[1:]],
        "is not a 'test' query row": [{**good[0], "query_row": int(tiny_corpus.query_rows("train")[0])}],
        "needs field 'query_row' or 'text'": [{"image_ids": []}],
        "matches 2 'test' queries": [{"text": dup, "image_ids": []}],
        "must be a list of non-empty token-id lists": [{**good[0], "identifiers": [[]]}],
        "present on some lines": [{**good[0], "identifiers": [[5, 6]]}, *good[1:]],
    }
    for message, records in cases.items():
        with pytest.raises(ValueError, match=message):
            ranked_io.read_ranked_jsonl(_write(tmp_path / "bad.jsonl", records), tiny_corpus, "test")
    with pytest.raises(FileNotFoundError, match="ranked-output file missing"):
        ranked_io.read_ranked_jsonl(tmp_path / "absent.jsonl", tiny_corpus, "test")


def test_evaluate_ranked_with_identifier_groups(tiny_corpus):
    first_query = {}  # one query for each of four different test images
    for j in tiny_corpus.query_rows("test"):
        first_query.setdefault(tiny_corpus.queries[j].image_ids[0], int(j))
    rel = list(first_query)[:4]
    rows = np.array([first_query[i] for i in rel])
    # Queries 0 and 1 have their relevant image in one shared group with an unrelated image placed first.
    other = next(im.id for im in tiny_corpus.images if im.split == "test" and im.id not in rel)
    groups = {(1, 2): [other, rel[0], rel[1]], (3, 4): [rel[2]], (5, 6): [rel[3]]}
    idents = [[(1, 2)], [(3, 4), (1, 2)], [(3, 4)], [(5, 6)]]
    outputs = ranked_io.RankedOutputs(rows, [metrics.expand_identifiers(r, groups) for r in idents], idents)
    m = ranked_io.evaluate_ranked(tiny_corpus, outputs, groups, ks=(1, 2))
    assert m["recall@1"] == pytest.approx(2 / 4)           # queries 2, 3
    assert m["identifier_recall@1"] == pytest.approx(3 / 4)  # queries 0, 2, 3
    assert m["collision_rate"] == pytest.approx(3 / 5)


def test_eval_with_identifier_table(corpus_dir, tiny_corpus, tmp_path, capsys):
    from avg_jax.identifiers.table import IdentifierTable

    test_ids = [tiny_corpus.images[i].id for i in tiny_corpus.image_rows("test")]
    # Two-token fixed-length identifiers over 10 codes: 60 test images, so collisions are certain.
    codes = np.random.default_rng(0).integers(0, 10, (len(test_ids), 2)).astype(np.int32)
    table = IdentifierTable(image_ids=test_ids, tokens=codes + 100, lengths=np.full(len(test_ids), 2, np.int32),
                            scheme="test", num_new_tokens=10, text_vocab_size=100, fixed_length=True)
    table.save(tmp_path / "table")
    groups = table.groups()
    ident_of = {i: tuple(int(t) for t in row) for i, row in zip(test_ids, codes + 100, strict=True)}
    records, id_hits, img_hits = [], [], []
    for j in tiny_corpus.query_rows("test"):
        target = ident_of[tiny_corpus.queries[j].image_ids[0]]
        ranked = [target] if j % 2 else [next(g for g in groups if g != target)]
        images = metrics.expand_identifiers(ranked, groups)
        records.append({"query_row": int(j), "image_ids": images, "identifiers": [list(r) for r in ranked]})
        id_hits.append(bool(j % 2))
        img_hits.append(images[0] in tiny_corpus.queries[j].image_ids)
    _write(tmp_path / "gen.jsonl", records)
    assert cli.main(["eval", "--corpus", corpus_dir, "--ranked", f"avg={tmp_path / 'gen.jsonl'}",
                     "--identifiers", str(tmp_path / "table"), "--out", str(tmp_path / "m")]) == 0
    assert "id_R@1" in capsys.readouterr().out
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())["systems"]["avg"]
    assert not any(key.startswith("identifier_prefix") for key in m)
    # --prefix_recall_at: depth 2 of these fixed-length identifiers is identifier-level recall, depth 1 the
    # share of queries whose first generated identifier starts with the relevant image's first token.
    assert cli.main(["eval", "--corpus", corpus_dir, "--ranked", f"avg={tmp_path / 'gen.jsonl'}", "--identifiers",
                     str(tmp_path / "table"), "--prefix_recall_at", "1", "--out", str(tmp_path / "p")]) == 0
    assert "identifier prefix recall@1" in capsys.readouterr().out
    p = json.loads((tmp_path / "p" / "metrics.json").read_text())["systems"]["avg"]
    first_hits = [r["identifiers"][0][0] == ident_of[tiny_corpus.queries[r["query_row"]].image_ids[0]][0]
                  for r in records]
    assert p["identifier_prefix1_recall@1"] == pytest.approx(np.mean(first_hits))
    assert p["identifier_prefix2_recall@1"] == pytest.approx(np.mean(id_hits))
    assert p["identifier_prefix2_recall@1"] < p["identifier_prefix1_recall@1"]
    assert cli.main(["eval", "--corpus", corpus_dir, "--ranked", f"avg={tmp_path / 'gen.jsonl'}",
                     "--prefix_recall_at", "10", "--out", str(tmp_path / "q")]) == 2
    assert "--prefix_recall_at 10 needs --identifiers" in capsys.readouterr().err
    assert m["identifier_recall@1"] == pytest.approx(np.mean(id_hits))
    assert m["recall@1"] == pytest.approx(np.mean(img_hits)) and m["recall@1"] < m["identifier_recall@1"]
    sizes = np.array([len(v) for v in groups.values()])
    assert m["collision_rate"] == pytest.approx(sizes[sizes > 1].sum() / len(test_ids))
    # Rankings of a beam of 1: R@5, R@10 and MRR@10 are inapplicable, absent from metrics.json, '-' printed.
    assert cli.main(["eval", "--corpus", corpus_dir, "--ranked", f"avg={tmp_path / 'gen.jsonl'}", "--identifiers",
                     str(tmp_path / "table"), "--beam_size", "1", "--out", str(tmp_path / "b1")]) == 0
    b1 = json.loads((tmp_path / "b1" / "metrics.json").read_text())["systems"]["avg"]
    assert {k for k in b1 if "@" in k} == {"recall@1", "identifier_recall@1"}
    assert b1["recall@1"] == m["recall@1"] and b1["identifier_recall@1"] == m["identifier_recall@1"]
    table_line = capsys.readouterr().out.splitlines()[-3].split()
    assert table_line[0] == "avg" and table_line[3:6] == ["-", "-", "-"]  # R@5, R@10, MRR@10
    # A table that lacks test images is a clean error.
    table.subset(test_ids[:-1]).save(tmp_path / "short")
    assert cli.main(["eval", "--corpus", corpus_dir, "--ranked", str(tmp_path / "gen.jsonl"),
                     "--identifiers", str(tmp_path / "short"), "--out", str(tmp_path / "m2")]) == 2
    assert "not in the identifier table" in capsys.readouterr().err


def test_eval_dense_with_tokenizer_heads(corpus_dir, tiny_corpus, tmp_path):
    """The tokenizer's trained heads as the two towers; ranking checked against the heads applied in numpy."""
    from avg_jax.tokenizer.train import load_tokenizer

    tok_dir = tmp_path / "tok"
    argv = ["tokenize", "--corpus", corpus_dir, "--out", str(tok_dir), "--gin_file", "tokenizer/avg.gin"]
    for p in ["RQTokenizerConfig.code_dim = 16", "RQTokenizerConfig.codebook_size = 16",
              "RQTokenizerConfig.num_levels = 2", "RQTokenizerConfig.decoder_hidden_dim = 32",
              "train_tokenizer.steps = 10", "train_tokenizer.batch_size = 48",
              "train_tokenizer.contrastive_steps = 60", "tokenize_corpus.sentencepiece_vocab_size = 300"]:
        argv += ["--gin_param", p]
    assert cli.main(argv) == 0
    out = tmp_path / "dense"
    assert cli.main(["eval-dense", "--corpus", corpus_dir, "--projection", "heads", "--tokenizer", str(tok_dir),
                     "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["systems"]["dense-heads-jax"]
    tok = load_tokenizer(tok_dir)
    assert tok.config.head_hidden_dim == 0  # linear heads: x @ kernel + bias, then L2-normalised

    def head(x, name):
        p = tok.params[name]["out"]
        y = x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    test_images = tiny_corpus.image_rows("test")
    test_q = tiny_corpus.query_rows("test")
    sims = head(tiny_corpus.text_features[test_q], "text_head") @ head(
        tiny_corpus.image_features[test_images], "image_head").T
    ids = np.array([tiny_corpus.images[i].id for i in test_images])
    ranked = ids[np.argsort(-sims, axis=1)]
    first = np.array([np.flatnonzero(np.isin(r, tiny_corpus.queries[q].image_ids))[0] + 1
                      for r, q in zip(ranked, test_q, strict=True)])
    for k in (1, 5, 10):
        assert m[f"recall@{k}"] == pytest.approx(np.mean(first <= k), abs=2 / len(first))
    assert m["recall@10"] > 10 / len(test_images)  # even briefly trained heads beat chance


def test_eval_by_novelty_groups_queries_by_how_new_their_text_is(tmp_path, capsys):
    """Test queries whose text is a TRAIN query's (case and punctuation aside), whose words all occur in TRAIN
    queries, or with a word no TRAIN query has: grouped as constructed, and `avg-jax eval --by_novelty` scores
    each group on its own queries (recall recomputed by hand)."""
    from avg_jax.data.corpus import Corpus, ImageRecord, QueryRecord

    images = [ImageRecord(f"tr{i}", "train") for i in range(3)] + [ImageRecord(f"te{i}", "test") for i in range(3)]
    train = [("red dog", "tr0"), ("a blue cat", "tr1"), ("green tree", "tr2")]
    test = [("Red dog!", "te0", "seen text"), ("red cat", "te1", "new text"), ("blue dog tree", "te2", "new text"),
            ("purple dog", "te0", "new word"), ("dogs", "te1", "new word")]
    queries = [QueryRecord(t, "train", (i,)) for t, i in train] + [QueryRecord(t, "test", (i,)) for t, i, _ in test]
    corpus = Corpus("novelty", images, np.eye(6, 4, dtype=np.float32), queries,
                    np.ones((len(queries), 4), np.float32))
    rows = corpus.query_rows("test")
    assert ranked_io.query_novelty(corpus, rows) == [g for *_, g in test]

    corpus_dir = str(corpus.save(tmp_path / "c"))
    ranked = [["te0", "te1"], ["te0", "te2"], ["te2", "te0"], ["te1", "te2"], ["te1", "te0"]]  # hits at 1: 0, 2, 4
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps({"query_row": int(j), "image_ids": r}) + "\n"
                            for j, r in zip(rows, ranked, strict=True)))
    assert cli.main(["eval", "--corpus", corpus_dir, "--ranked", f"gen={path}", "--by_novelty",
                     "--out", str(tmp_path / "out")]) == 0
    assert "gen [new word]" in capsys.readouterr().out
    systems = json.loads((tmp_path / "out" / "metrics.json").read_text())["systems"]
    expected = {"gen": (5, 3 / 5), "gen [seen text]": (1, 1.0), "gen [new text]": (2, 1 / 2),
                "gen [new word]": (2, 1 / 2)}
    assert set(systems) == set(expected)
    for name, (n, r1) in expected.items():
        assert systems[name]["num_queries"] == n and systems[name]["recall@1"] == pytest.approx(r1), name


def _exhaustive_sign_test(a: int, b: int) -> float:
    """Two-sided sign test by enumerating all 2^n win/loss sequences (the reference for metrics.sign_test)."""
    n = a + b
    if n == 0:
        return 1.0
    wins = np.array([bin(s).count("1") for s in range(2 ** n)])
    return float(np.mean(np.abs(wins - n / 2) >= abs(a - n / 2)))


def test_sign_test_matches_exhaustive_enumeration():
    for a in range(0, 9):
        for b in range(0, 9):
            assert metrics.sign_test(a, b) == pytest.approx(_exhaustive_sign_test(a, b), rel=1e-12), (a, b)
    assert metrics.sign_test(141, 117) == pytest.approx(0.1520, abs=1e-4)  # the README's text-dropout pair
    with pytest.raises(ValueError, match="counts"):
        metrics.sign_test(-1, 3)


def test_eval_paired_compares_every_system_with_the_first(corpus_dir, tiny_corpus, tmp_path, capsys):
    """`avg-jax eval --paired`: for every later system, per K, the queries only the first / only it finds within K
    (recounted from the files by hand, the second file in another query order) and the sign test of those counts;
    a system missing a query (library call), or a single system, is an error naming it."""
    rows = tiny_corpus.query_rows("test")
    images = [tiny_corpus.images[i].id for i in tiny_corpus.image_rows("test")]
    rng = np.random.default_rng(0)
    rankings = [[list(rng.permutation(images)[:10]) for _ in rows] for _ in range(3)]
    paths = []
    for s, ranking in enumerate(rankings):
        order = rng.permutation(len(rows)) if s == 2 else np.arange(len(rows))
        paths.append(_write(tmp_path / f"s{s}.jsonl", [{"query_row": int(rows[i]), "image_ids": ranking[i]}
                                                       for i in order]))
    out = tmp_path / "out"
    assert cli.main(["eval", "--corpus", corpus_dir, "--paired", "--ranked", f"base={paths[0]}",
                     "--ranked", f"one={paths[1]}", "--ranked", f"two={paths[2]}", "--out", str(out)]) == 0
    assert "paired against base" in capsys.readouterr().out
    paired = json.loads((out / "paired.json").read_text())
    assert paired["baseline"] == "base" and set(paired["systems"]) == {"one", "two"}

    def hits(ranking, k):
        return np.array([bool(set(r[:k]) & set(tiny_corpus.queries[j].image_ids))
                         for j, r in zip(rows, ranking, strict=True)])

    for name, ranking in (("one", rankings[1]), ("two", rankings[2])):
        for k in (1, 5, 10):
            base, other = hits(rankings[0], k), hits(ranking, k)
            got = paired["systems"][name]
            assert (got[f"a_only@{k}"], got[f"b_only@{k}"]) == (int(np.sum(base & ~other)), int(np.sum(other & ~base)))
            assert got[f"p@{k}"] == pytest.approx(metrics.sign_test(got[f"a_only@{k}"], got[f"b_only@{k}"]))
    assert any(paired["systems"]["one"][f"a_only@{k}"] + paired["systems"]["one"][f"b_only@{k}"] for k in (5, 10))

    full = ranked_io.read_ranked_jsonl(paths[0], tiny_corpus, "test")  # (a ranked file covers every query)
    short = full.subset(np.arange(len(rows)) != len(rows) - 1)
    with pytest.raises(ValueError, match=f"short has no ranking for query row {int(rows[-1])}"):
        ranked_io.paired_comparison(tiny_corpus, full, short, names=("base", "short"))
    assert cli.main(["eval", "--corpus", corpus_dir, "--paired", "--ranked", str(paths[0]), "--out", str(out)]) == 2
    assert "at least two --ranked" in capsys.readouterr().err
