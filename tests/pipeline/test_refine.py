"""Block refinement (pipeline/refine.py) on a tiny random Llama: layer 1 compressed by truncated SVD of
every linear, fed the outputs of a compressed layer 0 (so its inputs carry an upstream error), refined
toward the original layer 1's outputs on the original inputs."""
import copy

import pytest
import torch

from helpers import tiny_model
from lrcompress.errors import LrcompressError, NumericalError
from lrcompress.models import adapter_for
from lrcompress.models.capture import LayerInputs, capture_layer_inputs, forward_layer
from lrcompress.modules.low_rank import LowRankLinear
from lrcompress.modules.surgery import replace_submodule
from lrcompress.pipeline.refine import RefineConfig, refine_layer, trainable_parameters

CPU = torch.device("cpu")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _svd_compress(layer: torch.nn.Module, keep: float) -> torch.nn.Module:
    """A copy of ``layer`` with every linear replaced by its best rank-⌈keep·min(m, n)⌉ approximation."""
    layer = copy.deepcopy(layer)
    for name in LINEARS:
        weight = layer.get_submodule(name).weight.detach().double()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        rank = max(1, round(keep * min(weight.shape)))
        module = LowRankLinear.from_factors(u[:, :rank] * s[:rank], vh[:rank], None, torch.float32)
        replace_submodule(layer, name, module)
    return layer


def _setting(keep: float = 0.5):
    """(compressed layer 1, its inputs in the compressed stream, the original layer 1's outputs)."""
    model = tiny_model("llama", seed=0)
    adapter = adapter_for(model)
    windows = torch.randint(3, 259, (96, 64), generator=torch.Generator().manual_seed(1))
    x0 = capture_layer_inputs(model, adapter, windows, 8, CPU, CPU)
    layers = adapter.decoder_layers(model)
    with torch.no_grad():
        x1 = forward_layer(layers[0], x0, CPU, CPU)
        x1_hat = forward_layer(_svd_compress(layers[0], keep), x0, CPU, CPU)
        y1 = forward_layer(layers[1], x1, CPU, CPU).hidden
    return _svd_compress(layers[1], keep), x1_hat, y1


@pytest.fixture(scope="module")
def setting():
    return _setting()


CONFIG = RefineConfig(epochs=10, lr=1e-3, holdout=0.25, seed=0)


def test_refinement_reduces_the_held_out_block_error(setting):
    """12 batches of 8 windows: 9 trained on, 3 held out. The held-out error must drop by at least a fifth
    (measured: 0.61×, the training error 0.47×). Truncating half of every spectrum leaves an error the
    factors can partly re-fit, but this layer has 32k trainable values for 4.6k training tokens of random
    text, so much of the training gain is memorisation (with 768 tokens the held-out gain was 0.85×);
    0.8 is what only a fit that generalises clears, with room for platform rounding."""
    layer, inputs, targets = setting
    layer = copy.deepcopy(layer)
    report = refine_layer(layer, inputs, targets, CONFIG, name="layer 1")
    assert report.steps == 10 * 9 and not report.reverted
    assert report.holdout_after < 0.8 * report.holdout_before
    assert report.train_after < report.train_before
    # the report is the truth: re-measured from the refined layer, held-out batches 9 to 11
    with torch.no_grad():
        errors = [(inputs.call(b)(layer, inputs.hidden[b]) - targets[b]).pow(2).mean() for b in (9, 10, 11)]
    assert report.holdout_after == pytest.approx(float(sum(errors) / 3), rel=1e-5)


def test_only_the_chosen_parameters_change(setting):
    layer, inputs, targets = setting
    layer = copy.deepcopy(layer)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    refine_layer(layer, inputs, targets, RefineConfig(epochs=1, lr=1e-3, holdout=0))
    factors = {f"{name}.{part}.weight" for name in LINEARS for part in ("down", "up")}
    for name, parameter in layer.named_parameters():
        if name in factors:
            assert not torch.equal(parameter, before[name]), name
        else:
            assert torch.equal(parameter, before[name]), name
    assert all(p.requires_grad for p in layer.parameters())       # requires_grad put back as it was


def test_norms_are_trained_when_asked(setting):
    layer, inputs, targets = setting
    layer = copy.deepcopy(layer)
    norm = layer.input_layernorm.weight.detach().clone()
    chosen = trainable_parameters(layer, ["norms"])
    assert len(chosen) == 2 and all(p.dim() == 1 for p in chosen)
    refine_layer(layer, inputs, targets, RefineConfig(epochs=2, lr=1e-3, parameters=["norms"], holdout=0))
    assert not torch.equal(layer.input_layernorm.weight, norm)


def test_deterministic_under_the_seed(setting):
    layer, inputs, targets = setting
    config = RefineConfig(epochs=2, lr=1e-3, holdout=0.25, revert_if_worse=False, seed=7)
    first, second = copy.deepcopy(layer), copy.deepcopy(layer)
    a = refine_layer(first, inputs, targets, config)
    b = refine_layer(second, inputs, targets, config)
    assert a.model_dump(exclude={"seconds"}) == b.model_dump(exclude={"seconds"})
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)
    other = copy.deepcopy(layer)
    refine_layer(other, inputs, targets, config.model_copy(update={"seed": 8}))
    assert not torch.equal(other.self_attn.q_proj.up.weight, first.self_attn.q_proj.up.weight)


def _train_error(layer, inputs, targets) -> float:
    """The float32 error of ``layer`` (cast to float32) on the 9 training batches, as the report means it."""
    layer = copy.deepcopy(layer).float()
    with torch.no_grad():
        errors = [(inputs.call(b)(layer, inputs.hidden[b]) - targets[b]).pow(2).mean() for b in range(9)]
    return float(sum(errors) / 9)


def test_a_bfloat16_layer_is_refined_in_float32_and_handed_back_in_bfloat16(setting):
    """The losses are float32 statistics of the layer run in float32 (bfloat16 arithmetic would differ
    from them by far more than 1e-5), and the refined weights come back in the layer's own dtype."""
    layer, inputs, targets = setting
    layer = copy.deepcopy(layer).to(torch.bfloat16)
    before = _train_error(layer, inputs, targets)
    report = refine_layer(layer, inputs, targets, CONFIG)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert report.train_before == pytest.approx(before, rel=1e-5)
    assert report.holdout_after < report.holdout_before
    assert _train_error(layer, inputs, targets) < 0.8 * before     # the gain survives the cast back


def test_the_token_relative_loss_weighs_every_token_alike(setting):
    layer, inputs, targets = setting
    report = refine_layer(copy.deepcopy(layer), inputs, targets,
                          RefineConfig(epochs=2, lr=1e-3, holdout=0.25, loss="token_relative"))
    with torch.no_grad():
        per_batch = []
        for b in range(9):
            error = (inputs.call(b)(layer, inputs.hidden[b]) - targets[b]).pow(2).mean(-1)
            per_batch.append((error / targets[b].pow(2).mean(-1)).mean())
    assert report.train_before == pytest.approx(float(sum(per_batch) / 9), rel=1e-5)
    assert report.holdout_after < report.holdout_before


def test_a_cached_product_is_bypassed_and_rebuilt(setting):
    """A LowRankLinear whose factors are not smaller than the dense weight caches B·A for inference; the
    refinement must train the factors, not the cache, and rebuild the cache from them."""
    _, inputs, targets = setting
    layer, _, _ = _setting(keep=0.9)
    for module in layer.modules():
        if isinstance(module, LowRankLinear):
            module.prepare_inference()
    q = layer.self_attn.q_proj
    assert q._product is not None
    up = q.up.weight.detach().clone()
    refine_layer(layer, inputs, targets, RefineConfig(epochs=2, lr=1e-3, holdout=0))
    assert not torch.equal(q.up.weight, up)
    torch.testing.assert_close(q._product, q.up.weight @ q.down.weight)


def test_a_worse_held_out_error_is_reverted(setting):
    layer, inputs, targets = setting
    layer = copy.deepcopy(layer)
    before = [p.detach().clone() for p in layer.parameters()]
    report = refine_layer(layer, inputs, targets, RefineConfig(epochs=2, lr=10.0, holdout=0.25))
    assert report.reverted and report.holdout_after >= report.holdout_before
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before))


def test_nan_fails_naming_the_layer(setting):
    layer, inputs, targets = setting
    broken = [t.clone() for t in targets]
    broken[0][0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match="refine model.layers.1: loss is nan"):
        refine_layer(copy.deepcopy(layer), inputs, broken, CONFIG, name="model.layers.1")


def test_refuses_what_it_cannot_do(setting):
    layer, inputs, targets = setting
    with pytest.raises(LrcompressError, match="3 target batches for 12 input batches"):
        refine_layer(copy.deepcopy(layer), inputs, targets[:3], CONFIG)
    dense = tiny_model("llama").model.layers[1]
    with pytest.raises(LrcompressError, match="nothing to train"):
        refine_layer(dense, LayerInputs(1, inputs.hidden, inputs.calls), targets, CONFIG)
