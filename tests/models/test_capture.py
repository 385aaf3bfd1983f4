"""The test of record for per-layer inputs: for every supported family, replaying the captured inputs
through the decoder layers one at a time (the pipeline with no compression) reproduces the model's own
forward, layer by layer, and the adapter's head gives the model's logits."""
import pytest
import torch

from lrcompress.errors import LrcompressError
from lrcompress.models import ArchitectureAdapter, adapter_for
from lrcompress.models.capture import capture_layer_inputs, forward_layer
from families import FAMILIES, family_model, family_windows

CPU = torch.device("cpu")


def _model_forward(model, adapter, windows):
    """Each decoder layer's (input, output) per batch of 2 from ordinary forwards, and the logits."""
    seen: dict[int, list] = {}

    def hook(index):
        def record(_module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            seen.setdefault(index, []).append((hidden.clone(), out.clone()))
        return record

    layers = adapter.decoder_layers(model)
    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = torch.cat([model(input_ids=batch, use_cache=False).logits for batch in windows.split(2)])
    finally:
        for handle in handles:
            handle.remove()
    return seen, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_equals_the_models_forward_layer_by_layer(family):
    model = family_model(family)
    adapter = adapter_for(model)
    windows = family_windows()
    seen, logits = _model_forward(model, adapter, windows)
    inputs = capture_layer_inputs(model, adapter, windows, 2, CPU, CPU)
    with torch.no_grad():
        for index, layer in enumerate(adapter.decoder_layers(model)):
            outputs = forward_layer(layer, inputs, CPU, CPU)
            for batch, (x, y) in enumerate(seen[index]):
                torch.testing.assert_close(inputs.hidden[batch], x, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"layer {index} input, batch {batch}: {m}")
                torch.testing.assert_close(outputs.hidden[batch], y, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"layer {index} output, batch {batch}: {m}")
            inputs = outputs
        replayed = torch.cat([adapter.head_logits(model, hidden) for hidden in inputs.hidden])
    torch.testing.assert_close(replayed, logits, rtol=1e-5, atol=1e-5)


def test_layer_types_get_their_own_inputs():
    """Gemma 3 alternates sliding and full attention layers: two kinds of inputs, by type."""
    model = family_model("gemma3_text")
    inputs = capture_layer_inputs(model, adapter_for(model), family_windows(2), 2, CPU, CPU)
    assert sorted(inputs.calls.kinds()) == [[0, 2], [1, 3]]
    sliding, full = inputs.call(0), inputs.calls.get(1, 0)
    assert sliding.kwargs["position_embeddings"][0] is inputs.calls.get(2, 0).kwargs["position_embeddings"][0]
    assert not torch.equal(sliding.kwargs["position_embeddings"][0], full.kwargs["position_embeddings"][0])


def test_a_layer_the_forward_skips_is_named():
    model = family_model("llama")
    adapter = ArchitectureAdapter("llama")
    layers = adapter.decoder_layers(model)
    layers.append(layers[0].__class__(model.config, 2))   # a third layer; the forward runs config's 2
    with pytest.raises(LrcompressError, match=r"did not call decoder layers \[2\]"):
        capture_layer_inputs(model, adapter, family_windows(2), 2, CPU, CPU)


def test_the_layers_forward_is_restored_after_the_capture():
    model = family_model("llama")
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    wrapped = layers[1].forward                 # as accelerate's hooks do: a forward on the instance
    layers[1].forward = wrapped
    capture_layer_inputs(model, adapter, family_windows(2), 2, CPU, CPU)
    assert "forward" not in layers[0].__dict__ and layers[1].__dict__["forward"] is wrapped
