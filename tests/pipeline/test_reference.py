"""Output matching (runtime.target: original): targets against brute-force least squares, and the engine on
tiny random models against the dense model."""
import logging

import pytest
import torch
from torch import nn

from lrcompress.compressor import GramStatistic, GroupMember, OriginalWeight, get_compressor
from lrcompress.compressor.stats import CrossGramStatistic
from lrcompress.errors import LrcompressError
from lrcompress.models import adapter_for
from lrcompress.models.capture import LayerCalls, LayerInputs
from lrcompress.modules import dense_weight
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage
from lrcompress.pipeline.reference import ReferenceStream
from helpers import correlated_inputs, tiny_model

WINDOWS = torch.randint(3, 259, (6, 32), generator=torch.Generator().manual_seed(0))


def _stage(method, index=0, targets=("*",), **options):
    cls = get_compressor(method)
    return Stage(index, cls(cls.Config(**options)), list(targets), [])


def _problem(rows=300, features=10, out=8, seed=0):
    """X (uncompressed inputs), X̂ (drifted by a nonlinearity and noise), a float64 Linear holding W and the
    statistics the pipeline would collect for it."""
    g = torch.Generator().manual_seed(seed)
    x = correlated_inputs(rows, features, seed=seed)
    scale = x.std(dim=0)
    x_hat = x + 0.3 * torch.tanh(x / scale @ torch.randn(features, features, generator=g, dtype=torch.float64)) * scale
    linear = nn.Linear(features, out, bias=False).double()
    gram, cross = GramStatistic(features), CrossGramStatistic(features)
    gram.observe(x_hat, None)
    cross.observe_pair(x_hat, x)
    return x, x_hat, linear, {"gram": gram, "cross_gram": cross}


def _best_rank_r(x_hat, y, rank):
    """Brute force, independent of any whitening: argmin over rank-r M of ‖X̂Mᵀ − Y‖. With X̂ = QR,
    ‖X̂Mᵀ − Y‖² = ‖RMᵀ − QᵀY‖² + ‖(I − QQᵀ)Y‖², so RMᵀ is the Eckart–Young truncation of QᵀY."""
    q, r = torch.linalg.qr(x_hat)
    u, s, vh = torch.linalg.svd(q.T @ y, full_matrices=False)
    return torch.linalg.solve_triangular(r, (u[:, :rank] * s[:rank]) @ vh[:rank], upper=True).T


def _targeted(stage, members, originals, damping=0.0):
    stream = ReferenceStream(LayerInputs(0, [], LayerCalls()), PipelineSettings(target="original", target_damping=damping), None)
    return stream.target_members(stage, members, originals)


@pytest.mark.parametrize("method, options", [("whiten", {"damping": 0.0}), ("lord", {})])
def test_low_rank_with_the_target_is_the_best_rank_r_fit_of_the_original_outputs(method, options):
    x, x_hat, linear, stats = _problem()
    stage = _stage(method, rank=3, **options)
    member, = _targeted(stage, [GroupMember("m", linear, stats)], [linear])
    assert member.module is not linear                       # a stand-in holding W*
    approx = dense_weight(stage.compressor.compress("m", member.module, member.stats).module).detach()
    w = linear.weight.detach()
    best = _best_rank_r(x_hat, x @ w.T, 3)
    torch.testing.assert_close(approx, best, rtol=1e-6, atol=1e-8)
    plain = dense_weight(stage.compressor.compress("m", linear, stats).module).detach()
    objective = lambda a: float((x_hat @ a.T - x @ w.T).norm())  # noqa: E731
    assert objective(approx) < objective(plain)


@pytest.mark.parametrize("blend", [0.0, 0.25, 0.5])
def test_a_blended_target_is_the_best_rank_r_fit_of_the_blended_outputs(blend):
    """target_blend α: whiten fits (1 − α)·X̂Wᵀ + α·XWᵀ (brute force); α = 0 is the layer-wise fit."""
    x, x_hat, linear, stats = _problem(seed=3)
    stage = _stage("whiten", rank=3, damping=0.0)
    stream = ReferenceStream(LayerInputs(0, [], LayerCalls()),
                             PipelineSettings(target="original", target_damping=0.0, target_blend=blend), None)
    member, = stream.target_members(stage, [GroupMember("m", linear, stats)], [linear])
    approx = dense_weight(stage.compressor.compress("m", member.module, member.stats).module).detach()
    w = linear.weight.detach()
    best = _best_rank_r(x_hat, (1 - blend) * x_hat @ w.T + blend * x @ w.T, 3)
    torch.testing.assert_close(approx, best, rtol=1e-6, atol=1e-8)
    target, _ = stream.targets["m"]                # the record's floor stays that of the full W*
    torch.testing.assert_close(target, torch.linalg.lstsq(x_hat, x @ w.T).solution.T, rtol=1e-7, atol=1e-9)


def test_gptq_with_the_target_quantizes_w_star_in_the_metric_of_the_compressed_inputs():
    """GPTAQ's objective: at 8 bits the result is W* up to rounding, and at 3 bits the matched objective is
    lower than GPTQ's on W."""
    x, x_hat, linear, stats = _problem(rows=400, features=16, out=12, seed=2)
    w = linear.weight.detach()
    objective = lambda a: float((x_hat @ a.T - x @ w.T).norm())  # noqa: E731
    for bits in (8, 3):
        stage = _stage("gptq", bits=bits, group_size=None, damping=0.01)
        member, = _targeted(stage, [GroupMember("m", linear, stats)], [linear], damping=0.01)
        approx = dense_weight(stage.compressor.compress("m", member.module, member.stats).module).detach()
        target = member.module.weight.detach()
        if bits == 8:
            assert float((approx - target).norm() / target.norm()) < 0.01
        plain = dense_weight(stage.compressor.compress("m", linear, stats).module).detach()
        assert objective(approx) < objective(plain)


def test_eora_compensates_toward_the_target_not_the_original_weight():
    """After an earlier stage made W_c, eora's rank-r path minimises ‖X̂(W_c + BA)ᵀ − XWᵀ‖."""
    x, x_hat, linear, stats = _problem(seed=1)
    quantized = _stage("rtn", bits=3, group_size=None).compressor.compress("m", linear, {}).module.double()
    stats = {**stats, "original_weight": OriginalWeight(linear.weight.detach())}
    stage = _stage("eora", 1, rank=2)
    member, = _targeted(stage, [GroupMember("m", quantized, stats)], [linear])
    assert member.module is quantized                        # an earlier stage touched it: handed over as is
    approx = dense_weight(stage.compressor.compress("m", member.module, member.stats).module).detach()
    w_c = dense_weight(quantized).detach()
    best = w_c + _best_rank_r(x_hat, x @ linear.weight.detach().T - x_hat @ w_c.T, 2)
    torch.testing.assert_close(approx, best, rtol=1e-6, atol=1e-8)


def test_data_free_methods_are_left_alone(caplog):
    _, _, linear, stats = _problem()
    member = GroupMember("m", linear, stats)
    with caplog.at_level(logging.WARNING):
        assert _targeted(_stage("svd", rank=3), [member], [linear]) == [member]
    assert "leaves it alone" in caplog.text
    assert not _stage("eora", rank=2, space="weight").compressor.takes_target
    assert not _stage("rtn", bits=4).compressor.takes_target
    assert _stage("gptq", bits=4).compressor.takes_target and _stage("cospadi", ratio=0.2).compressor.takes_target


# ---------------------------------------------------------------- the engine on tiny random models

def _run(stages, target, model=None):
    model = model or tiny_model("llama")
    pipeline = LayerwisePipeline(LayerWalk(model, adapter_for(model), WINDOWS, PipelineSettings(batch_size=4, target=target)),
                                 stages)
    return model, pipeline.run(), pipeline


def _final_hidden(model):
    with torch.no_grad():
        return model(input_ids=WINDOWS, use_cache=False, output_hidden_states=True).hidden_states[-1]


def test_without_compression_the_matched_run_is_the_dense_model():
    dense = _final_hidden(tiny_model("llama"))
    model, records, pipeline = _run([_stage("whiten", rank=10_000)], "original")
    torch.testing.assert_close(_final_hidden(model), dense, rtol=1e-5, atol=1e-5)
    assert all(r.relative_error < 1e-5 and r.details["target"] == "original" for r in records)
    report = pipeline.stream.report()
    assert report.reference_forwards > 0 and report.layer_copy_bytes > 0


@pytest.mark.parametrize("method, options", [("whiten", {"ratio": 0.5}), ("lord", {"ratio": 0.5}),
                                             ("gptq", {"bits": 3, "group_size": 16})])
def test_matching_the_original_lowers_the_final_output_error(method, options):
    dense = _final_hidden(tiny_model("llama"))
    errors = {}
    for target in ("layer", "original"):
        model, _, _ = _run([_stage(method, **options)], target)
        errors[target] = float((_final_hidden(model) - dense).norm() / dense.norm())
    assert errors["original"] < errors["layer"]


def test_records_measure_the_error_against_the_original_outputs():
    """The first module of the last layer (its inputs in the finished model are the X̂ it was fitted on: a
    stage fits all modules of a layer from one pass): its output against the dense model's."""
    name = "model.layers.1.self_attn.q_proj"
    captured = {}

    def output_of(model):
        handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: captured.__setitem__("y", o))
        with torch.no_grad():
            model(input_ids=WINDOWS, use_cache=False)
        handle.remove()
        return captured["y"]

    expected_out = output_of(tiny_model("llama"))
    model, records, _ = _run([_stage("whiten", ratio=0.4)], "original")
    got = output_of(model)
    record = next(r for r in records if r.name == name)
    direct = float((got - expected_out).norm() / expected_out.norm())
    assert record.relative_error == pytest.approx(direct, rel=1e-4)
    assert record.details["target_error"] <= record.relative_error


def test_the_default_target_changes_nothing():
    model, records, pipeline = _run([_stage("whiten", ratio=0.4)], "layer")
    assert pipeline.stream.report() is None and all("target" not in r.details for r in records)


def test_chained_stages_get_the_target_and_an_ignoring_stage_still_records_against_the_original():
    model, records, _ = _run([_stage("rtn", 0, bits=3, group_size=16), _stage("eora", 1, rank=4)], "original")
    rtn = [r for r in records if r.method == "rtn"]
    eora = [r for r in records if r.method == "eora"]
    assert all(r.details["target"].startswith("layer") for r in rtn)
    assert all(r.details["target"] == "original" for r in eora)
    by_name = {r.name: r for r in rtn}
    assert sum(r.relative_error for r in eora) < sum(by_name[r.name].relative_error for r in eora)


@pytest.mark.parametrize("stages, settings, message", [
    ([("whiten", {"ratio": 0.2})], {"sequential": False}, "needs runtime.sequential"),
    ([("rtn", {"bits": 4}), ("svd", {"rank": 2})], {}, "changes nothing"),
    ([("whiten", {"ratio": 0.2})], {"target": "layer", "target_blend": 0.5}, "original only"),
])
def test_a_target_the_run_cannot_honour_is_refused(stages, settings, message):
    model = tiny_model("llama")
    stages = [_stage(method, i, **options) for i, (method, options) in enumerate(stages)]
    pipeline = LayerwisePipeline(LayerWalk(model, adapter_for(model), WINDOWS,
                                           PipelineSettings(**{"target": "original", **settings})), stages)
    with pytest.raises(LrcompressError, match=message):
        pipeline.run()
