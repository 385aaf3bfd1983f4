"""End to end on a tiny model: a recipe with lm-eval tasks and a dense baseline, then eval, check, compare."""
import json

import pytest
import yaml
from click.testing import CliRunner

from lrcompress.cli.main import cli
from lrcompress.results.metrics import format_bytes
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe


def flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def recipe(model_dir, calibration_file, output, ratio=0.3, method="svd"):
    return parse_recipe({
        "model": {"path": str(model_dir)},
        "calibration": {"dataset": str(calibration_file), "num_samples": 4, "seq_len": 32},
        "stages": [{"method": method, "ratio": ratio}],
        "runtime": {"device": "cpu", "batch_size": 4},
        "output": {"dir": str(output)},
        "eval": {"perplexity": [{"dataset": str(calibration_file), "seq_len": 64, "max_windows": 2}],
                 "allow_calibration_split": True,
                 "lm_eval": {"tasks": ["arc_easy", "lambada_openai"], "limit": 2, "batch_size": 2},
                 "baseline": True},
    })


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, calibration_file, task_data_dir):
    """Two runs of the same dense model (the second finds the dense baseline in the cache)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LRCOMPRESS_CACHE", str(root / "cache"))
        first = run_recipe(recipe(tiny_llama_dir, calibration_file, root / "svd-0.3"), data_directory=str(task_data_dir))
        second = run_recipe(recipe(tiny_llama_dir, calibration_file, root / "svd-0.5", ratio=0.5),
                            data_directory=str(task_data_dir))
    return root, first, second


def test_run_writes_both_protocols_apart(runs):
    root, first, _ = runs
    metrics = json.loads((root / "svd-0.3" / "metrics.json").read_text())
    evaluation = metrics["eval"]
    (ppl,) = evaluation["perplexity"].values()
    assert ppl["protocol"].startswith("token-level perplexity")
    lambada = evaluation["lm_eval"]["lambada_openai"]
    assert lambada["protocols"]["perplexity"].startswith("lm-eval target-word perplexity")
    assert lambada["perplexity"] != ppl["value"]
    arc = evaluation["lm_eval"]["arc_easy"]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(arc) and arc["samples"] == 2
    assert evaluation["baseline_lm_eval"]["arc_easy"]["samples"] == 2
    assert evaluation["baseline_cache"]["hit"] is False
    report = (root / "svd-0.3" / "report.md").read_text()
    assert "## Zero-shot tasks (lm-eval)" in report and "](relative_error.png)" in report
    assert (root / "svd-0.3" / "relative_error.png").stat().st_size > 0
    assert (root / "svd-0.3" / "kept_params.png").stat().st_size > 0


def test_dense_baseline_comes_from_the_cache(runs):
    _, first, second = runs
    assert second.metrics.dump()["eval"]["baseline_cache"]["hit"] is True
    assert second.metrics.dump()["eval"]["baseline_cache"]["fingerprint"] == first.metrics.dump()["eval"]["baseline_cache"]["fingerprint"]
    assert second.metrics.dump()["eval"]["baseline_lm_eval"] == first.metrics.dump()["eval"]["baseline_lm_eval"]
    assert second.metrics.dump()["eval"]["baseline_perplexity"] == first.metrics.dump()["eval"]["baseline_perplexity"]


def test_eval_command_matches_the_runs_dense_baseline(runs, tiny_llama_dir, task_data_dir, tmp_path):
    """`lrcompress eval` on the dense model reproduces the run's baseline: one protocol, two code paths."""
    root, first, _ = runs
    output = tmp_path / "dense.json"
    result = CliRunner().invoke(cli, ["eval", str(tiny_llama_dir), "--no-perplexity", "--tasks", "arc_easy,lambada_openai",
                                      "--limit", "2", "--batch-size", "2", "--data-dir", str(task_data_dir),
                                      "--device", "cpu", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "lm-eval tasks" in result.output and "arc_easy" in result.output
    dense = json.loads(output.read_text())["eval"]["lm_eval"]
    baseline = first.metrics.dump()["eval"]["baseline_lm_eval"]
    for task in ("arc_easy", "lambada_openai"):
        for metric in dense[task]["protocols"]:
            assert dense[task][metric] == pytest.approx(baseline[task][metric], rel=1e-6)
    # the file is a baseline for the gate: the compressed run against it
    gate = CliRunner().invoke(cli, ["check", str(root / "svd-0.3" / "metrics.json"), "--baseline", str(output),
                                    "--min-recovery", "0"])
    assert gate.exit_code == 0, gate.output


def test_check_against_embedded_baseline(runs):
    root, first, _ = runs
    ppl = next(iter(first.metrics.dump()["eval"]["perplexity"].values()))["value"]
    dense = next(iter(first.metrics.dump()["eval"]["baseline_perplexity"].values()))["value"]
    metrics = str(root / "svd-0.3" / "metrics.json")
    lambada = first.metrics.dump()["eval"]["lm_eval"]["lambada_openai"]["perplexity"]
    lambada_dense = first.metrics.dump()["eval"]["baseline_lm_eval"]["lambada_openai"]["perplexity"]
    # the threshold applies to every perplexity, each against its own protocol's baseline
    needed = max(ppl / dense, lambada / lambada_dense) - 1
    loose = CliRunner().invoke(cli, ["check", metrics, "--max-ppl-increase", str(max(needed, 0) + 0.01)])
    tight = CliRunner().invoke(cli, ["check", metrics, "--bound", f"perplexity {next(iter(first.metrics.dump()['eval']['perplexity']))}<={ppl * 0.99}"])
    assert loose.exit_code == 0, loose.output
    assert tight.exit_code == 1, tight.output


def test_eval_command_errors(tiny_llama_dir, tmp_path):
    result = CliRunner().invoke(cli, ["eval", str(tiny_llama_dir), "--no-perplexity"])
    assert result.exit_code == 2 and "nothing to evaluate" in flat(result)
    result = CliRunner().invoke(cli, ["eval", str(tiny_llama_dir), "--no-perplexity", "--tasks", "piqa",
                                      "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "piqa/valid.jsonl" in flat(result)


def test_compare_writes_table_and_rate_distortion(runs, tmp_path):
    root, first, second = runs
    result = CliRunner().invoke(cli, ["compare", str(root / "svd-0.3"), str(root / "svd-0.5"), "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "compare.md").read_text()
    for run in (first, second):
        c = run.metrics.dump()["compression"]
        ppl = next(iter(run.metrics.dump()["eval"]["perplexity"].values()))["value"]
        assert f"| svd | {format_bytes(c['model_bytes_after'])} | {100 * c['model_bytes_ratio']:.1f}% |" in table
        assert f"{ppl:.3f}" in table
    assert "Perplexity protocol: token-level" in table
    assert (tmp_path / "rate_distortion.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(cli, ["compare", str(tmp_path)])
    assert bad.exit_code == 2 and "no metrics.json" in flat(bad)


def test_compare_degrades_to_a_table_when_protocols_differ(runs, tmp_path):
    import shutil

    root, _, _ = runs
    other = tmp_path / "other"
    shutil.copytree(root / "svd-0.5", other)
    metrics = json.loads((other / "metrics.json").read_text())
    for result in metrics["eval"]["perplexity"].values():
        result["protocol"] += " (another window count)"
    (other / "metrics.json").write_text(json.dumps(metrics))
    result = CliRunner().invoke(cli, ["compare", str(root / "svd-0.3"), str(other), "--output", str(tmp_path / "c")])
    assert result.exit_code == 0, flat(result)
    assert "warning" in flat(result) and "no plot" in flat(result)
    table = (tmp_path / "c" / "compare.md").read_text()
    assert "(another window count)" in table and "> warning:" in table
    assert not (tmp_path / "c" / "rate_distortion.png").exists()


def test_inspect_lists_layers_in_order_and_provenance_as_a_table(runs):
    root, _, _ = runs
    result = CliRunner().invoke(cli, ["inspect", str(root / "svd-0.3")])
    assert result.exit_code == 0, flat(result)
    out = result.output
    assert out.index("model.layers.0.") < out.index("model.layers.1.")
    assert "provenance" in out and "versions.torch" in out and "{" not in out


def test_recipe_lm_eval_section_is_validated(tiny_llama_dir, calibration_file, tmp_path):
    from lrcompress.errors import RecipeError

    data = {"model": {"path": str(tiny_llama_dir)}, "eval": {"lm_eval": {"tasks": [], "limt": 3}}}
    with pytest.raises(RecipeError) as error:
        parse_recipe(data, "r.yaml")
    assert "eval.lm_eval.limt: unknown key" in str(error.value)
    assert "eval.lm_eval.tasks" in str(error.value)


def test_eval_of_the_written_checkpoint_reproduces_the_run(runs, task_data_dir, tmp_path):
    """lm-eval on the checkpoint as lrcompress.load rebuilds it gives the numbers of the in-memory model."""
    root, first, _ = runs
    output = tmp_path / "reloaded.json"
    result = CliRunner().invoke(cli, ["eval", str(root / "svd-0.3"), "--no-perplexity", "--tasks", "lambada_openai",
                                      "--limit", "2", "--batch-size", "2", "--data-dir", str(task_data_dir),
                                      "--device", "cpu", "--output", str(output)])
    assert result.exit_code == 0, result.output
    reloaded = json.loads(output.read_text())["eval"]["lm_eval"]["lambada_openai"]
    in_memory = first.metrics.dump()["eval"]["lm_eval"]["lambada_openai"]
    assert reloaded["perplexity"] == pytest.approx(in_memory["perplexity"], rel=1e-5)
    assert reloaded["acc"] == in_memory["acc"]


def _task_yaml(folder, name, dataset_path, **extra):
    """A user's multiple-choice task YAML (lm-eval's format) in ``folder``."""
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": dataset_path, "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{question}}\nAnswer:", "doc_to_choice": ["no", "yes"], "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}], **extra}))
    return folder


def test_an_unreachable_task_is_one_message_and_exit_2(tiny_llama_dir, tmp_path):
    """A task whose data lives on the (offline) hub, as hellaswag's does: one line, exit 2, no traceback."""
    tasks = _task_yaml(tmp_path / "tasks", "hub_task", "someone/not-reachable")
    result = CliRunner().invoke(cli, ["eval", str(tiny_llama_dir), "--no-perplexity", "--tasks", "hub_task",
                                      "--include-path", str(tasks)])
    assert result.exit_code == 2, flat(result)
    assert "lm-eval task 'hub_task' could not be loaded" in flat(result)
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3


def test_unknown_task_names_get_a_did_you_mean():
    from types import SimpleNamespace

    from lrcompress.errors import LrcompressError
    from lrcompress.eval.lm_eval_tasks import _check_known

    with pytest.raises(LrcompressError, match="'arc_esay' .did you mean 'arc_easy'.*--include-path"):
        _check_known(SimpleNamespace(all_tasks=["arc_easy", "piqa"]), ["arc_esay"])


def test_include_path_runs_a_users_own_task_yaml(tiny_llama_dir, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"question": q, "label": a}) + "\n"
                            for q, a in [("Is fire hot?", 1), ("Is ice hot?", 0), ("Is the sun bright?", 1)]))
    tasks = _task_yaml(tmp_path / "tasks", "my_yesno", "json", dataset_kwargs={"data_files": {"test": str(docs)}})
    result = CliRunner().invoke(cli, ["eval", str(tiny_llama_dir), "--no-perplexity", "--tasks", "my_yesno",
                                      "--include-path", str(tasks), "--json"])
    assert result.exit_code == 0, flat(result)
    entry = json.loads(result.output[result.output.index("{"):])["lm_eval"]["my_yesno"]
    assert entry["samples"] == 3 and 0.0 <= entry["acc"] <= 1.0
