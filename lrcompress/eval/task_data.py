"""The documents of the zero-shot tasks lrcompress ships (ARC-Easy/Challenge, PIQA, LAMBADA-OpenAI).

Each task reads its original release file under the data directory and normalizes it to one schema, so
the task YAMLs describe prompts only. With no data directory the same task reads the Hugging Face hub
copy (where a hub is reachable) and normalizes that. A data directory without the file is an error,
never a silent trip to the network.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import LrcompressError
from ..core.hub import hub_reachable

Doc = dict[str, Any]


@dataclass(frozen=True)
class TaskData:
    files: tuple[str, ...]                   # relative to the data directory; the first is the documents
    split: str                               # the split name the task YAML evaluates
    hub: tuple[str, str | None, str]         # (dataset id, config, split) of the hub copy
    read_local: Callable[[list[Path]], list[Doc]]
    normalize_hub: Callable[[Doc], Doc]


def _jsonl(path: Path) -> list[Doc]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise LrcompressError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return rows


def _arc_doc(identifier: str, question: str, texts: list[str], labels: list[str], answer: str, where: str) -> Doc:
    if answer not in labels:
        raise LrcompressError(f"{where}: answerKey {answer!r} is not one of the choice labels {labels}")
    return {"id": identifier, "question": question, "choices": list(texts), "gold": labels.index(answer)}


def _arc_local(paths: list[Path]) -> list[Doc]:
    docs = []
    for number, row in enumerate(_jsonl(paths[0]), 1):
        try:
            choices = row["question"]["choices"]
            docs.append(_arc_doc(row["id"], row["question"]["stem"], [c["text"] for c in choices],
                                 [c["label"] for c in choices], row["answerKey"], f"{paths[0]} record {number}"))
        except (KeyError, TypeError) as error:
            raise LrcompressError(f"{paths[0]} record {number}: missing field {error}") from None
    return docs


def _arc_hub(row: Doc) -> Doc:
    return _arc_doc(row["id"], row["question"], row["choices"]["text"], row["choices"]["label"],
                    row["answerKey"], f"hub record {row['id']}")


def _piqa_local(paths: list[Path]) -> list[Doc]:
    rows = _jsonl(paths[0])
    labels = [line.strip() for line in paths[1].read_text().splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise LrcompressError(f"{paths[1]}: {len(labels)} labels for {len(rows)} questions in {paths[0]}")
    docs = []
    for number, (row, label) in enumerate(zip(rows, labels), 1):
        if label not in ("0", "1"):
            raise LrcompressError(f"{paths[1]} line {number}: label {label!r} is not 0 or 1")
        docs.append({"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)})
    return docs


def _piqa_hub(row: Doc) -> Doc:
    return {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(row["label"])}


def _lambada_local(paths: list[Path]) -> list[Doc]:
    docs = []
    for number, row in enumerate(_jsonl(paths[0]), 1):
        if not isinstance(row.get("text"), str) or len(row["text"].split(" ")) < 2:
            raise LrcompressError(f"{paths[0]} record {number}: needs a 'text' passage of at least two words")
        docs.append({"text": row["text"]})
    return docs


TASK_DATA: dict[str, TaskData] = {
    "arc_easy": TaskData(("arc-easy/ARC-Easy-Test.jsonl",), "test", ("allenai/ai2_arc", "ARC-Easy", "test"),
                         _arc_local, _arc_hub),
    "arc_challenge": TaskData(("arc-challenge/ARC-Challenge-Test.jsonl",), "test",
                              ("allenai/ai2_arc", "ARC-Challenge", "test"), _arc_local, _arc_hub),
    "piqa": TaskData(("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", ("baber/piqa", None, "validation"),
                     _piqa_local, _piqa_hub),
    "lambada_openai": TaskData(("lambada-openai/lambada_test.jsonl",), "test",
                               ("EleutherAI/lambada_openai", "default", "test"), _lambada_local,
                               lambda row: {"text": row["text"]}),
}


def local_files(task: str, directory: Path) -> list[Path]:
    """The task's files under ``directory``; raises naming the first missing one."""
    paths = [directory / relative for relative in TASK_DATA[task].files]
    for path in paths:
        if not path.is_file():
            raise LrcompressError(f"task {task}: {path} not found (data directory {directory}); "
                                  f"expected files: {', '.join(TASK_DATA[task].files)}")
    return paths


def task_docs(task: str, directory: str | Path | None) -> tuple[list[Doc], str]:
    """(normalized documents, a description of where they came from)."""
    spec = TASK_DATA[task]
    if directory is not None:
        paths = local_files(task, Path(directory))
        return spec.read_local(paths), ", ".join(str(p) for p in paths)
    hub_id, config, split = spec.hub
    try:
        import datasets

        hub_reachable()      # offline: fail at once instead of retrying (lrcompress/core/hub.py)
        rows = datasets.load_dataset(hub_id, config, split=split)
    except Exception as error:  # offline, missing: say where we looked
        raise LrcompressError(f"task {task}: no data directory set (--data-dir, recipe data_dir, $LRCOMPRESS_DATA) "
                              f"and the hub copy {hub_id} could not be loaded: {error}") from None
    return [spec.normalize_hub(row) for row in rows], f"hub {hub_id}" + (f"/{config}" if config else "")


def as_dataset(task: str, directory: str | Path | None):
    """A ``datasets.DatasetDict`` holding the task's one split, for lm-eval's ``custom_dataset`` hook."""
    import datasets

    docs, _ = task_docs(task, directory)
    return datasets.DatasetDict({TASK_DATA[task].split: datasets.Dataset.from_list(docs)})
