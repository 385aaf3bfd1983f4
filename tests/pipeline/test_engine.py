"""The layer-wise engine on tiny random models, checked against direct whole-model computations."""
import pytest
import torch

from lrcompress.compressor import GramStatistic, get_compressor
from lrcompress.compressor.linalg import relative_output_error
from lrcompress.errors import NumericalError
from lrcompress.models import adapter_for
from lrcompress.modules import LowRankLinear, dense_weight
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage
from helpers import tiny_model

WINDOWS = torch.randint(3, 259, (6, 32), generator=torch.Generator().manual_seed(0))


def _stage(method, index=0, targets=("*",), ignore=(), **options):
    cls = get_compressor(method)
    return Stage(index, cls(cls.Config(**options)), list(targets), list(ignore))


def _grams(model, names):
    """Grams of the named modules' inputs from one ordinary whole-model forward pass."""
    stats = {n: GramStatistic(model.get_submodule(n).in_features) for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: stats[n].observe(a[0], o)) for n in names]
    with torch.no_grad():
        model(input_ids=WINDOWS, use_cache=False)
    for h in handles:
        h.remove()
    return {n: s.gram(n) for n, s in stats.items()}


@pytest.mark.parametrize("sequential", [True, False])
def test_statistics_come_from_the_right_model(sequential):
    """Non-sequential: layer-1 statistics are those of the original model. Sequential: those of the model
    whose layer 0 is already compressed. Checked through the recorded relative errors."""
    model = tiny_model("llama")
    original = tiny_model("llama")
    names = [f"model.layers.1.{n}" for n in ("self_attn.q_proj", "mlp.down_proj")]
    weights = {n: original.get_submodule(n).weight.detach().clone() for n in names}
    stage = _stage("svd", rank=4)
    settings = PipelineSettings(batch_size=4, sequential=sequential)
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), WINDOWS, settings), [stage]).run()
    assert len(records) == 14
    reference = original
    if sequential:  # the model as the pipeline saw it at layer 1: layer 0 compressed, layer 1 intact
        reference = tiny_model("llama")
        reference.model.layers[0] = model.model.layers[0]
    grams = _grams(reference, names)
    for name in names:
        record = next(r for r in records if r.name == name)
        approx = dense_weight(model.get_submodule(name))
        expected = relative_output_error(weights[name], approx, grams[name])
        assert record.relative_error == pytest.approx(expected, rel=1e-6)


def test_stages_run_in_order_and_can_target_disjoint_modules():
    """Layer 0's modules are all fitted on the original model's inputs (its attention and its MLP each from
    one pass before anything in the layer changed), so their records can be checked directly: the error
    is the one of the finished module in the original Gram, and no larger than a plain SVD's at the same
    rank (whiten and LoRD both minimise exactly that output error, up to their damping)."""
    original = tiny_model("qwen2")
    model = tiny_model("qwen2")  # q/k/v carry biases
    stages = [_stage("lord", 0, ["*.mlp.*"], ratio=0.3), _stage("whiten", 1, ["*.self_attn.*"], ["*.o_proj"], rank=8)]
    records = LayerwisePipeline(LayerWalk(model, adapter_for(model), WINDOWS, PipelineSettings()), stages).run()
    assert [r.method for r in records[:6]] == ["lord"] * 3 + ["whiten"] * 3
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.bias is not None and q.rank == 8
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "Linear"
    first = [r for r in records if r.layer == 0]
    grams = _grams(original, [r.name for r in first])
    for record in first:
        weight = original.get_submodule(record.name).weight.detach()
        module = model.get_submodule(record.name)
        expected = relative_output_error(weight, dense_weight(module), grams[record.name])
        assert record.relative_error == pytest.approx(expected, rel=1e-6)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        plain = (u[:, :module.rank] * s[:module.rank]) @ vh[:module.rank]
        assert record.relative_error <= relative_output_error(weight, plain, grams[record.name]) * (1 + 1e-6)
    for record in records:
        assert record.params_after < record.params_before
        assert record.seconds >= 0 and record.numerical_path


def test_full_rank_compression_leaves_the_model_function_unchanged():
    model = tiny_model("llama")
    with torch.no_grad():
        before = model(input_ids=WINDOWS).logits
    LayerwisePipeline(LayerWalk(model, adapter_for(model), WINDOWS, PipelineSettings()), [_stage("whiten", rank=64)]).run()
    with torch.no_grad():
        after = model(input_ids=WINDOWS).logits
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3)


def test_nan_activations_fail_with_the_module_name():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[0] = float("nan")
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.self_attn\.q_proj"):
        LayerwisePipeline(LayerWalk(model, adapter_for(model), WINDOWS, PipelineSettings()), [_stage("whiten", rank=4)]).run()
