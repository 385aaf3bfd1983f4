"""``runtime.refine`` through ``lrcompress run`` (runner + journal): a run interrupted after its first layer
resumes to exactly the uninterrupted run's checkpoint and records (the refined layer is what the journal
keeps), a changed refinement refuses to resume and names the key, metrics.json carries the per-layer
reports, and the dry run shows the option."""
import json

import pytest
import torch

from helpers import save_tiny
from lrcompress.errors import CheckpointError
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from models.test_lazy import assert_same_tensors, checkpoint_tensors
from pipeline.test_resume import Interrupt, file_digests, state_segments
from tiny_runs import tiny_recipe_dict

MODULES_PER_LAYER = 7
REFINE = {"epochs": 2, "lr": 1e-3, "holdout": 0.5}      # 2 batches of 3 windows: 1 trained on, 1 held out

pytestmark = pytest.mark.usefixtures("no_report")


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("three"), "llama", num_hidden_layers=3, hidden_size=32,
                     intermediate_size=64)


def _without_cost(record: dict) -> dict:
    """A module record without what the clock and the allocator decide."""
    refine = {k: v for k, v in record["details"]["refine"].items() if k not in ("seconds", "peak_memory_growth_bytes")}
    return {**{k: v for k, v in record.items() if k != "seconds"}, "details": {**record["details"], "refine": refine}}


def test_an_interrupted_refined_run_resumes_to_the_uninterrupted_checkpoint(three_layers, calibration_file, tmp_path):
    recipe = tiny_recipe_dict(three_layers, calibration_file, tmp_path / "resumed",
                              runtime={"device": "cpu", "batch_size": 3, "refine": REFINE})
    with pytest.raises(KeyboardInterrupt):
        run_recipe(parse_recipe(recipe), Interrupt(MODULES_PER_LAYER + 1))     # in layer 1: layer 0 is finished
    assert state_segments(tmp_path / "resumed") == [[0]]
    changed = {**recipe, "runtime": {**recipe["runtime"], "refine": {**REFINE, "epochs": 3}}}
    with pytest.raises(CheckpointError, match=r"runtime\.refine\.epochs: 2 in the staged run, 3 now"):
        run_recipe(parse_recipe(changed))
    run_recipe(parse_recipe(recipe))
    run_recipe(parse_recipe({**recipe, "output": {"dir": str(tmp_path / "straight")}}))
    assert_same_tensors(tmp_path / "resumed", tmp_path / "straight")
    assert file_digests(tmp_path / "resumed") == file_digests(tmp_path / "straight")
    resumed, straight = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("resumed", "straight"))
    assert [_without_cost(m) for m in resumed["modules"]] == [_without_cost(m) for m in straight["modules"]]
    summary = straight["refine"]
    assert summary["config"]["epochs"] == 2 and summary["refined_layers"] == 3
    assert [layer["index"] for layer in summary["layers"]] == [0, 1, 2]
    assert all(layer["steps"] == 2 and layer["holdout_before"] > 0 for layer in summary["layers"])
    assert resumed["refine"]["refined_layers"] == 3     # the replayed layer's report comes back from the journal
    unrefined = {**recipe, "runtime": {"device": "cpu", "batch_size": 3}, "output": {"dir": str(tmp_path / "plain")}}
    run_recipe(parse_recipe(unrefined))                 # what the checkpoint holds is the refined layer
    plain, refined = checkpoint_tensors(tmp_path / "plain"), checkpoint_tensors(tmp_path / "straight")
    changed = [name for name in refined if not torch.equal(refined[name], plain[name])]
    assert changed and all(name.endswith(("up.weight", "down.weight")) for name in changed)


def test_the_dry_run_shows_the_option(three_layers, calibration_file, tmp_path):
    recipe = tiny_recipe_dict(three_layers, calibration_file, tmp_path / "out",
                              runtime={"device": "cpu", "batch_size": 3, "refine": REFINE})
    lines = run_recipe(parse_recipe(recipe), dry_run=True).data_sources
    line = next(line for line in lines if line.startswith("runtime.refine"))
    assert "2 epochs × 1 steps of 3 windows, 1 batch(es) held out" in line and "lr 0.001" in line
    plain = tiny_recipe_dict(three_layers, calibration_file, tmp_path / "out")
    assert not any("refine" in line for line in run_recipe(parse_recipe(plain), dry_run=True).data_sources)
