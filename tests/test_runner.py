"""End to end on a tiny model: recipe -> compressed checkpoint -> metrics.json/report.md."""
import hashlib
import json

import pytest

from lrcompress.errors import CheckpointError, LrcompressError
from lrcompress.eval import RunMetrics
from lrcompress.runner import run_recipe
from tiny_runs import tiny_recipe


def test_run_writes_checkpoint_metrics_and_report(tiny_llama_dir, calibration_file, tmp_path):
    out = tmp_path / "run"
    result = run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, out))
    assert result.output_dir == out
    metrics = json.loads((out / "metrics.json").read_text())
    c = metrics["compression"]
    assert c["targeted_modules"] == 14
    assert 0.19 <= c["targeted_ratio"] <= 0.25  # ratio 0.2 with floor() on the rank
    assert 0 < c["model_ratio"] < c["targeted_ratio"]
    assert c["bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    ppl = metrics["eval"]["perplexity"][f"{calibration_file}/test"]
    assert {"value", "dataset", "split", "seq_len", "windows"} <= set(ppl)
    assert ppl["windows"] == 3 and ppl["seq_len"] == 48 and ppl["value"] > 1
    assert "token-level" in ppl["protocol"]
    assert {"load", "compress", "eval"} <= set(metrics["timing"])
    assert len(metrics["modules"]) == 14
    prov = metrics["provenance"]
    assert prov["seed"] == 0 and prov["versions"]["torch"] and prov["calibration"]["windows_sha256"]
    report = (out / "report.md").read_text()
    assert "model.layers.1.mlp.down_proj" in report and "```yaml" in report
    assert (out / "recipe.yaml").is_file()


def test_runs_are_reproducible(tiny_llama_dir, calibration_file, tmp_path):
    first = run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "a")).metrics.dump()
    second = run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "b")).metrics.dump()
    assert first["provenance"]["calibration"] == second["provenance"]["calibration"]
    assert [m["relative_error"] for m in first["modules"]] == [m["relative_error"] for m in second["modules"]]
    digests = [{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / run).glob("*.safetensors"))}
               for run in ("a", "b")]
    assert digests[0] == digests[1] and len(digests[0]) == 3     # two blocks of layers + the outer tensors


def test_existing_output_is_not_overwritten_without_the_flag(tiny_llama_dir, calibration_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="--overwrite"):
        run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, out))
    assert (out / "keep.txt").read_text() == "precious"


def test_a_crash_while_writing_leaves_no_checkpoint_but_a_resumable_staging_dir(tiny_llama_dir, calibration_file,
                                                                                tmp_path, monkeypatch):
    import errno

    import lrcompress.checkpoint.staging as staging

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(staging, "swap_into_place", broken)  # everything written, the final rename fails
        with pytest.raises(CheckpointError, match="disk is full.*rerun the same command"):
            run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, out))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.partial"]
    state = json.loads((tmp_path / "run.partial" / "state.json").read_text())
    assert state["segments"] == [[0], [1]] and state["written"]
    assert (tmp_path / "run.partial" / "metrics.json").is_file()
    run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, out))  # the same command finishes the run
    assert (out / "config.json").is_file() and (out / "metrics.json").is_file()
    assert not (tmp_path / "run.partial").exists() and not (out / "state.json").exists()


def test_missing_model_and_dataset_name_the_path(tiny_llama_dir, calibration_file, tmp_path):
    with pytest.raises(LrcompressError, match="no-such-model"):
        run_recipe(tiny_recipe(tmp_path / "no-such-model", calibration_file, tmp_path / "o"))
    recipe = tiny_recipe(tiny_llama_dir, tmp_path / "missing.txt", tmp_path / "o2")
    with pytest.raises(LrcompressError, match="missing.txt"):
        run_recipe(recipe)


def test_dry_run_plans_without_writing(tiny_llama_dir, calibration_file, tmp_path):
    result = run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "o"), dry_run=True)
    assert len(result.plan) == 14 and not (tmp_path / "o").exists()
    q = next(p for p in result.plan if p.name.endswith("layers.0.self_attn.q_proj"))
    assert (q.out_features, q.in_features, q.params_before) == (64, 64, 4096)
    assert q.params_after == q.rank * 128 <= 0.8 * 4096


def test_a_moe_recipe_run_writes_a_plain_checkpoint(tmp_path, calibration_file):
    from lrcompress.recipe import parse_recipe
    from transformers import AutoModelForCausalLM
    from helpers import byte_tokenizer
    from moe_helpers import tiny_moe
    from tiny_runs import tiny_recipe_dict

    model_dir = tmp_path / "moe"
    tiny_moe("qwen2_moe").save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    recipe = tiny_recipe_dict(model_dir, calibration_file, tmp_path / "out", method="expert_average")
    recipe["stages"] = [{"method": "expert_average", "expert_ratio": 0.5}]
    dry = run_recipe(parse_recipe(recipe), dry_run=True)
    assert [p.name for p in dry.plan] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    result = run_recipe(parse_recipe(recipe))
    assert [m["params_after"] for m in result.metrics.dump()["modules"]] == [p.params_after for p in dry.plan]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_experts == 2
    assert reloaded.model.layers[0].mlp.experts.down_proj.shape[0] == 2
    bad = dict(recipe, stages=[{"method": "expert_average", "num_experts": 2, "ratio": 0.2}])
    with pytest.raises(Exception, match="stages.0.ratio"):
        parse_recipe(bad)


def test_output_matching_reports_its_cost(tiny_llama_dir, calibration_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "run")
    recipe.runtime.target = "original"
    metrics = run_recipe(recipe).metrics
    cost = metrics.output_matching
    assert cost.target == "original" and cost.extra_seconds > 0 and cost.true_sequential
    assert cost.reference_forwards == 2 * 4        # 2 layers × 4 passes (q/k/v, o, gate/up, down)
    assert cost.peak_reference_activation_bytes > 0 and cost.peak_cross_gram_bytes_per_layer > 0
    assert all(m.details["target"] == "original" for m in metrics.modules)
    saved = RunMetrics.load(tmp_path / "run" / "metrics.json")
    assert saved.output_matching == cost


def test_chat_template_calibration_renders_conversations(tiny_llama_dir, calibration_file, tmp_path):
    """An instruct model's calibration text: each record of a 'messages' column through the chat template."""
    import shutil

    from lrcompress.recipe import parse_recipe
    from tiny_runs import tiny_recipe_dict

    chat = tmp_path / "chat"
    records = [{"messages": [{"role": "user", "content": f"question {i} about weights and factors"},
                             {"role": "assistant", "content": f"answer {i}: the layers compress"}]} for i in range(40)]
    chat.mkdir()
    (chat / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    calibration = {"dataset": str(chat / "conversations.jsonl"), "text_column": "messages", "chat_template": True,
                   "num_samples": 4, "seq_len": 48}
    recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "out", calibration=calibration)
    with pytest.raises(LrcompressError, match="has no chat template"):   # the byte tokenizer has none
        run_recipe(parse_recipe(recipe), dry_run=True)

    model_dir = tmp_path / "instruct"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    recipe["model"]["path"] = str(model_dir)
    metrics = run_recipe(parse_recipe(recipe)).metrics
    assert "chat template applied" in metrics.provenance.calibration.source


@pytest.fixture
def second_text(tmp_path):
    """A second calibration source in records form, with another vocabulary than ``calibration_file``."""
    path = tmp_path / "second.jsonl"
    words = "numbers count up while letters spell words and windows slide over the text".split()
    path.write_text("".join(json.dumps({"body": " ".join(words[(i + j) % len(words)] for j in range(300))}) + "\n"
                            for i in range(8)))
    return path


def mixture(first, second, first_windows: int = 4, second_windows: int = 2) -> dict:
    return {"seq_len": 48, "seed": 0, "sources": [
        {"dataset": str(first), "num_samples": first_windows},
        {"dataset": str(second), "text_column": "body", "num_samples": second_windows}]}


@pytest.mark.usefixtures("no_report")
def test_a_two_source_mixture_runs_and_is_recorded_per_source(tiny_llama_dir, calibration_file, second_text,
                                                               tmp_path):
    from lrcompress.recipe import parse_recipe
    from tiny_runs import tiny_recipe_dict

    recipe = parse_recipe(tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "mix",
                                           calibration=mixture(calibration_file, second_text)))
    single = tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "one")
    assert recipe.fingerprint() != single.fingerprint()
    run_recipe(recipe)
    saved = json.loads((tmp_path / "mix" / "metrics.json").read_text())["provenance"]["calibration"]
    assert saved["num_samples"] == 6 and saved["source"].startswith("mixture: 4 × ")
    first, second = saved["sources"]
    assert (first["num_samples"], second["num_samples"]) == (4, 2)
    assert str(calibration_file) in first["description"] and "second.jsonl (column body)" in second["description"]
    assert first["tokens"] == len(calibration_file.read_text())            # the byte tokenizer: one per byte
    assert first["text_sha256"] != second["text_sha256"] and first["windows_sha256"] != second["windows_sha256"]
    config = json.loads((tmp_path / "mix" / "config.json").read_text())
    assert config["quantization_config"]["provenance"]["calibration"]["sources"] == saved["sources"]


def test_the_dry_run_shows_each_source_and_missing_ones_stop_it_before_loading(tiny_llama_dir, calibration_file,
                                                                                second_text, tmp_path):
    from lrcompress.recipe import parse_recipe
    from tiny_runs import tiny_recipe_dict

    recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "o",
                              calibration=mixture(calibration_file, second_text))
    lines = run_recipe(parse_recipe(recipe), dry_run=True).data_sources
    assert lines[0] == f"calibration.sources.0 (4 windows) {calibration_file}/validation: {calibration_file.resolve()}"
    assert lines[1] == f"calibration.sources.1 (2 windows) {second_text}/validation: {second_text.resolve()}"
    recipe["calibration"]["sources"][1]["dataset"] = str(tmp_path / "gone.jsonl")
    with pytest.raises(LrcompressError, match=r"calibration\.sources\.1\.dataset .*gone\.jsonl"):
        run_recipe(parse_recipe(recipe), dry_run=True)


def test_evaluating_on_any_source_of_the_mixture_is_refused(tiny_llama_dir, calibration_file, second_text, tmp_path):
    from lrcompress.recipe import parse_recipe
    from tiny_runs import tiny_recipe_dict

    recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "o",
                              calibration=mixture(calibration_file, second_text))
    recipe["eval"] = {"perplexity": [{"dataset": str(second_text), "text_column": "body", "seq_len": 48}]}
    with pytest.raises(LrcompressError, match=r"eval\.perplexity\.0 evaluates on the text calibration reads .*second"):
        run_recipe(parse_recipe(recipe), dry_run=True)
    recipe["eval"]["allow_calibration_split"] = True
    assert run_recipe(parse_recipe(recipe), dry_run=True).plan
