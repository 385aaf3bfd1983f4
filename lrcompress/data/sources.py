"""Dataset references -> text.

A recipe's dataset is one of three things, tried in this order:

1. a known name (``wikitext2``): a local file under the data directory (``--data-dir`` flag, then the
   recipe's ``data_dir``, then ``$LRCOMPRESS_DATA``), else its Hugging Face hub copy;
2. a local file: ``.txt``/``.raw`` (the whole file), ``.jsonl``/``.json`` (one JSON object per line) or
   ``.parquet``, whose ``text_column`` is read (``split`` does not apply to a file);
3. anything else is a Hugging Face hub dataset id (``allenai/c4``, with ``config`` and ``split``), read
   through the ``datasets`` library when it is installed and the hub is reachable.

Records are joined with blank lines. With a chat tokenizer (``calibration.chat_template``) every record
is first rendered by ``tokenizer.apply_chat_template`` (see ``render_chat``). ``check_source`` says
where a reference would be read from without reading it (``--dry-run``, and before any compression).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LrcompressError

# name -> split -> (path under the data directory, HF hub dataset id, HF config); a .jsonl/.parquet file's
# text is its "text" column. No hub id: the files must be in the data directory (no hub copy exists).
KNOWN_DATASETS: dict[str, dict[str, tuple[str, str | None, str | None]]] = {
    "wikitext2": {
        "test": ("wikitext-2-raw/wiki.test.raw", "wikitext", "wikitext-2-raw-v1"),
        "validation": ("wikitext-2-raw/wiki.valid.raw", "wikitext", "wikitext-2-raw-v1"),
        "train": ("wikitext-2-raw/wiki.train.raw", "wikitext", "wikitext-2-raw-v1"),
    },
    # A 1408-document sample of OpenAI's WebText (gpt-2-output-dataset), split by document into two
    # disjoint files (README, "Calibration mixtures"); validation and calibration name the same file.
    "webtext": {
        "calibration": ("webtext/webtext.calibration.jsonl", None, None),
        "validation": ("webtext/webtext.calibration.jsonl", None, None),
        "test": ("webtext/webtext.test.jsonl", None, None),
    },
}
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
TEXT_SUFFIXES = (".txt", ".raw", ".text")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class TextSource:
    text: str
    description: str      # what was read, for the protocol line and the report
    fingerprint: str      # sha256 of the text (first 16 hex digits)


@dataclass(frozen=True)
class DatasetRef:
    """What a recipe's calibration or perplexity section names (see the module docstring)."""

    dataset: str
    split: str = "validation"
    config: str | None = None
    text_column: str = "text"

    @classmethod
    def of(cls, spec: Any) -> DatasetRef:
        """From a CalibrationSpec/PerplexitySpec-like object."""
        return cls(spec.dataset, SPLIT_ALIASES.get(spec.split, spec.split), getattr(spec, "config", None),
                   getattr(spec, "text_column", "text"))

    @property
    def path(self) -> Path:
        return Path(self.dataset).expanduser()

    def is_local(self) -> bool:
        """A path rather than a hub id: an existing file, a known suffix, or an explicit directory prefix."""
        return (self.path.is_file() or self.path.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES
                or self.dataset.startswith(("/", "./", "../", "~")))


def data_dir(explicit: str | None = None, recipe_value: str | None = None) -> Path | None:
    chosen = explicit or recipe_value or os.environ.get("LRCOMPRESS_DATA")
    return Path(chosen).expanduser() if chosen else None


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _one_line(error: BaseException) -> str:
    """The first line of an exception's message (hub errors carry long multi-line explanations)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ---------------------------------------------------------------- local files

def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise LrcompressError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return rows


def _file_column(path: Path, column: str) -> list[Any]:
    """The values of ``column`` in a .jsonl/.json or .parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if column not in names:
            raise LrcompressError(f"{path}: no column {column!r}; columns: {', '.join(names)} (set text_column)")
        return pq.read_table(path, columns=[column]).column(column).to_pylist()
    rows = _jsonl_rows(path)
    missing = next((i for i, row in enumerate(rows) if not isinstance(row, dict) or column not in row), None)
    if missing is not None:
        keys = ", ".join(rows[missing]) if isinstance(rows[missing], dict) else type(rows[missing]).__name__
        raise LrcompressError(f"{path}: record {missing} has no {column!r} field (it has: {keys}; set text_column)")
    return [row[column] for row in rows]


def _check_file(path: Path, column: str) -> None:
    """The file exists and has the column (reading the parquet schema or the first JSON record only)."""
    if not path.is_file():
        raise LrcompressError(f"dataset file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if column not in names:
            raise LrcompressError(f"{path}: no column {column!r}; columns: {', '.join(names)} (set text_column)")
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), None)
        if first is None:
            raise LrcompressError(f"{path}: no records")
        try:
            record = json.loads(first)
        except json.JSONDecodeError as error:
            raise LrcompressError(f"{path}: the first record is not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or column not in record:
            raise LrcompressError(f"{path}: the first record has no {column!r} field (set text_column)")


def read_text_file(path: Path, column: str = "text") -> str:
    """A .txt/.raw file as-is, or a .jsonl/.parquet file's ``column`` values joined by blank lines."""
    if path.suffix in RECORD_SUFFIXES:
        return _join(_file_column(path, column), str(path), column)
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- the hub

def _datasets_module(where: str):
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise LrcompressError(f"{where}; the 'datasets' package, which reads hub datasets, is not installed "
                              "(pip install datasets)") from None
    return datasets


def _hub_column(hub_id: str, config: str | None, split: str, column: str, where: str) -> list[Any]:
    datasets = _datasets_module(where)
    try:
        rows = datasets.load_dataset(hub_id, config, split=split)
    except Exception as error:  # offline, unknown id, bad config or split: one line, both places named
        raise LrcompressError(f"{where}; hub dataset {_hub_name(hub_id, config)} split {split!r} could not be "
                              f"loaded ({_one_line(error)})") from None
    if column not in rows.column_names:
        raise LrcompressError(f"hub dataset {_hub_name(hub_id, config)}: no column {column!r}; columns: "
                              f"{', '.join(rows.column_names)} (set text_column)")
    return rows[column]


def _check_hub(hub_id: str, config: str | None, split: str, column: str, where: str) -> None:
    """The hub has this dataset, config and split (metadata only: nothing is downloaded)."""
    datasets = _datasets_module(where)
    try:
        builder = datasets.load_dataset_builder(hub_id, config)
    except Exception as error:
        raise LrcompressError(f"{where}; hub dataset {_hub_name(hub_id, config)} is not reachable "
                              f"({_one_line(error)})") from None
    splits = builder.info.splits
    if splits and split not in splits:
        raise LrcompressError(f"hub dataset {_hub_name(hub_id, config)} has no split {split!r}; "
                              f"splits: {', '.join(splits)}")
    features = builder.info.features
    if features and column not in features:
        raise LrcompressError(f"hub dataset {_hub_name(hub_id, config)}: no column {column!r}; columns: "
                              f"{', '.join(features)} (set text_column)")


def _hub_name(hub_id: str, config: str | None) -> str:
    return f"{hub_id!r}" + (f" (config {config!r})" if config else "")


# ---------------------------------------------------------------- resolution

def _known_local(ref: DatasetRef, directory: Path | None) -> tuple[Path | None, str | None, str | None, str]:
    """(the local file if present, hub id, hub config, where we looked) of a known name."""
    splits = KNOWN_DATASETS[ref.dataset]
    if ref.split not in splits:
        raise LrcompressError(f"dataset {ref.dataset!r} has no split {ref.split!r}; splits: {', '.join(splits)}")
    relative, hub_id, hub_config = splits[ref.split]
    if directory is None:
        return None, hub_id, hub_config, "no data directory set (--data-dir, data_dir, $LRCOMPRESS_DATA)"
    local = directory / relative
    return (local if local.is_file() else None), hub_id, hub_config, f"dataset file not found: looked for {local}"


def _no_hub_twin(ref: DatasetRef, hub_id: str | None, where: str) -> None:
    """A known name without a hub copy (``webtext``) is read from the data directory only."""
    if hub_id is None:
        raise LrcompressError(f"{where}; {ref.dataset!r} has no copy on the hub: put its files under the data "
                              f"directory ({ref.dataset}/ there; README, 'Calibration mixtures')")


def check_source(ref: DatasetRef, directory: Path | None) -> str:
    """Where ``ref`` would be read from; raises a one-line LrcompressError if it cannot be."""
    if ref.dataset in KNOWN_DATASETS:
        local, hub_id, hub_config, where = _known_local(ref, directory)
        if local is not None:
            return str(local.resolve())
        _no_hub_twin(ref, hub_id, where)
        _check_hub(hub_id, hub_config, ref.split, "text", where)
        return f"hub {hub_id}/{hub_config} {ref.split}"
    if ref.is_local():
        _check_file(ref.path, ref.text_column)
        return str(ref.path.resolve())
    _check_hub(ref.dataset, ref.config, ref.split, ref.text_column, f"{ref.dataset!r} is not a local file")
    return f"hub {ref.dataset}" + (f"/{ref.config}" if ref.config else "") + f" {ref.split}"


def read_records(ref: DatasetRef, directory: Path | None) -> tuple[list[Any], str]:
    """(the records' values in the text column, a description of where they came from). A text file is
    one record."""
    if ref.dataset in KNOWN_DATASETS:
        local, hub_id, hub_config, where = _known_local(ref, directory)
        if local is not None:
            if local.suffix in RECORD_SUFFIXES:
                return _file_column(local, "text"), f"{ref.dataset}/{ref.split} ({local}, column text)"
            return [local.read_text(encoding="utf-8")], f"{ref.dataset}/{ref.split} ({local})"
        _no_hub_twin(ref, hub_id, where)
        return (_hub_column(hub_id, hub_config, ref.split, "text", where),
                f"{ref.dataset}/{ref.split} (hub {hub_id}/{hub_config})")
    if ref.is_local():
        if not ref.path.is_file():
            raise LrcompressError(f"dataset file not found: {ref.path}")
        if ref.path.suffix in RECORD_SUFFIXES:
            return _file_column(ref.path, ref.text_column), f"{ref.path} (column {ref.text_column})"
        return [ref.path.read_text(encoding="utf-8")], str(ref.path)
    values = _hub_column(ref.dataset, ref.config, ref.split, ref.text_column, f"{ref.dataset!r} is not a local file")
    return values, f"hub {ref.dataset}" + (f"/{ref.config}" if ref.config else "") + f" {ref.split} (column {ref.text_column})"


def _join(values: list[Any], where: str, column: str) -> str:
    bad = next((i for i, value in enumerate(values) if not isinstance(value, str)), None)
    if bad is not None:
        raise LrcompressError(f"{where}: column {column!r} of record {bad} holds {type(values[bad]).__name__}, not "
                              "text (conversations need calibration.chat_template: true)")
    return "\n\n".join(values)


def render_chat(values: list[Any], tokenizer, where: str) -> list[str]:
    """Each record rendered as the model sees a conversation: ``tokenizer.apply_chat_template(messages,
    tokenize=False)``, i.e. the template's role markers and special tokens around every turn, as text.

    A record is a list of ``{"role", "content"}`` messages (e.g. a ``messages`` column) or a plain string,
    taken as one user turn. No generation prompt is appended: the records are complete conversations."""
    if not getattr(tokenizer, "chat_template", None):
        raise LrcompressError("calibration.chat_template is true but the model's tokenizer has no chat template")
    rendered = []
    for number, value in enumerate(values):
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
        if not (isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                   for m in messages)):
            raise LrcompressError(f"{where}: record {number} is neither text nor a list of "
                                  "{role, content} messages")
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return rendered


def text_source(values: list[Any], description: str, column: str = "text", chat_tokenizer=None) -> TextSource:
    """Records -> one text (blank lines between records); with ``chat_tokenizer`` every record is
    rendered through its chat template first."""
    if chat_tokenizer is not None:
        values = render_chat(values, chat_tokenizer, description)
        description += ", chat template applied"
    text = _join(values, description, column)
    return TextSource(text, description, _fingerprint(text))


def load_text(dataset: str, split: str, directory: Path | None, *, config: str | None = None,
              text_column: str = "text", chat_tokenizer=None) -> TextSource:
    """The text of a dataset reference (see the module docstring), see ``text_source``."""
    ref = DatasetRef(dataset, SPLIT_ALIASES.get(split, split), config, text_column)
    values, description = read_records(ref, directory)
    return text_source(values, description, ref.text_column, chat_tokenizer)
