"""fwsvd: Fisher-weighted SVD, checked against independent float64 computations and through the pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_model
from torch import nn

from lrcompress.compressor import get_compressor
from lrcompress.compressor.fisher import FisherStatistic
from lrcompress.errors import LrcompressError, NumericalError
from lrcompress.modules import LowRankLinear


def _linear(out_features: int = 24, in_features: int = 40, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, dtype=torch.float64)
    with torch.no_grad():  # a decaying spectrum, so that truncation has a clear best subspace
        u, _, vh = torch.linalg.svd(torch.randn(out_features, in_features, dtype=torch.float64),
                                    full_matrices=False)
        linear.weight.copy_(u @ torch.diag(torch.logspace(0, -1.5, len(u.T), dtype=torch.float64)) @ vh)
    return linear


def _fisher(columns: torch.Tensor, rows: torch.Tensor | None = None) -> FisherStatistic:
    stat = FisherStatistic(len(rows) if rows is not None else 24, len(columns))
    stat.input_sums += columns
    if rows is not None:
        stat.output_sums += rows
    stat.count = 7
    return stat


def _compress(method: str, module: nn.Module, stats: dict, **options):
    compressor = get_compressor(method)(get_compressor(method).Config(**options))
    return compressor.compress("layers.0.proj", module, stats)


def _skewed_columns(n: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64) ** 6 * 1e-4    # a few columns dominate


def _weighted_tail(matrix: np.ndarray, rank: int) -> float:
    """Eckart–Young: the best rank-r error of ``matrix`` in Frobenius norm, from numpy's SVD."""
    s = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sqrt((s[rank:] ** 2).sum()))


def test_uniform_fisher_gives_exactly_the_svd_result() -> None:
    linear = _linear()
    fisher = _fisher(torch.full((40,), 3.7e-5, dtype=torch.float64))
    weighted = _compress("fwsvd", linear, {"fisher": fisher}, rank=6).module
    plain = _compress("svd", linear, {}, rank=6).module
    torch.testing.assert_close(weighted.up.weight, plain.up.weight, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(weighted.down.weight, plain.down.weight, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(weighted.up.bias, linear.bias, rtol=0, atol=0)


def test_fwsvd_is_the_best_rank_r_fit_in_the_fisher_weighted_norm() -> None:
    linear, columns, rank = _linear(), _skewed_columns(), 6
    result = _compress("fwsvd", linear, {"fisher": _fisher(columns)}, rank=rank)
    plain = _compress("svd", linear, {}, rank=rank).module
    w = linear.weight.detach().numpy()
    root = np.sqrt(columns.numpy())
    d = root + 1e-6 * root.mean()                                    # the documented ε floor
    approx = result.module.dense_weight().detach().numpy()
    weighted_error = np.linalg.norm((w - approx) * d)
    assert weighted_error == pytest.approx(_weighted_tail(w * d, rank), rel=1e-9)
    plain_weighted = np.linalg.norm((w - plain.dense_weight().detach().numpy()) * d)
    assert weighted_error < 0.9 * plain_weighted                    # weighting changes the answer
    assert result.details["weighted_error"] == pytest.approx(weighted_error / np.linalg.norm(w * d), rel=1e-9)
    assert isinstance(result.module, LowRankLinear) and result.rank == rank


def test_global_scale_of_the_fisher_cancels() -> None:
    linear, columns = _linear(), _skewed_columns()
    small = _compress("fwsvd", linear, {"fisher": _fisher(columns)}, ratio=0.5).module
    large = _compress("fwsvd", linear, {"fisher": _fisher(columns * 1e12)}, ratio=0.5).module
    torch.testing.assert_close(small.dense_weight(), large.dense_weight(), rtol=1e-10, atol=1e-12)


def test_two_sided_variant_fits_the_row_and_column_weighted_norm() -> None:
    linear, rank = _linear(), 5
    columns = _skewed_columns()
    rows = _skewed_columns(24, seed=2)
    fisher = _fisher(columns, rows)
    approx = _compress("fwsvd", linear, {"fisher": fisher}, rank=rank, two_sided=True).module
    one_sided = _compress("fwsvd", linear, {"fisher": fisher}, rank=rank).module
    w = linear.weight.detach().numpy()
    d_in, d_out = np.sqrt(columns.numpy()), np.sqrt(rows.numpy())
    d_in, d_out = d_in + 1e-6 * d_in.mean(), d_out + 1e-6 * d_out.mean()
    error = np.linalg.norm(d_out[:, None] * (w - approx.dense_weight().detach().numpy()) * d_in)
    assert error == pytest.approx(_weighted_tail(d_out[:, None] * w * d_in, rank), rel=1e-9)
    other = np.linalg.norm(d_out[:, None] * (w - one_sided.dense_weight().detach().numpy()) * d_in)
    assert error < other


def test_features_without_gradient_keep_finite_factors() -> None:
    linear, columns = _linear(), _skewed_columns()
    columns[[0, 5, 9]] = 0.0
    result = _compress("fwsvd", linear, {"fisher": _fisher(columns)}, rank=6)
    assert torch.isfinite(result.module.down.weight).all() and torch.isfinite(result.module.up.weight).all()
    assert "3 input" in result.numerical_path and result.details["zero_fisher_inputs"] == 3
    # the one-sided fit projects every column on the chosen subspace: zero-importance columns too
    w, approx = linear.weight.detach(), result.module.dense_weight().detach()
    assert torch.linalg.norm(approx[:, 0]) <= torch.linalg.norm(w[:, 0]) * (1 + 1e-9)


def test_no_gradient_at_all_falls_back_to_plain_svd(caplog) -> None:
    linear = _linear()
    result = _compress("fwsvd", linear, {"fisher": _fisher(torch.zeros(40, dtype=torch.float64))}, rank=4)
    plain = _compress("svd", linear, {}, rank=4).module
    torch.testing.assert_close(result.module.dense_weight(), plain.dense_weight(), rtol=1e-12, atol=1e-14)
    assert "no Fisher information" in caplog.text


def test_nan_fisher_is_reported_with_the_module_name() -> None:
    columns = _skewed_columns()
    columns[3] = float("nan")
    with pytest.raises(NumericalError, match="layers.0.proj"):
        _compress("fwsvd", _linear(), {"fisher": _fisher(columns)}, rank=4)


def test_config_validation() -> None:
    config = get_compressor("fwsvd").Config
    with pytest.raises(ValueError):
        config(ratio=0.2, epsilon=0.0)
    with pytest.raises(ValueError):
        config(ratio=0.2, two_sides=True)
    assert config(ratio=0.2).two_sided is False


# --- through the pipeline -------------------------------------------------------------------------

def test_combination_recipe_runs_the_fisher_pass_once(tiny_llama_dir, calibration_file, tmp_path,
                                                      monkeypatch) -> None:
    from tiny_runs import tiny_recipe

    from lrcompress import pipeline
    from lrcompress.runner import run_recipe

    calls: list[list[str]] = []
    original = pipeline.PREPASSES["fisher"]

    def counting(walk, targets):
        calls.append(list(targets))
        return original(walk, targets)

    monkeypatch.setitem(pipeline.PREPASSES, "fisher", counting)
    stages = [{"method": "fwsvd", "ratio": 0.3, "targets": ["*.mlp.*"]},
              {"method": "whiten", "ratio": 0.3, "targets": ["*.q_proj", "*.k_proj"]},
              {"method": "fwsvd", "ratio": 0.3, "targets": ["*.v_proj", "*.o_proj"], "two_sided": True}]
    recipe = tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "out", stages=stages,
                         output={"dir": str(tmp_path / "out"), "save": False})
    result = run_recipe(recipe)
    assert len(calls) == 1
    expected = {f"model.layers.{i}.{name}" for i in range(2) for name in
                ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.v_proj", "self_attn.o_proj")}
    assert set(calls[0]) == expected
    methods = {m["name"]: m["method"] for m in result.metrics.dump()["modules"]}
    assert len(methods) == 14 and {methods[name] for name in expected} == {"fwsvd"}
    assert all(m["details"]["fisher_windows"] == 6 for m in result.metrics.dump()["modules"] if m["method"] == "fwsvd")
    report = result.metrics.dump()["prepass"]["fisher"]
    assert report["windows"] == 6 and report["targets"] == 10 and report["peak_memory_bytes"] > 0


def test_module_without_gradient_gets_zero_fisher_and_finite_factors() -> None:
    from lrcompress.models import adapter_for
    from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage, run_prepasses

    model = tiny_model("llama")
    model.model.layers[0].mlp.unused = nn.Linear(64, 48)      # targeted by "*", never called
    compressor = get_compressor("fwsvd")(get_compressor("fwsvd").Config(ratio=0.4))
    stages = [Stage(0, compressor, ["*"])]
    windows = torch.randint(3, 259, (3, 16), generator=torch.Generator().manual_seed(0))
    settings = PipelineSettings(batch_size=2)
    adapter = adapter_for(model)
    pre = run_prepasses(LayerWalk(model, adapter, windows, settings), stages)
    unused = pre.statistics["model.layers.0.mlp.unused"]["fisher"]
    assert torch.count_nonzero(unused.input_sums) == 0 and torch.count_nonzero(unused.output_sums) == 0
    assert torch.count_nonzero(pre.statistics["model.layers.0.mlp.up_proj"]["fisher"].input_sums) == 64
    records = LayerwisePipeline(LayerWalk(model, adapter, windows, settings), stages, precomputed=pre.statistics).run()
    replaced = model.model.layers[0].mlp.unused
    assert isinstance(replaced, LowRankLinear) and torch.isfinite(replaced.dense_weight()).all()
    assert len(records) == 2 * 7 + 1


def test_engine_refuses_a_stage_whose_prepass_did_not_run() -> None:
    from lrcompress.models import adapter_for
    from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage

    model = tiny_model("llama")
    stage = Stage(0, get_compressor("fwsvd")(get_compressor("fwsvd").Config(ratio=0.4)), ["*.q_proj"])
    windows = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LrcompressError, match="fisher"):
        LayerwisePipeline(LayerWalk(model, adapter_for(model), windows, PipelineSettings(batch_size=2)), [stage]).run()
