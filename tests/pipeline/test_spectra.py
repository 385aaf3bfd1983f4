"""The spectra pre-pass: whitened singular values layer by layer, one layer's Grams alive at a time,
the same through the lazy layer store, and allocation runs end to end on tiny models."""
from __future__ import annotations

import json
import weakref

import pytest
import torch
from helpers import tiny_model
from tiny_runs import tiny_recipe, tiny_recipe_dict

from lrcompress.compressor import stats as stats_module
from lrcompress.errors import LrcompressError
from lrcompress.results import RunMetrics
from lrcompress.models import adapter_for, load_model
from lrcompress.models.lazy import LazyLayers, load_lazy
from lrcompress.pipeline import LayerWalk, PipelineSettings
from lrcompress.pipeline import spectra as spectra_module
from lrcompress.pipeline.spectra import collect_spectra
from lrcompress.recipe import parse_recipe
from lrcompress.runner import run_recipe

WINDOWS = torch.randint(3, 259, (5, 20), generator=torch.Generator().manual_seed(0))


def _targets(model) -> dict[int, list[str]]:
    names = [n for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    return {i: list(names) for i in range(len(model.model.layers))}


def test_spectra_are_the_whitened_singular_values_and_only_one_layers_grams_live(monkeypatch):
    model = tiny_model("llama").double()
    targets = _targets(model)
    alive, peak = weakref.WeakSet(), [0]

    def counted(*args, **kwargs):            # a factory, not a subclass: Statistic's subclasses are audited
        statistic = stats_module.GramStatistic(*args, **kwargs)
        alive.add(statistic)
        peak[0] = max(peak[0], len(alive))
        return statistic

    monkeypatch.setattr(spectra_module, "GramStatistic", counted)
    spectra, report = collect_spectra(LayerWalk(model, adapter_for(model), WINDOWS, PipelineSettings(batch_size=2)),
                                      targets, {})
    per_layer = len(targets[0])
    assert peak[0] <= per_layer                       # never more than one layer's Grams at once
    assert report["spectra_bytes"] == sum(s.nbytes for s in spectra.values())
    # Reference for one module: hook its inputs in a plain forward of the whole model.
    name = "model.layers.1.mlp.down_proj"
    module = model.get_submodule(name)
    inputs = []
    handle = module.register_forward_hook(lambda _m, args, _o: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    for batch in WINDOWS.split(2):
        model(input_ids=batch)
    handle.remove()
    x = torch.cat(inputs)
    gram = x.T @ x
    factor = torch.linalg.cholesky(gram + 1e-4 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype))
    expected = torch.linalg.svdvals(module.weight.detach() @ factor).square()
    torch.testing.assert_close(spectra[name].sigma2, expected, rtol=1e-8, atol=1e-10)
    assert spectra[name].sigma2.numel() == min(module.weight.shape)


def test_the_lazy_layer_store_gives_the_same_spectra(tiny_llama_dir):
    eager = load_model(str(tiny_llama_dir)).model
    lazy = load_lazy(str(tiny_llama_dir)).model
    settings = PipelineSettings(batch_size=2)
    targets = _targets(eager)
    expected, _ = collect_spectra(LayerWalk(eager, adapter_for(eager), WINDOWS, settings), targets, {})
    adapter = adapter_for(lazy)
    got, _ = collect_spectra(LayerWalk(lazy, adapter, WINDOWS, settings, store=LazyLayers(lazy, adapter, tiny_llama_dir)),
                             targets, {})
    for name, spectrum in expected.items():
        torch.testing.assert_close(got[name].sigma2, spectrum.sigma2)
    assert all(p.is_meta for p in adapter.decoder_layers(lazy).parameters())   # every layer released again


def _layer_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("layers-*.safetensors"))}


def test_uniform_allocation_is_todays_run_byte_for_byte(tiny_llama_dir, calibration_file, tmp_path):
    plain = run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "plain"))
    uniform = run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "uniform",
                                     stages=[{"method": "whiten", "ratio": 0.2, "allocation": "uniform"}]))
    assert _layer_files(tmp_path / "plain") == _layer_files(tmp_path / "uniform")
    assert [m.rank for m in plain.metrics.modules] == [m.rank for m in uniform.metrics.modules]
    assert uniform.metrics.allocation is None and "allocation" not in uniform.metrics.dump()


@pytest.mark.parametrize("method,strategy", [("whiten", "spectrum"), ("lord", "global"), ("svd", "spectrum"),
                                             ("cospadi", "global")])
def test_a_budget_run_spends_the_budget_and_dry_run_shows_the_ranks(tiny_llama_dir, calibration_file, tmp_path,
                                                                     method, strategy):
    stage = {"method": method, "ratio": 0.3, "allocation": {"strategy": strategy, "floor": 0.2}}
    if method == "cospadi":
        stage["iterations"] = 1
    planned = run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "dry", stages=[stage]),
                         dry_run=True)
    assert not (tmp_path / "dry").exists()
    chosen = {m.name: m.rank for m in planned.metrics.allocation.stages[0].modules}
    assert {p.name: p.rank for p in planned.plan if p.rank is not None} == (chosen if method != "cospadi" else {})
    result = run_recipe(tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "run", stages=[stage]))
    summary = result.metrics.allocation.stages[0]
    assert summary.allocated_params <= summary.budget_params
    assert summary.budget_params - summary.allocated_params < max(m.step_params for m in summary.modules)
    ranks = [m.rank for m in summary.modules]
    assert len(set(ranks)) > 1 or strategy == "spectrum"     # not the uniform answer in disguise
    if method != "cospadi":
        assert {m.name: m.rank for m in result.metrics.modules} == chosen
    else:
        assert {m.name: m.details["sparsity"] for m in result.metrics.modules} == chosen
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["allocation"]["stages"][0]["strategy"] == strategy
    assert RunMetrics.load(tmp_path / "run" / "metrics.json").allocation == result.metrics.allocation
    assert (tmp_path / "run" / "kept_rank.png").is_file()
    assert "## Budget allocation" in (tmp_path / "run" / "report.md").read_text()


def test_a_lazy_budget_run_allocates_as_the_eager_one(tiny_llama_dir, calibration_file, tmp_path):
    ranks = {}
    for lazy in (False, True):
        recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / f"lazy-{lazy}",
                                  stages=[{"method": "whiten", "ratio": 0.3, "allocation": "spectrum"}],
                                  runtime={"device": "cpu", "batch_size": 3, "lazy": lazy})
        metrics = run_recipe(parse_recipe(recipe)).metrics
        ranks[lazy] = [m.rank for m in metrics.allocation.stages[0].modules]
    assert ranks[True] == ranks[False]
    recipe = tiny_recipe_dict(tiny_llama_dir, calibration_file, tmp_path / "g",
                              stages=[{"method": "whiten", "ratio": 0.3, "allocation": "global"}],
                              runtime={"device": "cpu", "lazy": True})
    with pytest.raises(LrcompressError, match="output_gradient"):
        run_recipe(parse_recipe(recipe))


def test_a_method_without_a_knob_is_refused(tiny_llama_dir, calibration_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_dir, calibration_file, tmp_path / "o",
                         stages=[{"method": "rtn", "bits": 4, "allocation": "spectrum"}])
    with pytest.raises(LrcompressError, match="needs a rank or sparsity knob"):
        run_recipe(recipe, dry_run=True)
