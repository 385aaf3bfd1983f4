"""The run summary shows the standard evaluation's three numbers beside the dense model's."""
from rich.console import Console

from lrcompress.cli.render import summary_table
from lrcompress.eval.perplexity import PerplexityResult
from lrcompress.eval.protocol import ZERO_SHOT_TASKS
from lrcompress.eval.section import EvalSection, LmEvalResult
from lrcompress.results.metrics import RunMetrics


def tasks(accuracy: float, stderr: float, limit: int = 200) -> dict[str, LmEvalResult]:
    return {task: LmEvalResult(protocols={"acc": "accuracy"}, samples=limit, acc=accuracy, acc_stderr=stderr,
                               limit=limit) for task in ZERO_SHOT_TASKS}


def perplexities(wiki: float, web: float) -> dict[str, PerplexityResult]:
    return {"wikitext2/test": PerplexityResult(value=wiki, protocol="token-level", stderr=1.0),
            "webtext/test": PerplexityResult(value=web, protocol="token-level", stderr=2.0)}


def rendered(section: EvalSection) -> str:
    console = Console(width=400, record=True)
    console.print(summary_table(RunMetrics(eval=section), None))
    return console.export_text()


def test_summary_shows_both_perplexities_and_the_zero_shot_average_beside_dense():
    text = rendered(EvalSection(perplexity=perplexities(60.0, 100.0), lm_eval=tasks(0.40, 0.02),
                                baseline_perplexity=perplexities(30.0, 25.0), baseline_lm_eval=tasks(0.45, 0.04)))
    assert "60.000 ± 1.000 (2.00× dense)" in text and "100.000 ± 2.000 (4.00× dense)" in text
    # the mean of four equal accuracies, stderr sqrt(4·se²)/4 = se/2, in percent
    assert "zero-shot average" in text and "40.00 ± 1.00 %" in text and "200 documents each" in text
    assert "dense zero-shot average" in text and "45.00 ± 2.00 %" in text


def test_summary_leaves_out_an_average_that_is_not_the_standard_one():
    partial = {task: result for task, result in tasks(0.4, 0.02).items() if task != "piqa"}
    text = rendered(EvalSection(perplexity=perplexities(60.0, 100.0), lm_eval=partial))
    assert "zero-shot average" not in text and "× dense" not in text and "60.000 ± 1.000" in text
