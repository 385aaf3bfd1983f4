"""Data-parallel calibration: job assignment, shards, results through bytes, a real gloo group, rank-0
writing, and a 2-process torchrun run against a 1-process run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from lrcompress.checkpoint.layout import weight_files
from lrcompress.compressor import GramStatistic, GroupMember, OriginalWeight, get_compressor
from lrcompress.errors import LrcompressError, NumericalError
from lrcompress.modules import CompensatedLinear, LowRankLinear, QuantizedLinear, SparseDictLinear
from lrcompress.pipeline import PipelineObserver
from lrcompress.pipeline.distributed import (Collective, CompressJob, TorchCollective, assign_jobs, shard_bounds)
from lrcompress.pipeline.transfer import JobFailure, JobOutcome, decode_outcomes, encode_outcomes
from helpers import correlated_inputs
from tiny_runs import tiny_recipe, tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[2]


def test_largest_job_first_to_the_least_loaded_rank():
    # costs 5, 3, 3, 1: 5 -> rank 0; 3 -> rank 1; 3 -> rank 1 (3 < 5); 1 -> rank 0 (5 < 6)
    assert assign_jobs([1, 5, 3, 3], 2) == [0, 0, 1, 1]
    assert assign_jobs([4, 4, 4], 2) == [0, 1, 0]          # ties: job order, then the lowest rank
    assert assign_jobs([7, 2, 9], 1) == [0, 0, 0]
    assert assign_jobs([], 3) == []


@pytest.mark.parametrize("count,world", [(6, 2), (7, 2), (5, 3), (3, 3)])
def test_shards_are_contiguous_and_cover_the_windows_in_order(count, world):
    windows = torch.arange(count)[:, None].repeat(1, 4)
    shards = [TorchCollective(rank, world, torch.device("cpu")).shard(windows) for rank in range(world)]
    assert torch.equal(torch.cat(shards), windows)
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    assert [shard_bounds(count, r, world)[1] for r in range(world)][-1] == count


def test_fewer_windows_than_processes_is_an_error():
    with pytest.raises(LrcompressError, match="num_samples"):
        TorchCollective(1, 4, torch.device("cpu")).shard(torch.zeros(3, 8, dtype=torch.long))


def _linear(seed: int, out_f: int = 12, in_f: int = 16) -> tuple[nn.Linear, GramStatistic]:
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=True)
    x = correlated_inputs(200, in_f, seed=seed).float()
    gram = GramStatistic(in_f)
    gram.observe(x, None)
    return linear, gram


def _compressor(method: str, **options):
    cls = get_compressor(method)
    return cls(cls.Config(**options))


def _outcomes() -> dict[int, JobOutcome]:
    """Real replacements of every kind: low-rank, quantized, a CoSpaDi pair sharing one dictionary,
    and an EoRA-compensated quantized module (nested modules)."""
    linears = [_linear(seed) for seed in range(3)]
    members = [GroupMember(f"m{i}", lin, {"gram": gram}) for i, (lin, gram) in enumerate(linears)]
    low_rank = _compressor("whiten", rank=4).compress_group(members[:1])
    quantized = _compressor("rtn", bits=4, group_size=8).compress_group(members[1:2])
    shared = _compressor("cospadi", ratio=0.3, group_size=2, iterations=2).compress_group(members[:2])
    base = quantized[0].module
    stats = {"gram": linears[1][1], "original_weight": OriginalWeight(linears[1][0].weight.detach())}
    compensated = [_compressor("eora", rank=3).compress("m1", base, stats)]
    factors = _compressor("gptq", bits=4, group_size=8, apply_to="factors")          # quantized factors (issue 27)
    packed_pair = [factors.compress("m0", low_rank[0].module, {"gram": linears[0][1]})]
    packed_values = [_compressor("rtn", bits=4, group_size=8, apply_to="factors").compress(f"m{i}", r.module, {})
                     for i, r in enumerate(shared)]
    return {0: JobOutcome(low_rank, 0.5), 2: JobOutcome(quantized, 0.25), 3: JobOutcome(shared, 1.5),
            5: JobOutcome(compensated, 0.125), 6: JobOutcome(packed_pair, 0.5), 7: JobOutcome(packed_values, 0.5)}


def test_compressed_modules_survive_the_trip_through_bytes():
    sent = _outcomes()
    received = decode_outcomes(encode_outcomes(sent))
    assert sorted(received) == sorted(sent)
    kinds = {0: LowRankLinear, 2: QuantizedLinear, 3: SparseDictLinear, 5: CompensatedLinear, 6: LowRankLinear,
             7: SparseDictLinear}
    x = torch.randn(5, 16)
    for index, outcome in sent.items():
        got = received[index]
        assert isinstance(got, JobOutcome) and got.seconds == outcome.seconds
        for original, copy in zip(outcome.results, got.results):
            assert type(copy.module) is kinds[index]
            assert copy.module.spec() == original.module.spec()
            assert (copy.rank, copy.numerical_path) == (original.rank, original.numerical_path)
            assert copy.details == json.loads(json.dumps(original.details))
            ours, theirs = original.module.state_dict(), copy.module.state_dict()
            assert ours.keys() == theirs.keys()
            for key in ours:
                assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
            torch.testing.assert_close(copy.module(x), original.module(x), rtol=0, atol=0)
    for index in (3, 7):
        first, second = received[index].results
        assert first.module.dictionary is second.module.dictionary     # still one shared dictionary


def test_a_failure_keeps_its_error_type_across_processes():
    received = decode_outcomes(encode_outcomes({1: JobFailure("NumericalError", "m: NaN factors", 1)}))
    error = received[1].error()
    assert isinstance(error, NumericalError) and "rank 1" in str(error) and "m: NaN factors" in str(error)
    assert isinstance(JobFailure("ZeroDivisionError", "x", 0).error(), RuntimeError)


@pytest.fixture
def gloo_group():
    """A real one-process gloo group: the collectives run, with nothing to wait for."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield TorchCollective(0, 1, torch.device("cpu"))
    dist.destroy_process_group()


def test_the_torch_collective_hands_back_what_came_through_the_wire(gloo_group):
    linear, gram = _linear(0)
    member = GroupMember("m", linear, {"gram": gram})
    module_holder = []

    def run():
        module_holder.extend(_compressor("whiten", rank=4).compress_group([member]))
        return module_holder
    outcomes = gloo_group.run_jobs([CompressJob(10, run), CompressJob(20, run)])
    assert len(outcomes) == 2
    assert all(o.results[0].module is not module_holder[0].module for o in outcomes)   # decoded copies
    torch.testing.assert_close(outcomes[0].results[0].module.up.weight, module_holder[0].module.up.weight)
    reduced = gloo_group.reduce_statistics({"m/gram": gram})
    assert reduced["m/gram"] is not gram and torch.equal(reduced["m/gram"].sum_xx, gram.sum_xx)


def test_a_job_error_is_raised_by_the_torch_collective(gloo_group):
    def fail():
        raise NumericalError("model.layers.0.mlp.up_proj: NaN")
    with pytest.raises(NumericalError, match="up_proj"):
        gloo_group.run_jobs([CompressJob(1, fail)])


class _SecondRank(Collective):
    """Rank 1 of 2 in every respect but the collectives (all data stays local)."""

    rank = 1
    world_size = 2


def test_only_rank_zero_writes_and_evaluates(tiny_llama_dir, calibration_file, tmp_path):
    from lrcompress.runner import _run_recipe, build_stages

    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_llama_dir, calibration_file, out)
    result = _run_recipe(recipe, PipelineObserver(), None, _SecondRank(), build_stages(recipe), [])
    assert not out.exists() and result.output_dir is None
    assert result.metrics.dump()["eval"] == {"perplexity": {}} and "eval" not in result.metrics.dump()["timing"]
    assert len(result.metrics.dump()["modules"]) == 14              # the records exist on every rank
    assert not list(tmp_path.iterdir())


def _recipe_file(tmp: Path, model_dir: Path, text: Path, name: str) -> Path:
    """Fisher-weighted SVD on attention (its gradient pre-pass is reduced across ranks too) and whitened
    SVD on the MLP. Both are continuous in their statistics, so the two runs agree to rounding. (A
    method with discrete choices, such as CoSpaDi's OMP supports, can flip a choice on a last-bit change
    of the Gram, as it does for another batch size; the bytes round trip above covers its modules.)
    The MLP stage spends one budget (allocation: global): its spectra and output-gradient pre-passes
    are reduced across ranks too, and both runs must choose the same ranks."""
    stages = [{"method": "fwsvd", "ratio": 0.3, "targets": ["*self_attn*"]},
              {"method": "whiten", "ratio": 0.3, "targets": ["*mlp*"], "allocation": "global"}]
    recipe = tiny_recipe_dict(model_dir, text, tmp / name, stages=stages)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _all_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whatever its shards (per-segment files + the outer tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(checkpoint):
        tensors.update(load_file(file))
    return tensors


def test_two_processes_write_the_checkpoint_of_one(tiny_llama_dir, calibration_file, tmp_path):
    from click.testing import CliRunner

    from lrcompress.cli.main import cli

    single = CliRunner().invoke(cli, ["run", str(_recipe_file(tmp_path, tiny_llama_dir, calibration_file, "one"))])
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lrcompress", "run", str(_recipe_file(tmp_path, tiny_llama_dir, calibration_file, "two"))]
    double = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert double.returncode == 0, double.stdout + double.stderr
    assert double.stdout.count("lrcompress summary") == 1          # rank 1 stays silent

    one, two = (_all_tensors(tmp_path / name) for name in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:
        assert one[key].dtype == two[key].dtype
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    config = [json.loads((tmp_path / n / "config.json").read_text())["quantization_config"] for n in ("one", "two")]
    assert config[0]["modules"] == config[1]["modules"] and config[0]["tied"] == config[1]["tied"]
    assert config[1]["provenance"]["processes"] == 2

    metrics = [json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two")]
    for a, b in zip(metrics[0]["modules"], metrics[1]["modules"], strict=True):
        assert {k: v for k, v in a.items() if k not in ("seconds", "relative_error", "details")} == \
               {k: v for k, v in b.items() if k not in ("seconds", "relative_error", "details")}
        assert b["relative_error"] == pytest.approx(a["relative_error"], rel=1e-6, abs=1e-9)
    assert metrics[0]["prepass"]["fisher"]["targets"] == metrics[1]["prepass"]["fisher"]["targets"]
    chosen = [[m["rank"] for m in run["allocation"]["stages"][0]["modules"]] for run in metrics]
    assert chosen[0] == chosen[1] and len(set(chosen[0])) > 1
    ppl = [next(iter(m["eval"]["perplexity"].values()))["value"] for m in metrics]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-5)
