"""lm-eval on the real SmolLM2-135M, dense and compressed (slow: marked real_model)."""
import json
from pathlib import Path

import pytest
from helpers import smollm2_path

pytestmark = pytest.mark.real_model

ARC_DOCS = 40
ARC_CORRECT = 19    # SmolLM2-135M, float32 on CPU, on the first 40 ARC-Easy test documents (measured, 2026-12-06)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = smollm2_path()
    return path


def chance_tail(source: Path, docs: int, at_least: int) -> float:
    """P(a model that picks uniformly among each document's choices gets ≥ ``at_least`` of the first
    ``docs`` right): the exact Poisson-binomial tail."""
    lines = source.read_text().splitlines()[:docs]
    distribution = [1.0]
    for line in lines:
        p = 1.0 / len(json.loads(line)["question"]["choices"])
        distribution = [(distribution[k] if k < len(distribution) else 0.0) * (1 - p)
                        + (distribution[k - 1] * p if k else 0.0) for k in range(len(distribution) + 1)]
    return sum(distribution[at_least:])


def test_dense_smollm2_matches_its_known_accuracy_which_chance_does_not_reach(smollm2, data_dir):
    """ARC-Easy on a fixed document set: the real model's known count of right answers (±1 for a near-tie
    flipped by another machine's arithmetic). A chance-level model reaches the lower bound with
    probability < 0.5% (computed from the documents), so a broken evaluation that degrades to guessing
    fails here; 12 documents and "> 0.25" let it pass a third of the time."""
    from lrcompress.eval.lm_eval_tasks import evaluate_tasks
    from lrcompress.models import load_model

    loaded = load_model(str(smollm2))
    arc = evaluate_tasks(loaded.model, loaded.tokenizer, ["arc_easy"], limit=ARC_DOCS, batch_size=4,
                         data_directory=data_dir)["arc_easy"]
    assert arc["samples"] == ARC_DOCS
    correct = round(arc["acc"] * ARC_DOCS)
    assert ARC_CORRECT - 1 <= correct <= ARC_CORRECT + 1
    assert chance_tail(Path(arc["source"]), ARC_DOCS, ARC_CORRECT - 1) < 0.005
    lambada = evaluate_tasks(loaded.model, loaded.tokenizer, ["lambada_openai"], limit=12, batch_size=4,
                             data_directory=data_dir)["lambada_openai"]
    assert lambada["acc"] > 0.1       # a random model guesses no final word
    assert lambada["perplexity"] < 1000   # a random byte model gives ~1e16
