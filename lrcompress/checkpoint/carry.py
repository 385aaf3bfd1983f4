"""Files a compressed checkpoint carries over byte for byte from the model it was made from.

Re-saving a tokenizer or a generation config through transformers normalizes it (a list of
``eos_token_id``, sampling settings or a chat template can be dropped or rewritten), so the files are
copied instead. They are resolved with transformers' own ``cached_file``: a local directory and a hub
id (already in the cache, or downloaded) are the same case.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GENERATION_FILES = ("generation_config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")


def source_files(source: str | Path, names: tuple[str, ...]) -> dict[str, Path]:
    """{name: local path} of the ``names`` that ``source`` (directory or hub id) has."""
    from transformers.utils import cached_file

    found = {}
    for name in names:
        path = cached_file(str(source), name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path is not None:
            found[name] = Path(path)
    return found


def write_carried_files(directory: Path, source: str | Path | None, tokenizer: Any) -> None:
    """Copy ``source``'s generation config and tokenizer files into ``directory``; a tokenizer whose
    files the source lacks (a converted GGUF, a tokenizer built in memory) is saved instead."""
    generation = source_files(source, GENERATION_FILES) if source is not None else {}
    tokenizer_files = source_files(source, TOKENIZER_FILES) if source is not None else {}
    for name, path in {**generation, **tokenizer_files}.items():
        shutil.copyfile(path, directory / name)
    if tokenizer is not None and not tokenizer_files:
        log.info("no tokenizer files at %s: saving the loaded tokenizer", source)
        tokenizer.save_pretrained(directory)
