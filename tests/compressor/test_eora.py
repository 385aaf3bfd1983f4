"""eora: the eigenspace residual against the whitened-SVD optimum, robustness to singular Grams,
quantized factors, and the two-stage flow through the pipeline (W reaches the stage)."""
import pytest
import torch
from torch import nn

from lrcompress.compressor import OriginalWeight, get_compressor
from lrcompress.compressor.eora import eigenspace_factors
from lrcompress.errors import LrcompressError
from lrcompress.models import adapter_for
from lrcompress.modules import CompensatedLinear, QuantizedLinear, dense_weight
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage
from helpers import compress_with, observed_linear, tiny_model

OUT, IN, RANK = 20, 28, 5


BASES = {"rtn": {"bits": 3, "group_size": 8}, "gptq": {"bits": 3, "group_size": 8},
         "prune": {"pattern": "2:4"}, "whiten": {"rank": 6}, "lord": {"rank": 6}}


def _compressed_layer(seed=0, method="rtn"):
    """A float64 layer, its Gram on positive-definite correlated inputs, and a compressed version."""
    x, linear, gram = observed_linear(500, OUT, IN, seed, bias=True)
    return x, linear, gram, compress_with(method, linear, {"gram": gram}, name="m", **BASES[method])


def _eora(base, linear, gram, **options):
    cls = get_compressor("eora")
    stats = {"gram": gram, "original_weight": OriginalWeight(linear.weight.detach())}
    return cls(cls.Config(**options)).compress("m", base, stats).module


def _output_error(x, weight, approx):
    return torch.linalg.norm(x @ (weight.double() - approx.double()).T).item()


def _whitened_optimum(x, delta, rank):
    """Independent optimum of ‖X(ΔW − M)ᵀ‖ over rank-r M: L = chol(XᵀX), M = [ΔW·L]_r · L⁻¹."""
    chol = torch.linalg.cholesky(x.T @ x)
    u, s, vh = torch.linalg.svd(delta @ chol)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(chol)
    return torch.linalg.norm(x @ (delta - best).T).item()


@pytest.mark.parametrize("seed,method", [(0, "rtn"), (1, "rtn"), (0, "gptq"), (0, "prune"), (0, "whiten"),
                                         (0, "lord")])
def test_eora_reaches_the_whitened_optimum_and_beats_the_plain_residual_svd(seed, method):
    x, linear, gram, base = _compressed_layer(seed, method)
    w = linear.weight.detach()
    delta = w - dense_weight(base).double()
    eora = _eora(base, linear, gram, rank=RANK)
    plain = _eora(base, linear, gram, rank=RANK, space="weight")
    assert isinstance(eora, CompensatedLinear) and eora.base is base and eora.rank == RANK
    err_eora = _output_error(x, w, dense_weight(eora))
    err_plain = _output_error(x, w, dense_weight(plain))
    err_none = _output_error(x, w, dense_weight(base))
    assert err_eora == pytest.approx(_whitened_optimum(x, delta, RANK), rel=1e-6)
    assert err_eora < err_plain < err_none
    # the plain baseline is the Eckart–Young optimum in weight space
    s = torch.linalg.svdvals(delta)
    assert torch.linalg.norm(w - dense_weight(plain).double()).item() == pytest.approx(
        s[RANK:].pow(2).sum().sqrt().item(), rel=1e-9)


def test_forward_is_base_plus_low_rank_path():
    x, linear, gram, base = _compressed_layer()
    module = _eora(base, linear, gram, rank=RANK)
    a, b = module.down.weight, module.up.weight
    assert a.shape == (RANK, IN) and b.shape == (OUT, RANK)
    torch.testing.assert_close(module(x), base(x) + (x @ a.T) @ b.T)


def test_singular_and_indefinite_grams_give_finite_factors_and_no_correction_there():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(IN, IN, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, -4, IN, dtype=torch.float64)
    evals[-6:-3] = 0.0
    evals[-3:] = -1e-3 * torch.arange(1, 4, dtype=torch.float64)   # negative: round-off gone wrong
    gram = q @ torch.diag(evals) @ q.T
    delta = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    up, down, clamped = eigenspace_factors(delta, gram, RANK)
    assert clamped == 6
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    assert down @ q[:, -6:] == pytest.approx(torch.zeros(RANK, 6, dtype=torch.float64), abs=1e-9)


def test_full_rank_compensation_restores_the_original_weight():
    _, linear, gram, base = _compressed_layer()
    for space in ("eigen", "weight"):
        module = _eora(base, linear, gram, rank=min(OUT, IN), space=space)
        torch.testing.assert_close(dense_weight(module).double(), linear.weight.detach(), rtol=0, atol=1e-8)


def test_quantized_factors():
    x, linear, gram, base = _compressed_layer()
    w = linear.weight.detach()
    floating = _eora(base, linear, gram, rank=RANK)
    quantized = _eora(base, linear, gram, rank=RANK, bits=4, group_size=8)
    assert isinstance(quantized.down, QuantizedLinear) and isinstance(quantized.up, QuantizedLinear)
    assert quantized.down.bits == 4 and quantized.up.group_size == RANK  # B's rows are only r long
    assert quantized.stored_params() == floating.stored_params()
    assert quantized.storage_bytes() < floating.storage_bytes()
    err_none = _output_error(x, w, dense_weight(base))
    err_float = _output_error(x, w, dense_weight(floating))
    err_quant = _output_error(x, w, dense_weight(quantized))
    assert err_float <= err_quant < err_none


def test_uncompressed_module_is_refused():
    _, linear, gram, _ = _compressed_layer()
    with pytest.raises(LrcompressError, match="no earlier stage"):
        _eora(linear, linear, gram, rank=RANK)


WINDOWS = torch.randint(3, 259, (6, 32), generator=torch.Generator().manual_seed(0))


def _stage(method, index, **options):
    cls = get_compressor(method)
    return Stage(index, cls(cls.Config(**options)), ["*"], [])


def test_pipeline_gives_the_compensation_stage_the_original_weight():
    """rtn then full-rank eora(weight space): every module must be restored to its original weight,
    which only works if the stage sees W and not the W_c it receives."""
    model = tiny_model("llama")
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and ".layers." in n}
    stages = [_stage("rtn", 0, bits=3, group_size=16), _stage("eora", 1, rank=64, space="weight")]
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), WINDOWS, PipelineSettings()), stages).run()
    assert len(records) == 2 * len(originals)
    for name, weight in originals.items():
        module = model.get_submodule(name)
        assert isinstance(module, CompensatedLinear) and isinstance(module.base, QuantizedLinear)
        torch.testing.assert_close(dense_weight(module), weight, rtol=0, atol=1e-5)
    by_stage = {(r.name, r.stage): r for r in records}
    for name in originals:
        rtn, eora = by_stage[(name, 0)], by_stage[(name, 1)]
        assert rtn.relative_error > 0.01 and eora.relative_error < 1e-5  # both measured against W
        assert eora.params_after == eora.params_before + min(64, rtn.in_features, rtn.out_features) * (
            rtn.in_features + rtn.out_features)
        assert rtn.bytes_after < rtn.bytes_before and eora.bytes_before == rtn.bytes_after


def test_pipeline_eora_after_rtn_lowers_every_module_error():
    model = tiny_model("llama")
    stages = [_stage("rtn", 0, bits=3, group_size=16), _stage("eora", 1, rank=8)]
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), WINDOWS, PipelineSettings()), stages).run()
    by_stage = {(r.name, r.stage): r for r in records}
    for (name, stage), record in by_stage.items():
        if stage == 1:
            assert record.relative_error < by_stage[(name, 0)].relative_error
            assert record.method == "eora" and record.rank == 8


def test_gptq_quantized_factors_beat_rtn_ones_and_the_plan_counts_their_bytes():
    """``quantizer: gptq`` quantizes A with the input Gram and B with A_q·G·A_qᵀ (as ``apply_to: factors``);
    the plan's bytes are the built module's, for both quantizers."""
    x, linear, gram, base = _compressed_layer()
    w = linear.weight.detach()
    options = dict(rank=RANK, bits=3, group_size=8)
    rtn = _eora(base, linear, gram, **options)
    gptq = _eora(base, linear, gram, quantizer="gptq", **options)
    assert isinstance(gptq.down, QuantizedLinear) and isinstance(gptq.up, QuantizedLinear)
    assert _output_error(x, w, dense_weight(gptq)) < _output_error(x, w, dense_weight(rtn))
    cls = get_compressor("eora")
    for module, quantizer in ((rtn, "rtn"), (gptq, "gptq")):
        plan = cls(cls.Config(quantizer=quantizer, **options)).plan(base)
        assert plan.bytes_after == module.storage_bytes() == sum(
            t.numel() * t.element_size() for t in module.state_dict().values())
