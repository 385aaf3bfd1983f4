"""Dataset names and paths -> text.

A recipe names a dataset (``wikitext2``) or gives a path. Names resolve to local files under the data
directory (``--data-dir`` flag, then the recipe's ``data_dir``, then ``$LRCOMPRESS_DATA``) and fall
back to the Hugging Face hub (``datasets``) where that is installed and reachable.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LrcompressError

# name -> split -> (path under the data directory, HF hub dataset id, HF config)
KNOWN_DATASETS: dict[str, dict[str, tuple[str, str, str]]] = {
    "wikitext2": {
        "test": ("wikitext-2-raw/wiki.test.raw", "wikitext", "wikitext-2-raw-v1"),
        "validation": ("wikitext-2-raw/wiki.valid.raw", "wikitext", "wikitext-2-raw-v1"),
        "train": ("wikitext-2-raw/wiki.train.raw", "wikitext", "wikitext-2-raw-v1"),
    },
}
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}


@dataclass
class TextSource:
    text: str
    description: str      # what was read, for the protocol line and the report
    fingerprint: str      # sha256 of the text (first 16 hex digits)


def data_dir(explicit: str | None = None, recipe_value: str | None = None) -> Path | None:
    chosen = explicit or recipe_value or os.environ.get("LRCOMPRESS_DATA")
    return Path(chosen).expanduser() if chosen else None


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_text_file(path: Path) -> str:
    """A .txt/.raw file as-is, or a .jsonl file's ``text`` fields joined by blank lines."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        missing = [i for i, record in enumerate(records) if "text" not in record]
        if missing:
            raise LrcompressError(f"{path}: record {missing[0]} has no 'text' field")
        return "\n\n".join(record["text"] for record in records)
    return path.read_text(encoding="utf-8")


def locate_text(dataset: str, split: str, directory: Path | None) -> str:
    """Where ``load_text`` will read this dataset and split, without reading it: the resolved local
    file, or ``hub:<id>/<config>/<split>``. Raises for an unknown name or split, or a missing file, so
    that a run can check its evaluation data before it compresses anything."""
    split = SPLIT_ALIASES.get(split, split)
    path = Path(dataset).expanduser()
    if dataset not in KNOWN_DATASETS:
        if path.is_file():
            return str(path.resolve())
        raise LrcompressError(f"dataset not found: {dataset!r} is neither a known name "
                              f"({', '.join(KNOWN_DATASETS)}) nor an existing file")
    splits = KNOWN_DATASETS[dataset]
    if split not in splits:
        raise LrcompressError(f"dataset {dataset!r} has no split {split!r}; splits: {', '.join(splits)}")
    relative, hub_id, hub_config = splits[split]
    if directory is not None and (directory / relative).is_file():
        return str((directory / relative).resolve())
    return f"hub:{hub_id}/{hub_config}/{split}"


def load_text(dataset: str, split: str, directory: Path | None) -> TextSource:
    where = locate_text(dataset, split, directory)
    split = SPLIT_ALIASES.get(split, split)
    if not where.startswith("hub:"):
        text = read_text_file(Path(where))
        described = str(Path(dataset).expanduser()) if dataset not in KNOWN_DATASETS else f"{dataset}/{split} ({where})"
        return TextSource(text, described, _fingerprint(text))
    relative, hub_id, hub_config = KNOWN_DATASETS[dataset][split]
    text = _from_hub(hub_id, hub_config, split, searched=directory / relative if directory else None)
    return TextSource(text, f"{dataset}/{split} (hub {hub_id}/{hub_config})", _fingerprint(text))


def _from_hub(hub_id: str, config: str, split: str, searched: Path | None) -> str:
    where = f"looked for {searched}" if searched else "no data directory set (--data-dir, data_dir, $LRCOMPRESS_DATA)"
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise LrcompressError(f"dataset file not found: {where}; and the 'datasets' package "
                              "is not installed for the hub fallback") from None
    try:
        rows = datasets.load_dataset(hub_id, config, split=split)["text"]
    except Exception as error:  # network, missing dataset: report both places we looked
        raise LrcompressError(f"dataset not found: {where}; hub fallback failed: {error}") from None
    return "\n\n".join(rows)
