"""Fixtures for evaluation tests (imported by tests/eval and tests/cli conftests): offline, private cache."""
import json
import os
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

ARC = [
    {"id": "q1", "question": {"stem": "Which gas do plants take in?", "choices": [
        {"text": "oxygen", "label": "A"}, {"text": "carbon dioxide", "label": "B"},
        {"text": "helium", "label": "C"}, {"text": "neon", "label": "D"}]}, "answerKey": "B"},
    {"id": "q2", "question": {"stem": "What melts ice?", "choices": [
        {"text": "heat", "label": "1"}, {"text": "cold", "label": "2"}, {"text": "dark", "label": "3"}]},
     "answerKey": "1"},
    {"id": "q3", "question": {"stem": "How many legs has a spider?", "choices": [
        {"text": "six", "label": "A"}, {"text": "eight", "label": "B"}, {"text": "ten", "label": "C"},
        {"text": "four", "label": "D"}, {"text": "two", "label": "E"}]}, "answerKey": "B"},
]
PIQA = [{"goal": "Dry a wet phone.", "sol1": "Put it in rice.", "sol2": "Put it in soup."},
        {"goal": "Open a jar.", "sol1": "Freeze the lid.", "sol2": "Run the lid under hot water."},
        {"goal": "Light a room.", "sol1": "Switch on a lamp.", "sol2": "Close the curtains."}]
PIQA_LABELS = [0, 1, 0]
LAMBADA = [{"text": "She opened the door and saw her old friend standing in the rain holding a small umbrella"},
           {"text": "The dog ran across the field to fetch the ball and brought it back to the boy"},
           {"text": "After the long winter the farmers finally planted the seeds in the warm soil of spring"}]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="session")
def task_data_dir(tmp_path_factory) -> Path:
    """A data directory with three documents per task, in each release's original file format."""
    root = tmp_path_factory.mktemp("task-data")
    _jsonl(root / "arc-easy" / "ARC-Easy-Test.jsonl", ARC)
    _jsonl(root / "arc-challenge" / "ARC-Challenge-Test.jsonl", ARC[::-1])
    _jsonl(root / "piqa" / "valid.jsonl", PIQA)
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{label}\n" for label in PIQA_LABELS))
    _jsonl(root / "lambada-openai" / "lambada_test.jsonl", LAMBADA)
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """The baseline cache (and GGUF cache) of each test in its own directory."""
    monkeypatch.setenv("LRCOMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
