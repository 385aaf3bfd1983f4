"""Resume: a run killed mid-way (SIGKILL, or an exception) continues from its last finished segment and
writes exactly the uninterrupted run's checkpoint; a changed recipe refuses to resume and says why."""
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import save_tiny
from lrcompress.errors import CheckpointError
from lrcompress.pipeline import PipelineObserver
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe
from models.test_lazy import assert_same_tensors, checkpoint_tensors
from tiny_runs import tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[2]
MODULES_PER_LAYER = 7

KILLER = """
import json, os, signal, sys
import lrcompress.checkpoint.staging as staging
from lrcompress.pipeline import PipelineObserver
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

class KillAt(PipelineObserver):
    # SIGKILL after N compressed modules ("module:N") or when a phase starts ("phase:<text>").
    def __init__(self, where):
        kind, _, value = where.partition(":")
        self.left = int(value) if kind == "module" else None
        self.phase_text = value if kind == "phase" else None

    def module_done(self, record):
        if self.left is not None:
            self.left -= 1
            if self.left == 0:
                die()

    def phase(self, description):
        if self.phase_text and self.phase_text in description:
            die()

where = sys.argv[2]
if where == "final-write":   # in the middle of the checkpoint's completion: outer tensors written, index not
    staging.write_index = die
run_recipe(parse_recipe(json.loads(open(sys.argv[1]).read())), KillAt(where))
"""


def run_killed(recipe: dict, where: str, tmp_path: Path) -> None:
    """Run ``recipe`` in a subprocess that SIGKILLs itself at ``where`` (see KILLER)."""
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(recipe_file), where], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


class Interrupt(PipelineObserver):
    """Raise after ``modules`` compressed modules (an in-process stand-in for a crash)."""

    def __init__(self, modules: int) -> None:
        self.left = modules

    def module_done(self, record) -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt


pytestmark = pytest.mark.usefixtures("no_report")


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("six"), "llama", num_hidden_layers=6)


def without_time(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "seconds"}


def state_segments(out: Path) -> list[list[int]]:
    return json.loads((out.with_name(out.name + ".partial") / "state.json").read_text())["segments"]


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_checkpoint(six_layers, calibration_file, tmp_path):
    recipe = tiny_recipe_dict(six_layers, calibration_file, tmp_path / "resumed")
    run_killed(recipe, f"module:{3 * MODULES_PER_LAYER + 2}", tmp_path)   # in layer 3: layers 0-2 are finished
    assert state_segments(tmp_path / "resumed") == [[0], [1], [2]]
    assert not (tmp_path / "resumed").exists()

    replayed = []

    class Watch(PipelineObserver):
        def phase(self, description: str) -> None:
            replayed.append(description)

    run_recipe(parse_recipe(recipe), Watch())
    assert sum("finished in an earlier run" in line for line in replayed) == 3
    run_recipe(parse_recipe({**recipe, "output": {"dir": str(tmp_path / "straight")}}))
    resumed, straight = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("resumed", "straight"))
    assert_same_tensors(tmp_path / "resumed", tmp_path / "straight")
    assert file_digests(tmp_path / "resumed") == file_digests(tmp_path / "straight")
    assert [without_time(m) for m in resumed["modules"]] == [without_time(m) for m in straight["modules"]]
    assert [p["value"] for p in resumed["eval"]["perplexity"].values()] == \
        [p["value"] for p in straight["eval"]["perplexity"].values()]
    assert not (tmp_path / "resumed.partial").exists()


@pytest.mark.parametrize("case", ["non-sequential", "lazy", "cospadi-group", "lazy-target-original"])
def test_an_interrupted_run_resumes_exactly(case, six_layers, calibration_file, tmp_path):
    """``lazy-target-original``: output matching replays finished segments from their originals (read again
    from the shards) to carry the uncompressed stream forward."""
    extra: dict = {"runtime": {"device": "cpu", "batch_size": 3, "sequential": case != "non-sequential",
                               "lazy": case.startswith("lazy"),
                               "target": "original" if case.endswith("target-original") else "layer"}}
    per_segment = MODULES_PER_LAYER
    if case == "cospadi-group":  # one dictionary per projection shared by 2 layers: segments of 2 layers
        extra["stages"] = [{"method": "cospadi", "ratio": 0.3, "group_size": 2, "iterations": 1,
                            "targets": ["*.mlp.up_proj"]}]
        per_segment = 2
    recipe = tiny_recipe_dict(six_layers, calibration_file, tmp_path / "resumed", **extra)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(parse_recipe(recipe), Interrupt(per_segment + 1))
    assert len(state_segments(tmp_path / "resumed")) == 1
    run_recipe(parse_recipe(recipe))
    run_recipe(parse_recipe({**recipe, "output": {"dir": str(tmp_path / "straight")}}))
    assert_same_tensors(tmp_path / "resumed", tmp_path / "straight")
    if case == "cospadi-group":
        config = json.loads((tmp_path / "resumed" / "config.json").read_text())
        shared = [alias for alias in config["quantization_config"]["tied"] if alias.endswith("dictionary")]
        assert len(shared) == 3                       # 3 segments × up_proj, stored once each
        assert not set(shared) & set(checkpoint_tensors(tmp_path / "resumed"))


def test_a_changed_recipe_refuses_to_resume_and_names_the_field(six_layers, calibration_file, tmp_path):
    out = tmp_path / "out"
    recipe = tiny_recipe_dict(six_layers, calibration_file, out)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(parse_recipe(recipe), Interrupt(MODULES_PER_LAYER + 1))
    changed = tiny_recipe_dict(six_layers, calibration_file, out, ratio=0.3)
    with pytest.raises(CheckpointError, match=r"recipe\.stages\.0\.ratio: 0\.2 in the staged run, 0\.3 now") as error:
        run_recipe(parse_recipe(changed))
    assert "out.partial" in str(error.value) and "--overwrite" in str(error.value)
    fewer = tiny_recipe_dict(six_layers, calibration_file, out)
    fewer["calibration"]["num_samples"] = 4
    with pytest.raises(CheckpointError, match="calibration_windows_sha256") as error:
        run_recipe(parse_recipe(fewer))
    assert "recipe.calibration.num_samples: 6 in the staged run, 4 now" in str(error.value)
    assert state_segments(out) == [[0]]                 # refusing touched nothing
    changed["output"]["overwrite"] = True             # start over with the new recipe
    run_recipe(parse_recipe(changed))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["provenance"]["recipe_fingerprint"] == \
        parse_recipe(changed).fingerprint()


def test_a_staging_dir_without_state_is_refused(tiny_llama_dir, calibration_file, tmp_path):
    (tmp_path / "out.partial").mkdir()
    with pytest.raises(CheckpointError, match="it has no state.json"):
        run_recipe(parse_recipe(tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "out")))


@pytest.fixture(scope="module")
def straight_run(tiny_llama_dir, calibration_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "out"
    run_recipe(parse_recipe(tiny_recipe_dict(tiny_llama_dir, calibration_file, out)))
    return out


@pytest.mark.parametrize("where", ["final-write", "phase:perplexity on"])
def test_a_run_killed_while_writing_or_evaluating_resumes_to_the_same_bytes(where, tiny_llama_dir, calibration_file,
                                                                           straight_run, tmp_path):
    """Killed in the middle of the checkpoint's final write, or during evaluation: no complete-looking
    directory exists; the rerun finishes it (after evaluation: without compressing or replaying anything)
    and its files equal an uninterrupted run's byte for byte."""
    out = tmp_path / "out"
    recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, out)
    run_killed(recipe, where, tmp_path)
    assert not out.exists()
    staged = json.loads((tmp_path / "out.partial" / "state.json").read_text())
    assert staged["segments"] == [[0], [1]] and staged.get("written", False) == (where != "final-write")

    events = []

    class Watch(PipelineObserver):
        def phase(self, description: str) -> None:
            events.append(description)

        def module_done(self, record) -> None:
            events.append("compressed")

    run_recipe(parse_recipe(recipe), Watch())
    assert "compressed" not in events
    if where != "final-write":
        assert any("only the evaluation is left" in event for event in events)
        assert not any("replaying" in event for event in events)
    assert file_digests(out) == file_digests(straight_run)
    resumed, straight = (json.loads((d / "metrics.json").read_text()) for d in (out, straight_run))
    assert [without_time(m) for m in resumed["modules"]] == [without_time(m) for m in straight["modules"]]
    assert [without_time(p) for p in resumed["eval"]["perplexity"].values()] == \
        [without_time(p) for p in straight["eval"]["perplexity"].values()]
    assert resumed["compression"] == straight["compression"]
    assert not (tmp_path / "out.partial").exists() and not (out / "state.json").exists()


def test_a_changed_calibration_mixture_refuses_to_resume(six_layers, calibration_file, tmp_path):
    """The sources of a mixture are part of the run's fingerprint: another share of windows, or another
    source, does not continue a staged run."""
    second = tmp_path / "second.txt"
    second.write_text(" ".join(f"token{i % 37}" for i in range(3000)))
    out = tmp_path / "out"
    sources = [{"dataset": str(calibration_file), "num_samples": 4}, {"dataset": str(second), "num_samples": 2}]
    calibration = {"seq_len": 48, "seed": 0, "sources": sources}
    with pytest.raises(KeyboardInterrupt):
        run_recipe(parse_recipe(tiny_recipe_dict(six_layers, calibration_file, out, calibration=calibration)),
                   Interrupt(MODULES_PER_LAYER + 1))
    resized = {**calibration, "sources": [sources[0], {**sources[1], "num_samples": 3}]}
    with pytest.raises(CheckpointError, match=r"recipe\.calibration\.sources\.1\.num_samples: 2 in the staged run, "
                                              r"3 now"):
        run_recipe(parse_recipe(tiny_recipe_dict(six_layers, calibration_file, out, calibration=resized)))
    single = {"dataset": str(calibration_file), "num_samples": 6, "seq_len": 48, "seed": 0}
    with pytest.raises(CheckpointError, match="calibration_windows_sha256"):
        run_recipe(parse_recipe(tiny_recipe_dict(six_layers, calibration_file, out, calibration=single)))
    assert state_segments(out) == [[0]]
