"""The standard evaluation: the recipe preset, and the zero-shot average with its standard error."""
import math

import pytest

from lrcompress.eval.metrics import LmEvalResult
from lrcompress.eval.protocol import ZERO_SHOT_TASKS, zero_shot_average
from lrcompress.recipe import STANDARD_EVAL, parse_recipe


def task(acc: float, stderr: float | None, limit: int | None = 200) -> LmEvalResult:
    return LmEvalResult.model_validate({"acc": acc, "acc_stderr": stderr, "protocols": {"acc": "lm-eval acc"},
                                        "samples": limit, "limit": limit})


def test_the_average_is_the_mean_acc_with_the_stderr_of_a_mean_of_independent_tasks():
    results = {name: task(acc, se) for name, acc, se in zip(ZERO_SHOT_TASKS, (0.6, 0.3, 0.7, 0.4),
                                                             (0.03, 0.032, 0.031, 0.035))}
    average = zero_shot_average(results)
    assert average.value == pytest.approx(0.5)
    assert average.stderr == pytest.approx(math.sqrt(0.03**2 + 0.032**2 + 0.031**2 + 0.035**2) / 4)
    assert average.limit == 200 and average.format() == f"50.00 ± {100 * average.stderr:.2f}"


def test_no_average_without_every_task_and_no_stderr_when_one_is_undefined():
    results = {name: task(0.5, 0.03) for name in ZERO_SHOT_TASKS}
    assert zero_shot_average({k: v for k, v in results.items() if k != "piqa"}) is None
    assert zero_shot_average(None) is None
    results["piqa"] = task(0.5, None)
    assert zero_shot_average(results).stderr is None and zero_shot_average(results).format() == "50.00"


def test_the_standard_protocol_fills_the_eval_section_and_given_keys_win():
    recipe = parse_recipe({"model": {"path": "x"}, "eval": {"protocol": "standard"}})
    ev = recipe.eval
    assert [(p.dataset, p.split, p.seq_len, p.max_windows) for p in ev.perplexity] == \
        [("wikitext2", "test", 512, 40), ("webtext", "test", 512, 40)]
    assert ev.lm_eval.tasks == list(ZERO_SHOT_TASKS) and ev.lm_eval.limit == 200 and ev.baseline
    assert parse_recipe(recipe.model_dump()) == recipe                    # the dump parses back
    cheap = parse_recipe({"model": {"path": "x"}, "eval": {"protocol": "standard", "lm_eval": None}}).eval
    assert cheap.lm_eval is None and len(cheap.perplexity) == 2
    assert STANDARD_EVAL["lm_eval"]["limit"] == 200


def test_an_unknown_protocol_is_refused():
    from lrcompress.errors import RecipeError

    with pytest.raises(RecipeError, match="eval.protocol"):
        parse_recipe({"model": {"path": "x"}, "eval": {"protocol": "full"}})


def test_the_lm_eval_table_ends_with_the_average_when_all_four_tasks_ran():
    from rich.console import Console

    from lrcompress.cli.render_eval import lm_eval_table
    from lrcompress.eval.metrics import EvalSection

    section = EvalSection(lm_eval={name: task(0.5, 0.02) for name in ZERO_SHOT_TASKS})
    console = Console(width=300, record=True)
    console.print(lm_eval_table(section))
    text = console.export_text()                        # (and clears the record)
    assert "zero-shot average" in text and "0.5000 ± 0.0100" in text and "200 per task" in text
    console.print(lm_eval_table(EvalSection(lm_eval={"arc_easy": task(0.5, 0.02)})))
    text = console.export_text()
    assert "arc_easy" in text and "zero-shot average" not in text


def test_eval_protocol_standard_checks_both_test_files_and_the_four_tasks(tiny_llama_dir, tmp_path):
    """``lrcompress eval --protocol standard`` evaluates what the recipe preset names: here it stops at the
    first missing file of an empty data directory, which names the web-text or WikiText path."""
    from click.testing import CliRunner

    from lrcompress.cli.main import cli

    result = CliRunner().invoke(cli, ["eval", str(tiny_llama_dir), "--protocol", "standard", "--data-dir",
                                      str(tmp_path)])
    assert result.exit_code == 2
    assert "wiki.test.raw" in " ".join(result.output.split())
