"""Statistics passes within a layer (true_sequential): the groups found from a forward, and every record's
error measured on the inputs the module really gets in the finished model."""
import pytest
import torch

from lrcompress.compressor import get_compressor
from lrcompress.models import adapter_for
from lrcompress.models.capture import capture_layer_inputs
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage
from lrcompress.pipeline.passes import input_groups
from helpers import tiny_model

WINDOWS = torch.randint(3, 259, (6, 32), generator=torch.Generator().manual_seed(0))
LLAMA_TARGETS = ["mlp.down_proj", "self_attn.o_proj", "mlp.up_proj", "self_attn.k_proj", "mlp.gate_proj",
                 "self_attn.q_proj", "self_attn.v_proj"]


def _stage(method, **options):
    cls = get_compressor(method)
    return Stage(0, cls(cls.Config(**options)), ["*"], [])


def test_targets_sharing_an_input_share_a_pass_in_call_order():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    inputs = capture_layer_inputs(model, adapter, WINDOWS, 3, torch.device("cpu"), torch.device("cpu"))
    groups = input_groups(adapter.decoder_layers(model)[0], LLAMA_TARGETS, inputs, torch.device("cpu"))
    assert [sorted(g) for g in groups] == [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                                           ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_a_target_never_called_gets_the_last_pass():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    inputs = capture_layer_inputs(model, adapter, WINDOWS, 3, torch.device("cpu"), torch.device("cpu"))
    layer = adapter.decoder_layers(model)[0]
    layer.add_module("unused", torch.nn.Linear(4, 4))
    groups = input_groups(layer, ["unused", "self_attn.o_proj", "self_attn.q_proj"], inputs, torch.device("cpu"))
    assert groups == [["self_attn.q_proj"], ["self_attn.o_proj"], ["unused"]]


def _outputs(model, names):
    captured = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(n, o))
               for n in names]
    with torch.no_grad():
        model(input_ids=WINDOWS, use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("target", ["layer", "original"])
def test_with_passes_every_record_is_the_error_on_the_inputs_the_module_really_gets(target):
    """Last layer: its o_proj and down_proj are fitted after q/k/v and gate/up are replaced, so each record
    (against the original outputs for target original, against W on its own inputs for target layer) is
    what the finished model shows."""
    names = [f"model.layers.1.{n}" for n in ("self_attn.o_proj", "mlp.down_proj")]
    dense = tiny_model("llama")
    want = _outputs(dense, names)
    model = tiny_model("llama")
    walk = LayerWalk(model, adapter_for(model), WINDOWS, PipelineSettings(batch_size=3, target=target, true_sequential=True))
    records = {r.name: r for r in LayerwisePipeline(walk, [_stage("whiten", ratio=0.5)]).run()}
    inputs = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
               for n in names]
    got = _outputs(model, names)
    for handle in handles:
        handle.remove()
    for name in names:
        if target == "original":
            expected = float((got[name] - want[name]).norm() / want[name].norm())
        else:   # ‖X̂(W − Ŵ)ᵀ‖/‖X̂Wᵀ‖ on the inputs it gets in the finished model
            linear = dense.get_submodule(name)
            with torch.no_grad():
                reference = linear(inputs[name])
            expected = float((got[name] - reference).norm() / reference.norm())
        assert records[name].relative_error == pytest.approx(expected, rel=1e-3)


def test_passes_are_off_by_default_for_the_layer_target_and_on_for_the_original_one():
    assert not PipelineSettings().passes_within_layer
    assert PipelineSettings(target="original").passes_within_layer
    assert not PipelineSettings(target="original", true_sequential=False).passes_within_layer
    assert PipelineSettings(true_sequential=True).passes_within_layer
