"""The CLI end to end on a tiny model: exit codes, messages, and the files it leaves."""
import json

import pytest
import yaml
from click.testing import CliRunner

from lrcompress.cli.main import cli
from tiny_runs import tiny_recipe_dict


def _recipe_file(tmp_path, tiny_llama_dir, calibration_file, **kwargs):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "out", **kwargs)))
    return path


def test_run_then_inspect_eval_and_export(tiny_llama_dir, calibration_file, tmp_path):
    runner = CliRunner()
    recipe = _recipe_file(tmp_path, tiny_llama_dir, calibration_file)
    result = runner.invoke(cli, ["run", str(recipe), "--set", "stages.0.ratio=0.4"])
    assert result.exit_code == 0, result.output
    assert "lrcompress summary" in result.output and "perplexity" in result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0.39 <= metrics["compression"]["targeted_ratio"] <= 0.45

    again = runner.invoke(cli, ["run", str(recipe)])
    assert again.exit_code == 2 and "--overwrite" in again.output

    inspected = runner.invoke(cli, ["inspect", str(tmp_path / "out")])
    assert inspected.exit_code == 0 and "low_rank" in inspected.output

    evaluated = runner.invoke(cli, ["eval", str(tmp_path / "out"), "--dataset", str(calibration_file),
                                    "--seq-len", "48", "--max-windows", "3", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    ppl = json.loads(evaluated.output)
    recorded = metrics["eval"]["perplexity"][f"{calibration_file}/test"]["value"]
    assert abs(ppl["value"] - recorded) < 1e-3 * recorded

    exported = runner.invoke(cli, ["export", str(tmp_path / "out"), str(tmp_path / "dense"), "--dense"])
    assert exported.exit_code == 0 and (tmp_path / "dense" / "config.json").is_file()


def test_dry_run_prints_the_plan(tiny_llama_dir, calibration_file, tmp_path):
    recipe = _recipe_file(tmp_path, tiny_llama_dir, calibration_file)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.down_proj" in result.output and "14 target modules" in result.output
    assert f"calibration: {calibration_file}" in result.output
    assert not (tmp_path / "out").exists()


def test_dry_run_of_a_quantized_run_counts_bytes_and_never_a_negative_removal(tiny_llama_dir, calibration_file,
                                                                              tmp_path):
    stages = [{"method": "rtn", "bits": 4, "group_size": 16}, {"method": "eora", "rank": 4}]
    recipe = _recipe_file(tmp_path, tiny_llama_dir, calibration_file, stages=stages)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    caption = " ".join(result.output.split())
    assert "% removed); parameters" in caption and "(+" in caption and "(-" not in caption


@pytest.mark.parametrize("section, key", [("calibration", "calibration.dataset"),
                                          ("perplexity", "eval.perplexity.0.dataset")])
def test_dry_run_checks_every_dataset_before_the_model_load(tiny_llama_dir, calibration_file, tmp_path, section, key):
    recipe = _recipe_file(tmp_path, tiny_llama_dir, calibration_file)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--dry-run", "--set", f"{key}=someone/no-such-set"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "'someone/no-such-set'" in message and "not reachable" in message and "loading" not in message


def test_recipe_typo_exits_2_naming_the_key(tiny_llama_dir, calibration_file, tmp_path):
    recipe = _recipe_file(tmp_path, tiny_llama_dir, calibration_file)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--set", "stages.0.ratoi=0.3"])
    assert result.exit_code == 2
    assert "stages.0.ratoi" in result.output and str(recipe) in result.output


def test_log_json_writes_one_json_object_per_line(tiny_llama_dir, calibration_file, tmp_path):
    recipe = _recipe_file(tmp_path, tiny_llama_dir, calibration_file)
    result = CliRunner().invoke(cli, ["--log-json", "run", str(recipe)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    layers = [line for line in lines if line.get("event") == "layer"]
    assert [line["layer"] for line in layers] == [0, 1] and layers[-1]["layers_total"] == 2
    assert layers[-1]["peak_rss_bytes"] > 0
    assert [line["layers_done"] for line in layers] == [1, 2]
    assert layers[0]["eta_seconds"] > 0 and layers[-1]["eta_seconds"] == 0
    assert "1/2 layers, 7/14 modules, ETA" in layers[0]["message"]
    assert "render.py" not in result.stderr
    modules = [line for line in lines if line.get("event") == "module"]
    assert len(modules) == 14 and all("relative_error" in m for m in modules)
    assert [m["modules_done"] for m in modules] == list(range(1, 15)) and modules[-1]["eta_seconds"] == 0
    # a module's line comes as it finishes, before its layer's line
    order = [line.get("event") for line in lines if line.get("event") in ("module", "layer")]
    assert order == ["module"] * 7 + ["layer"] + ["module"] * 7 + ["layer"]
    # stdout: exactly one JSON result event, nothing else (no summary box)
    [event] = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert event["event"] == "result" and event["status"] == "ok"
    assert event["compression"]["targeted_modules"] == 14 and event["perplexity"]


def test_log_json_error_is_one_result_event(tiny_llama_dir, calibration_file, tmp_path):
    recipe = _recipe_file(tmp_path, tiny_llama_dir, calibration_file)
    result = CliRunner().invoke(cli, ["--log-json", "run", str(recipe), "--set", "stages.0.ratoi=0.3"])
    assert result.exit_code == 2
    [event] = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert event["status"] == "error" and "stages.0.ratoi" in event["message"]


def test_dry_run_of_a_byte_budget_lists_every_modules_choice_and_the_total(tiny_llama_dir, calibration_file, tmp_path):
    budget = {"bits_per_weight": 4.5, "choices": [{"method": "rtn", "bits": [2, 4], "group_size": 16}]}
    recipe = _recipe_file(tmp_path, tiny_llama_dir, calibration_file, stages=[], budget=budget)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "byte budget: 4.5 bits per weight (dp)" in text
    assert "rtn bits=2 group_size=16" in text and "rtn bits=4 group_size=16" in text
    assert "choice per module" in text and "mlp.down_proj" in text
    assert "model " in text and "bytes (" in text and "of a budget of" in text
    assert "all modules: MiB" in text and "est. loss" in text
    assert not (tmp_path / "out").exists()
    event = json.loads(CliRunner().invoke(cli, ["--log-json", "run", str(recipe), "--dry-run"]).stdout)
    chosen = event["allocation"]["budget"]["modules"]
    assert [m["bytes"] for m in chosen] == [p["bytes_after"] for p in event["plan"]]
