"""The one layer walk: what it loads and releases, where the layers are while they run, hooks that never stay."""
import pytest
import torch
from torch import nn

from lrcompress.models import adapter_for
from lrcompress.pipeline import LayerWalk, PipelineSettings
from lrcompress.pipeline.walk import hooks, on_device
from helpers import tiny_model

WINDOWS = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(0))


class RecordingStore:
    """A layer store that only records what it is asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def load(self, indices: list[int]) -> None:
        self.calls.append(("load", list(indices)))

    def release(self, indices: list[int]) -> None:
        self.calls.append(("release", list(indices)))


def _walk(store=None) -> LayerWalk:
    model = tiny_model("llama")
    return LayerWalk(model, adapter_for(model), WINDOWS, PipelineSettings(batch_size=2),
                     store=store or RecordingStore())


def test_layers_are_loaded_one_at_a_time_and_released_after_their_step():
    store = RecordingStore()
    walk = _walk(store)
    count = len(walk.decoder_layers)
    seen = []
    for index, layer in walk.layers(range(count)):
        assert store.calls[-1] == ("load", [index])            # loaded before it is handed over
        assert layer is walk.decoder_layers[index]
        seen.append(index)
    assert seen == list(range(count))
    assert store.calls == [(verb, [i]) for i in range(count) for verb in ("load", "release")]


def test_the_walk_runs_the_model_layer_by_layer():
    """Capture, then every layer's forward: the last hidden states of the model's own forward."""
    walk = _walk()
    hidden = walk.capture()
    for _, layer in walk.layers(range(len(walk.decoder_layers))):
        hidden = walk.forward(layer, hidden)
    with torch.no_grad():
        expected = walk.model(input_ids=WINDOWS, output_hidden_states=True, use_cache=False).hidden_states[-1]
    got = torch.cat([walk.model.get_submodule(walk.adapter.final_norm)(h) for h in hidden.hidden])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_segments_load_only_what_the_predicate_asks_and_release_every_segment():
    store = RecordingStore()
    walk = _walk(store)
    count = len(walk.decoder_layers)
    segments = list(walk.segments(2, loads=lambda indices: indices[0] != 0))
    assert segments == [list(range(i, min(i + 2, count))) for i in range(0, count, 2)]
    assert ("load", [0, 1]) not in store.calls and ("release", [0, 1]) in store.calls


def test_on_device_puts_modules_back_even_after_an_error():
    linear = nn.Linear(2, 2)
    moved = []
    original_to = linear.to

    def spy(device, *args, **kwargs):
        moved.append(torch.device(device))
        return original_to(device, *args, **kwargs)

    linear.to = spy
    with pytest.raises(RuntimeError), on_device([linear], torch.device("meta")):
        raise RuntimeError("inside")
    assert moved == [torch.device("meta"), torch.device("cpu")]


def test_hooks_are_removed_even_after_an_error():
    layer = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    calls = []
    with pytest.raises(RuntimeError), hooks(layer, ["0", "1"], lambda name: lambda m, a, o: calls.append(name)):
        layer(torch.zeros(1, 2))
        raise RuntimeError("inside")
    layer(torch.zeros(1, 2))
    assert calls == ["0", "1"]
    assert not layer[0]._forward_hooks and not layer[1]._forward_hooks
