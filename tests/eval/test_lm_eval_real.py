"""lm-eval on the real SmolLM2-135M, dense and compressed (slow: marked real_model)."""
from pathlib import Path

import pytest
from helpers import smollm2_path

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = smollm2_path()
    return path


def test_dense_smollm2_beats_chance_and_a_random_model(smollm2, data_dir):
    from lrcompress.eval.lm_eval_tasks import evaluate_tasks
    from lrcompress.models import load_model

    loaded = load_model(str(smollm2))
    results = evaluate_tasks(loaded.model, loaded.tokenizer, ["arc_easy", "lambada_openai"], limit=12,
                             batch_size=4, data_directory=data_dir)
    assert results["arc_easy"]["samples"] == 12
    assert results["arc_easy"]["acc"] > 0.25            # four choices: chance is 0.25
    assert results["lambada_openai"]["acc"] > 0.1       # a random model guesses no final word
    assert results["lambada_openai"]["perplexity"] < 1000   # a random byte model gives ~1e16
