"""Out-of-memory errors name the layer and module and the recipe knobs that lower memory."""
import pytest
import torch

from lrcompress.compressor import get_compressor
from lrcompress.errors import OutOfMemory
from lrcompress.models import adapter_for
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage
from lrcompress.pipeline.oom import is_out_of_memory
from helpers import tiny_model

WINDOWS = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(0))


def _pipeline(model):
    cls = get_compressor("whiten")
    stage = Stage(0, cls(cls.Config(ratio=0.2)), ["*"])
    return LayerwisePipeline(LayerWalk(model, adapter_for(model), WINDOWS, PipelineSettings(batch_size=2, num_samples=4)), [stage])


def test_an_oom_while_compressing_names_layer_module_and_knobs(monkeypatch):
    cls = get_compressor("whiten")
    original = cls.compress

    def compress(self, name, module, stats):
        if name == "model.layers.1.mlp.down_proj":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, name, module, stats)

    monkeypatch.setattr(cls, "compress", compress)
    with pytest.raises(OutOfMemory) as caught:
        _pipeline(tiny_model("llama")).run()
    message = str(caught.value)
    assert "in layer 1 while compressing model.layers.1.mlp.down_proj (whiten)" in message
    for knob in ("runtime.batch_size (now 2)", "runtime.offload_device (now cpu)", "calibration.num_samples (now 4)"):
        assert knob in message
    assert "peak RSS" in message
    assert isinstance(caught.value.__cause__, torch.cuda.OutOfMemoryError)


def test_an_oom_in_a_layer_forward_names_the_layer_and_batch(monkeypatch):
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 4294967296 bytes.")

    monkeypatch.setattr(mlp, "forward", exhausted)
    with pytest.raises(OutOfMemory, match=r"in layer 1 running batch 1/2 .*runtime\.batch_size \(now 2\)"):
        _pipeline(model).run()


def test_other_errors_pass_through_unchanged():
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("memory"))
