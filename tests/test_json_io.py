"""read_json: the shared reader for JSON configs/metadata names the file and the spot of every problem."""

import json

import pytest

from avg_jax.data.corpus import CorpusError
from avg_jax.json_io import read_json


def test_reads_the_value_written_by_the_json_module(tmp_path):
    value = {"a": [1, 2.5, None], "b": {"c": "é"}}
    (tmp_path / "x.json").write_text(json.dumps(value))
    assert read_json(tmp_path / "x.json", "test config") == value
    (tmp_path / "l.json").write_text("[1, 2]")
    assert read_json(tmp_path / "l.json", "test list", expect=list) == [1, 2]
    assert read_json(tmp_path / "l.json", "any value", expect=None) == [1, 2]


def test_missing_file_names_what_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test config not found: .*absent\.json"):
        read_json(tmp_path / "absent.json", "test config")


@pytest.mark.parametrize("text, line, column", [('{"a": 1,\n  "b": }', 2, 8), ("", 1, 1), ('{"a": 1} x', 1, 10)])
def test_invalid_json_names_file_line_and_column(tmp_path, text, line, column):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"broken\.json: not valid JSON \(.*line {line} column {column}") as err:
        read_json(path, "test config")
    assert str(path) in str(err.value)


def test_wrong_top_level_type_and_error_class(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(CorpusError, match=r"list\.json: expected a JSON object at the top level, got list"):
        read_json(path, "corpus file", CorpusError)
    with pytest.raises(ValueError, match=r"list\.json: expected a JSON str at the top level, got list"):
        read_json(path, "test config", expect=str)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CorpusError, match="not valid JSON"):
        read_json(tmp_path / "bad.json", "corpus file", CorpusError)
