"""Every bad input a user can fix: one message naming the file, key, module or path and what to do,
exit code 2, no traceback, and no complete-looking output directory afterwards.

One row per case (issue 17). Each row builds its inputs in ``tmp_path`` (a recipe for the tiny model,
a damaged copy of the model, a patched writer) and runs the CLI in-process. The README's claim "errors
a user can fix print one message and exit 2" is this table.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lrcompress.cli.main import cli
from tiny_runs import tiny_recipe_dict


@dataclass
class Case:
    """``prepare(ctx)`` builds the inputs and returns extra CLI arguments (after ``run RECIPE``)."""

    name: str
    prepare: Callable[["Context"], list[str]]
    fragment: str
    command: str = "run"           # "run" (the recipe), "eval" or "inspect" (the checkpoint ctx.model)
    recipe: dict = field(default_factory=dict)     # keys replacing the tiny recipe's
    absent: str | None = None      # text the whole output must not hold (a misleading word)


@dataclass
class Context:
    tmp: Path
    model: Path                     # the model the recipe names (a copy when a case damages it)
    text: Path
    monkeypatch: pytest.MonkeyPatch
    compressed: Path | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    recipe: Path | None = None      # a recipe file the case wrote itself (else the tiny recipe is written)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def copy_model(self) -> Path:
        copy = self.tmp / "model"
        shutil.copytree(self.model, copy)
        self.model = copy
        return copy


def _args(*items: str) -> Callable[[Context], list[str]]:
    return lambda ctx: list(items)


def _config_edit(change: Callable[[dict], None]) -> Callable[[Context], list[str]]:
    def prepare(ctx: Context) -> list[str]:
        path = ctx.copy_model() / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))
        return []
    return prepare


def _truncate(keep: Callable[[int], int]) -> Callable[[Context], list[str]]:
    def prepare(ctx: Context) -> list[str]:
        path = ctx.copy_model() / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[:keep(len(data))])
        return []
    return prepare


def _not_gguf(ctx: Context) -> list[str]:
    fake = ctx.tmp / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip file, not GGUF" * 10)
    ctx.model = fake
    return []


def _nan_weight(ctx: Context) -> list[str]:
    path = ctx.copy_model() / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return ["--set", "stages.0.method=svd"]


def _file_as_parent(ctx: Context) -> list[str]:
    (ctx.tmp / "afile").write_text("not a directory")
    return ["--output", str(ctx.tmp / "afile" / "out")]


def _read_only(ctx: Context) -> list[str]:
    """The output's filesystem refuses writes (EROFS): simulated, since root ignores permission bits."""
    import lrcompress.checkpoint.lock as lock

    real_open = lock.os.open

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(ctx.tmp / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    (ctx.tmp / "ro").mkdir()
    ctx.monkeypatch.setattr(lock.os, "open", refuse)
    return ["--output", str(ctx.tmp / "ro" / "out")]


def _disk_full(ctx: Context) -> list[str]:
    """The first block's safetensors write fails as safetensors reports ENOSPC."""
    import lrcompress.checkpoint.staging as staging
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    ctx.monkeypatch.setattr(staging, "save_file", full)
    return []


def _locked(ctx: Context) -> list[str]:
    from lrcompress.checkpoint.lock import OutputLock

    holder = OutputLock(ctx.out)
    holder.acquire()
    ctx.cleanups.append(holder.release)
    return []


def _existing_output(ctx: Context) -> list[str]:
    ctx.out.mkdir()
    (ctx.out / "keep.txt").write_text("precious")
    return []


def _missing_task_files(ctx: Context) -> list[str]:
    (ctx.tmp / "empty-data").mkdir()
    return ["--set", "eval.lm_eval={tasks: [arc_easy], limit: 2}", "--data-dir", str(ctx.tmp / "empty-data")]


def _wrong_shape(ctx: Context) -> list[str]:
    directory = ctx.tmp / "compressed"
    shutil.copytree(ctx.compressed, directory)
    shard = next(p for p in sorted(directory.glob("layers-*.safetensors")))
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("q_proj.down.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, shard, metadata={"format": "pt"})
    ctx.model = directory
    return []


def _unknown_kind(ctx: Context) -> list[str]:
    directory = ctx.tmp / "compressed"
    shutil.copytree(ctx.compressed, directory)
    config = json.loads((directory / "config.json").read_text())
    first = next(iter(config["quantization_config"]["modules"]))
    config["quantization_config"]["modules"][first]["kind"] = "pickled_surprise"
    (directory / "config.json").write_text(json.dumps(config))
    ctx.model = directory
    return []


def _recipe_file(content: bytes) -> Callable[[Context], list[str]]:
    def prepare(ctx: Context) -> list[str]:
        ctx.recipe = ctx.tmp / "recipe.yaml"
        ctx.recipe.write_bytes(content)
        return []
    return prepare


def _recipe_directory(ctx: Context) -> list[str]:
    ctx.recipe = ctx.tmp / "recipes"
    ctx.recipe.mkdir()
    return []


def _no_launch(ctx: Context) -> list[str]:
    """torchrun must not start (it would replace the test process: os.execv)."""
    def launched(*args):
        raise AssertionError(f"torchrun was launched: {args}")

    ctx.monkeypatch.setattr(os, "execv", launched)
    return ["--nproc", "8"]


def _calibration_text(text: str, name: str) -> Callable[[Context], list[str]]:
    def prepare(ctx: Context) -> list[str]:
        path = ctx.tmp / name
        path.write_text(text)
        return ["--set", f"calibration.dataset={path}"]
    return prepare


def _damaged_header(ctx: Context) -> list[str]:
    """Valid JSON, but ``__metadata__`` renamed: an entry that is no tensor (safetensors' own loader fails)."""
    directory = ctx.tmp / "compressed"
    shutil.copytree(ctx.compressed, directory)
    shard = next(p for p in sorted(directory.glob("layers-*.safetensors")))
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b'"__metadata__"', b'"__metadataX_"', 1))
    ctx.model = directory
    return []


CASES = [
    Case("bad regex", _args("--set", 'stages.0.targets=["re:["]'), "not a valid regular expression"),
    Case("unknown model_type", _config_edit(lambda c: c.update(model_type="foobar")), "model_type 'foobar' is not"),
    Case("unrecognised config.json", _config_edit(lambda c: c.pop("model_type")), "config.json has no model_type"),
    Case("config and weights disagree", _config_edit(lambda c: c.update(intermediate_size=128)),
         "the model built from config.json expects"),
    Case("not a GGUF file", _not_gguf, "is not a GGUF file"),
    Case("truncated safetensors data", _truncate(lambda n: n - 100), "truncated safetensors file"),
    Case("truncated safetensors header", _truncate(lambda n: 20), "truncated safetensors file"),
    Case("NaN weight with svd", _nan_weight, "model.layers.0.mlp.up_proj: its weight holds 1 NaN/Inf"),
    Case("malformed --set YAML", _args("--set", "stages=[0.3"), "is not valid YAML"),
    Case("--set into a scalar", _args("--set", "model.path.x=1"), "model.path is a str, not a section"),
    Case("read-only output filesystem", _read_only, "Read-only file system"),
    Case("output parent is a file", _file_as_parent, "is a file, not a directory"),
    Case("disk full while writing", _disk_full, "No space left on device"),
    Case("targets match nothing", _args("--set", 'stages.0.targets=["*.no_such_proj"]'), "match no module"),
    Case("ignore excludes every target", _args("--set", 'stages.0.ignore=["*"]'), "excludes every module"),
    Case("no stages", _args("--set", "stages=[]"), "the recipe has no stages"),
    Case("ratio 0 does not shrink", _args("--set", "stages.0.ratio=0"), "would not shrink"),
    Case("rank above break-even", _args("--set", "stages.0={method: whiten, rank: 40}"), "would not shrink"),
    Case("dry run of a plan that grows", _args("--dry-run", "--set", "stages.0={method: svd, rank: 40}"),
         "stages.0.allow_growth: true"),
    Case("seq_len above max_position_embeddings", _args("--set", "calibration.seq_len=300"),
         "above the model's max_position_embeddings 256"),
    Case("evaluating on the calibration text", _args("--set", "eval.allow_calibration_split=false"),
         "evaluates on the text calibration reads"),
    Case("unknown evaluation dataset", _args("--set", "eval.perplexity.0.dataset=no_such_set"),
         "eval.perplexity.0.dataset 'no_such_set'"),
    Case("lm-eval task files missing", _missing_task_files, "eval.lm_eval.tasks: task arc_easy"),
    Case("output exists", _existing_output, "--overwrite"),
    Case("output locked by another run", _locked, "is being written by another run: pid"),
    Case("checkpoint tensor of the wrong shape", _wrong_shape, "the model built from config.json expects",
         command="eval"),
    Case("checkpoint names an unknown module kind", _unknown_kind, "unknown compressed kind 'pickled_surprise'",
         command="eval"),
    # issue 28, item 4: inputs that escaped the one-message rule
    Case("recipe not UTF-8", _recipe_file(b"model:\n  path: \xff\xfe\n"), "recipe.yaml:2: not UTF-8 text"),
    Case("--nproc above num_samples", _no_launch, "--nproc 8: calibration.num_samples (6) is smaller"),
    Case("inspect: tensor of the wrong shape", _wrong_shape, "the model built from config.json expects",
         command="inspect"),
    Case("inspect: damaged safetensors header", _damaged_header, "damaged safetensors header", command="inspect"),
    Case("eval: damaged safetensors header", _damaged_header, "damaged safetensors header", command="eval"),
    # issue 28, item 5: messages that misled
    Case("recipe output is a list", _args("--output", "elsewhere"),
         "recipe.yaml: output is a list of 1, not a section, so output.dir cannot be set",
         recipe={"output": ["dir"]}, absent="--set"),
    Case("recipe is a directory", _recipe_directory, "recipes is a directory, not a file", absent="not found"),
    Case("recipe not valid YAML", _recipe_file(b"model: {path: m}\nstages: [\n  - a\n b: c\n"),
         "recipe.yaml:3:3: not valid YAML", absent="unicode string"),
    Case("rank above min(m, n)", _args("--set", "stages.0={method: svd, rank: 1000}"), "rank 1000 (capped at 64)"),
    Case("calibration file too short", _calibration_text("the model compresses", "short.txt"),
         "short.txt has 20 tokens; 6 windows of calibration.seq_len 48 need at least 49",
         absent="short.txt/validation"),
    Case("calibration file empty", _calibration_text("", "empty.txt"), "empty.txt is empty"),
    # issue 27: quantized factors need a factored module
    Case("apply_to: factors on a plain Linear", _args("--set", "stages.0={method: gptq, apply_to: factors}"),
         "model.layers.0.self_attn.q_proj: gptq with apply_to: factors quantizes the factors of a low-rank"),
]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_llama_dir, calibration_file) -> Path:
    """A small compressed checkpoint (svd on the attention projections)."""
    from lrcompress.recipe import parse_recipe
    from lrcompress.runner import run_recipe

    out = tmp_path_factory.mktemp("compressed") / "ckpt"
    recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, out, method="svd", ratio=0.5)
    recipe["stages"][0]["targets"] = ["*.self_attn.q_proj", "*.self_attn.k_proj"]
    recipe["eval"]["perplexity"] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lrcompress.runner.write_report", lambda *args, **kwargs: None)
        run_recipe(parse_recipe(recipe))
    return out


def invoke(case: Case, ctx: Context, extra: list[str], debug: bool = False):
    prefix = ["--debug"] if debug else []
    if case.command == "eval":
        args = ["eval", str(ctx.model), "--dataset", str(ctx.text), "--seq-len", "32", "--max-windows", "1"]
        return CliRunner().invoke(cli, prefix + args + extra)
    if case.command == "inspect":
        return CliRunner().invoke(cli, prefix + ["inspect", str(ctx.model)] + extra)
    path = ctx.recipe
    if path is None:
        path = ctx.tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump({**tiny_recipe_dict(ctx.model, ctx.text, ctx.out), **case.recipe}))
    return CliRunner().invoke(cli, prefix + ["run", str(path)] + extra)


def looks_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() or (directory / "metrics.json").is_file()


@pytest.mark.usefixtures("no_report")
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_message_and_exit_2(case, tiny_llama_dir, calibration_file, compressed, tmp_path,
                                             monkeypatch):
    ctx = Context(tmp_path, tiny_llama_dir, calibration_file, monkeypatch, compressed)
    extra = case.prepare(ctx)
    try:
        result = invoke(case, ctx, extra)
    finally:
        for cleanup in ctx.cleanups:
            cleanup()
    stderr = result.stderr
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "error:" in stderr, result.output
    message = stderr[stderr.index("error:"):]
    assert case.fragment in " ".join(message.split()), message
    assert case.absent is None or case.absent not in result.output, result.output
    assert len(message.strip().splitlines()) <= 3, message     # one message (a recipe error: file + key lines)
    for directory in [ctx.out, *tmp_path.glob("**/out")]:
        assert not looks_complete(directory), f"{directory} looks like a finished run"
    assert not list(tmp_path.glob("**/*.lock")), "the output lock was not released"
    for staging in tmp_path.glob("**/*.partial"):     # kept only when it holds work a rerun resumes
        assert json.loads((staging / "state.json").read_text())["segments"], f"{staging} holds nothing to resume"


def test_debug_shows_the_traceback(tiny_llama_dir, calibration_file, tmp_path, monkeypatch):
    ctx = Context(tmp_path, tiny_llama_dir, calibration_file, monkeypatch)
    case = Case("no stages", _args("--set", "stages=[]"), "no stages")
    assert "Traceback" in invoke(case, ctx, case.prepare(ctx), debug=True).stderr
    monkeypatch.setenv("LRCOMPRESS_DEBUG", "1")
    result = invoke(case, ctx, case.prepare(ctx))
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_a_batch_larger_than_the_calibration_set_is_pointed_out(tiny_llama_dir, calibration_file, tmp_path,
                                                                monkeypatch):
    ctx = Context(tmp_path, tiny_llama_dir, calibration_file, monkeypatch)
    case = Case("big batch", _args("--dry-run", "--set", "runtime.batch_size=64"), "")
    result = invoke(case, ctx, case.prepare(ctx))
    assert result.exit_code == 0, result.output
    assert "runtime.batch_size 64 is larger than calibration.num_samples 6" in " ".join(result.output.split())


def test_allow_growth_lets_the_plan_through_and_says_so(tiny_llama_dir, calibration_file, tmp_path, monkeypatch):
    ctx = Context(tmp_path, tiny_llama_dir, calibration_file, monkeypatch)
    case = Case("allowed", _args("--dry-run", "--set", "stages.0={method: svd, rank: 40, allow_growth: true}"), "")
    result = invoke(case, ctx, case.prepare(ctx))
    assert result.exit_code == 0, result.output
    assert "does not shrink" in result.output and "would not shrink" in " ".join(result.output.split())


@pytest.mark.usefixtures("no_report")
def test_a_real_write_limit_is_one_message_and_the_same_command_finishes(tiny_llama_dir, calibration_file,
                                                                        tmp_path):
    """Not a patched writer: the kernel refuses the first block's file (RLIMIT_FSIZE; Python ignores
    SIGXFSZ, so the write fails with EFBIG as a full disk fails with ENOSPC). No segment was finished, so
    no staging directory is left. Then the limit is lifted and the same command finishes."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "out")))
    command = [sys.executable, "-m", "lrcompress", "run", str(recipe)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    limited = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                             preexec_fn=small_files)
    assert limited.returncode == 2, limited.stderr[-2000:]
    message = " ".join(limited.stderr[limited.stderr.index("error:"):].split())
    assert "File too large" in message and "rerun the same command" in message and "Traceback" not in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    finished = CliRunner().invoke(cli, ["run", str(recipe)])
    assert finished.exit_code == 0, finished.output
    assert (tmp_path / "out" / "metrics.json").is_file()


@pytest.mark.usefixtures("no_report")
def test_a_failed_run_keeps_its_staging_only_when_it_holds_finished_layers(tiny_llama_dir, calibration_file,
                                                                         tmp_path, monkeypatch):
    """A NaN in layer 1: layer 0's segment is finished, so ``out.partial`` stays for the same command to
    resume (a NaN in layer 0 leaves nothing: the "NaN weight with svd" case above)."""
    ctx = Context(tmp_path, tiny_llama_dir, calibration_file, monkeypatch)
    path = ctx.copy_model() / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    case = Case("NaN in layer 1", _args("--set", "stages.0.method=svd"), "model.layers.1.mlp.up_proj")
    result = invoke(case, ctx, case.prepare(ctx))
    assert result.exit_code == 2 and case.fragment in result.stderr, result.output
    assert json.loads((tmp_path / "out.partial" / "state.json").read_text())["segments"] == [[0]]


def _reset_hub_probe() -> None:
    """The probe's answer is cached per process: forget it (before and after the test that moves the hub)."""
    from lrcompress.core.hub import forget_probe

    forget_probe()


@pytest.mark.parametrize("key,hub_id", [("model.path", "nobody/no-such-model"),
                                        ("calibration.dataset", "nobody/no-such-data")])
def test_an_unreachable_hub_is_reported_at_once(key, hub_id, tiny_llama_dir, calibration_file, tmp_path, monkeypatch):
    """A hub id with no network: one probe, then offline mode, instead of ~25 s of retries and warnings.
    The hub is an endpoint that refuses connections (the tests otherwise run with HF_HUB_OFFLINE=1)."""
    import time

    import datasets
    from huggingface_hub import constants

    _reset_hub_probe()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    ctx = Context(tmp_path, tiny_llama_dir, calibration_file, monkeypatch)
    case = Case("hub id", _args("--set", f"{key}={hub_id}"), "")
    started = time.perf_counter()
    try:
        result = invoke(case, ctx, case.prepare(ctx))
    finally:
        _reset_hub_probe()
    elapsed = time.perf_counter() - started
    assert elapsed < 10 and "Retrying" not in result.output, f"{elapsed:.1f} s: {result.output}"   # was ~25 s
    assert result.exit_code == 2, result.output
    assert f"'{hub_id}'" in result.stderr and "not reachable" in result.stderr, result.output
