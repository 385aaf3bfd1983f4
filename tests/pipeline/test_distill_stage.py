"""``runtime.distill`` through ``lrcompress run`` (pipeline/distill_stage.py): the checkpoint holds the distilled
factors and loads through ``lrcompress.load`` and ``from_pretrained`` with the in-memory model's logits; a run
killed during the distillation, or while its segments were being rewritten, resumes to the uninterrupted run's
tensors; metrics.json carries the report; the dry run shows the option; several processes are refused."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lrcompress
from helpers import save_tiny
from lrcompress.errors import LrcompressError
from lrcompress.pipeline import distill_stage
from lrcompress.pipeline.distill import DistillConfig
from lrcompress.pipeline.distill_stage import DistillStage
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from models.test_lazy import assert_same_tensors, checkpoint_tensors
from tiny_runs import tiny_recipe_dict

DISTILL = {"epochs": 2, "lr": 1e-3, "batch_size": 2, "held_out": 0.34}     # 6 windows: 4 trained on, 2 held out
IDS = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(5))

pytestmark = pytest.mark.usefixtures("no_report", "one_thread")


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("two"), "llama", num_hidden_layers=2, hidden_size=32,
                     intermediate_size=64)


def _recipe(model, text, out, distill=DISTILL):
    return parse_recipe(tiny_recipe_dict(model, text, out, ratio=0.5,
                                         runtime={"device": "cpu", "batch_size": 3, "distill": distill}))


def test_the_checkpoint_holds_the_distilled_factors_and_loads_with_the_same_logits(two_layers, calibration_file,
                                                                                   tmp_path):
    result = run_recipe(_recipe(two_layers, calibration_file, tmp_path / "distilled"))
    run_recipe(_recipe(two_layers, calibration_file, tmp_path / "plain", distill=None))
    distilled, plain = checkpoint_tensors(tmp_path / "distilled"), checkpoint_tensors(tmp_path / "plain")
    changed = [name for name in distilled if not torch.equal(distilled[name], plain[name])]
    assert changed and all(name.endswith(("up.weight", "down.weight")) for name in changed)
    with torch.no_grad():
        expected = result.model(input_ids=IDS).logits
        loaded = lrcompress.load(tmp_path / "distilled", kernels=False)(input_ids=IDS).logits
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "distilled", dtype=torch.float32)(input_ids=IDS).logits
    assert torch.equal(loaded, expected) and torch.allclose(hf, expected, atol=1e-5, rtol=1e-5)
    report = json.loads((tmp_path / "distilled" / "metrics.json").read_text())["distill"]
    assert report["steps"] == 4 and report["train_windows"] == 4 and report["held_out_windows"] == 2
    assert report["config"]["lr"] == 1e-3 and report["config"]["seed"] == 0 and "committed" not in report
    assert report["seconds"] > 0 and report["teacher_seconds"] > 0 and report["peak_memory_bytes"] > 0
    assert len(report["curve"]) == 4 and report["held_out_after"] <= report["held_out_before"]
    assert not (tmp_path / "distilled" / distill_stage.TENSORS_NAME).exists()


@pytest.mark.parametrize("kill", ["training", "rewriting"])
def test_an_interrupted_distillation_resumes_to_the_uninterrupted_checkpoint(two_layers, calibration_file, tmp_path,
                                                                             monkeypatch, kill):
    recipe = _recipe(two_layers, calibration_file, tmp_path / "resumed")
    with monkeypatch.context() as patch:
        if kill == "training":
            patch.setattr(distill_stage, "distill_model", _raise)
        else:
            commit = DistillStage._commit

            def first_segment_only(self, model, saved):      # the journal rewrites layer 0, then the process dies
                self.journal.commit(model, [0], self.journal.records([0]))
                raise KeyboardInterrupt
            patch.setattr(DistillStage, "_commit", first_segment_only)
            assert commit is not first_segment_only
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe)
    assert (tmp_path / "resumed.partial" / distill_stage.REPORT_NAME).exists() == (kill == "rewriting")
    run_recipe(recipe)
    run_recipe(_recipe(two_layers, calibration_file, tmp_path / "straight"))
    assert_same_tensors(tmp_path / "resumed", tmp_path / "straight")
    resumed, straight = (json.loads((tmp_path / name / "metrics.json").read_text())["distill"]
                         for name in ("resumed", "straight"))
    assert resumed["curve"] == straight["curve"] and resumed["kept_step"] == straight["kept_step"]


def _raise(*args, **kwargs):
    raise KeyboardInterrupt


def test_the_dry_run_shows_it_and_several_processes_are_refused(two_layers, calibration_file, tmp_path):
    result = run_recipe(_recipe(two_layers, calibration_file, tmp_path / "dry"), dry_run=True)
    line = next(source for source in result.data_sources if source.startswith("runtime.distill"))
    assert "AdamW lr 0.001" in line and "2 epoch(s) × 2 steps of 2 windows, 2 window(s) held out" in line
    assert "(forward KL, teacher" in line
    mixed = _recipe(two_layers, calibration_file, tmp_path / "mixed",
                    distill={**DISTILL, "divergence": "mixed", "reverse_weight": 0.25})
    line = next(s for s in run_recipe(mixed, dry_run=True).data_sources if s.startswith("runtime.distill"))
    assert "(0.75·forward + 0.25·reverse KL, teacher" in line
    with pytest.raises(LrcompressError, match="runtime.distill runs in one process; this run has 2"):
        DistillStage(DistillConfig(), None, None, torch.device("cpu"), world_size=2)


def test_windows_scale_distils_on_more_windows_of_the_same_sources(two_layers, calibration_file, tmp_path):
    recipe = _recipe(two_layers, calibration_file, tmp_path / "scaled",
                     distill={**DISTILL, "epochs": 1, "windows_scale": 2})
    line = next(s for s in run_recipe(recipe, dry_run=True).data_sources if s.startswith("runtime.distill"))
    assert "1 epoch(s) × 4 steps of 2 windows, 4 window(s) held out" in line
    report = json.loads((run_recipe(recipe).output_dir / "metrics.json").read_text())["distill"]
    assert (report["train_windows"], report["held_out_windows"], report["steps"]) == (8, 4, 4)


def test_a_run_killed_while_evaluating_reports_its_distillation_when_resumed(two_layers, calibration_file, tmp_path,
                                                                            monkeypatch):
    from lrcompress.runner import RecipeRun

    recipe = _recipe(two_layers, calibration_file, tmp_path / "resumed")
    with monkeypatch.context() as patch:
        patch.setattr(RecipeRun, "evaluate", _raise)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe)
    monkeypatch.setattr(distill_stage, "distill_model", _raise)      # nothing may be trained again
    report = json.loads((run_recipe(recipe).output_dir / "metrics.json").read_text())["distill"]
    assert report["steps"] == 4 and "committed" not in report
