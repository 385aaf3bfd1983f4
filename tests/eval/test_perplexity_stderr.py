"""Perplexity's standard error: per-window mean NLLs, the SE of their mean, the delta method."""
import math

import pytest
import torch

from lrcompress.eval.perplexity import batch_nll, log_perplexity_stderr


def test_batch_nll_sums_per_window():
    logits = torch.randn(3, 5, 7)
    batch = torch.randint(0, 7, (3, 5))
    sums = batch_nll(logits, batch)
    expected = [float(torch.nn.functional.cross_entropy(logits[i, :-1], batch[i, 1:], reduction="sum"))
                for i in range(3)]
    assert sums == pytest.approx(expected, rel=1e-6)


def test_log_stderr_is_the_standard_error_of_the_window_means():
    sums = [40.0, 44.0, 36.0, 40.0]                   # 10 tokens each: means 4.0, 4.4, 3.6, 4.0
    means = [4.0, 4.4, 3.6, 4.0]
    mean = sum(means) / 4
    std = math.sqrt(sum((m - mean) ** 2 for m in means) / 3)
    assert log_perplexity_stderr(sums, 10) == pytest.approx(std / 2)
    assert log_perplexity_stderr([40.0], 10) is None


def test_a_run_records_both_standard_errors(tiny_llama_dir, calibration_file):
    from lrcompress.eval.perplexity import EvalContext, perplexity
    from lrcompress.models import load_model
    from lrcompress.recipe import PerplexitySpec

    loaded = load_model(str(tiny_llama_dir))
    spec = PerplexitySpec(dataset=str(calibration_file), split="test", seq_len=48, max_windows=6)
    result = perplexity(loaded.model, loaded.tokenizer, spec, EvalContext(batch_size=3))
    assert result.windows == 6 and result.log_stderr > 0
    assert result.stderr == pytest.approx(result.value * result.log_stderr)   # delta method
