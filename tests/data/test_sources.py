"""Dataset references: local .txt/.jsonl/.parquet, hub ids (offline: one-line errors), chat templates."""
import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrcompress.data import DatasetRef, check_source, load_text
from lrcompress.data.sources import render_chat
from lrcompress.errors import LrcompressError


def _parquet(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_and_jsonl_read_the_named_column(tmp_path):
    path = _parquet(tmp_path / "c.parquet", body=["first doc", "second doc"], id=[1, 2])
    source = load_text(str(path), "train", None, text_column="body")
    assert source.text == "first doc\n\nsecond doc" and "column body" in source.description
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"content": "a", "n": 1}\n\n{"content": "b", "n": 2}\n')
    assert load_text(str(jsonl), "train", None, text_column="content").text == "a\n\nb"


def test_a_missing_column_names_the_columns_there(tmp_path):
    path = _parquet(tmp_path / "c.parquet", body=["x"])
    with pytest.raises(LrcompressError, match=r"no column 'text'; columns: body \(set text_column\)"):
        check_source(DatasetRef(str(path)), None)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"content": "a"}\n')
    with pytest.raises(LrcompressError, match="'text'"):
        check_source(DatasetRef(str(jsonl)), None)
    with pytest.raises(LrcompressError, match="it has: content"):
        load_text(str(jsonl), "train", None)


def test_a_text_file_is_read_whole_and_a_missing_file_is_not_sent_to_the_hub(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("plain text")
    assert check_source(DatasetRef(str(path)), None) == str(path.resolve())
    assert load_text(str(path), "validation", None).text == "plain text"
    with pytest.raises(LrcompressError, match="dataset file not found: .*missing.jsonl"):
        check_source(DatasetRef(str(tmp_path / "missing.jsonl")), None)


def test_non_text_values_ask_for_the_chat_template(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(LrcompressError, match="chat_template: true"):
        load_text(str(path), "train", None, text_column="messages")


class _FakeDatasets(types.ModuleType):
    """The ``datasets`` API surface the resolution uses; the hub is 'unreachable' unless rows are given."""

    def __init__(self, rows=None):
        super().__init__("datasets")
        self.rows, self.calls = rows, []

    def load_dataset_builder(self, hub_id, config):
        self.calls.append(("builder", hub_id, config))
        if self.rows is None:
            raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub (OfflineModeIsEnabled)\nsecond line")
        info = types.SimpleNamespace(splits={"train": None}, features={"text": None})
        return types.SimpleNamespace(info=info)

    def load_dataset(self, hub_id, config, split):
        self.calls.append(("load", hub_id, config, split))
        if self.rows is None:
            raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub\nmore detail")
        return _Rows(self.rows)


class _Rows(dict):
    @property
    def column_names(self):
        return list(self)


def test_hub_ids_go_through_datasets_with_config_split_and_column(monkeypatch):
    fake = _FakeDatasets({"text": ["hub one", "hub two"]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert check_source(DatasetRef("org/corpus", "train", "en"), None) == "hub org/corpus/en train"
    source = load_text("org/corpus", "train", None, config="en")
    assert source.text == "hub one\n\nhub two"
    assert ("load", "org/corpus", "en", "train") in fake.calls
    with pytest.raises(LrcompressError, match="has no split 'test'; splits: train"):
        check_source(DatasetRef("org/corpus", "test", "en"), None)
    with pytest.raises(LrcompressError, match="no column 'body'"):
        check_source(DatasetRef("org/corpus", "train", text_column="body"), None)


def test_an_unreachable_hub_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets())
    with pytest.raises(LrcompressError) as caught:
        check_source(DatasetRef("org/corpus", "train"), None)
    message = str(caught.value)
    assert "\n" not in message and "not reachable" in message and "ConnectionError" in message
    with pytest.raises(LrcompressError, match="could not be loaded") as caught:
        load_text("org/corpus", "train", None)
    assert "\n" not in str(caught.value)


def test_without_datasets_installed_the_message_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)   # import datasets -> ImportError
    with pytest.raises(LrcompressError, match="'datasets' package, which reads hub datasets, is not installed"):
        check_source(DatasetRef("org/corpus", "train"), None)


class _ChatTokenizer:
    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"

    def apply_chat_template(self, messages, tokenize):
        assert tokenize is False
        return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)


def test_chat_template_renders_messages_and_plain_text_as_a_user_turn(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = load_text(str(path), "train", None, text_column="messages", chat_tokenizer=_ChatTokenizer())
    assert source.text == "<|user|>hi\n<|assistant|>hello\n" and "chat template" in source.description
    assert render_chat(["just text"], _ChatTokenizer(), "x") == ["<|user|>just text\n"]
    with pytest.raises(LrcompressError, match="record 0 is neither text"):
        render_chat([{"role": "user"}], _ChatTokenizer(), "x")
    with pytest.raises(LrcompressError, match="has no chat template"):
        render_chat(["x"], types.SimpleNamespace(chat_template=None), "x")
