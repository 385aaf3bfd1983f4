"""Every registered compressor, and its compressed modules' forward, with all tensors on a non-CPU device.

CI has no GPU, so the device is emulated (``tests/emulated_device.py``): tensors report ``cuda:0`` and
compute on the CPU, and any op mixing one with a CPU tensor (a ``torch.eye``/``zeros``/``arange`` created
without ``device=``) fails as it would on a GPU. Each method runs through the layerwise pipeline on a
tiny model moved onto the device (statistics collected there), then the compressed model's forward.
"""
from __future__ import annotations

import pytest
import torch

import lrcompress.triton_kernels.dispatch as dispatch
from lrcompress.compressor import get_compressor
from lrcompress.compressor.base import COMPRESSORS
from lrcompress.compressor.fisher import FisherStatistic
from lrcompress.models import adapter_for
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage
from emulated_device import all_on_device, emulated_device
from helpers import tiny_model
from moe_helpers import tiny_moe

WINDOWS = torch.randint(3, 259, (4, 24), generator=torch.Generator().manual_seed(0))

# method -> stages (method, options, targets) run in order; the last one is the method under test.
LINEAR = ["*.q_proj", "*.k_proj", "*.down_proj"]
CASES: dict[str, list[tuple[str, dict, list[str]]]] = {
    "svd": [("svd", {"ratio": 0.3}, LINEAR)],
    "whiten": [("whiten", {"ratio": 0.3}, LINEAR)],
    "lord": [("lord", {"ratio": 0.3}, LINEAR)],
    "cospadi": [("cospadi", {"ratio": 0.3, "iterations": 2}, LINEAR)],
    "compot": [("compot", {"ratio": 0.3, "iterations": 2}, LINEAR)],
    "rtn": [("rtn", {"bits": 4, "group_size": 32}, LINEAR)],
    "gptq": [("gptq", {"bits": 4, "group_size": 32}, LINEAR)],
    "prune": [("prune", {"sparsity": 0.5}, LINEAR)],
    "eora": [("rtn", {"bits": 3, "group_size": 32}, LINEAR), ("eora", {"rank": 4}, LINEAR)],
}
MOE = {"expert_average": {"num_experts": 2}, "expert_prune": {"num_experts": 2}, "submoe": {"num_experts": 2}}
NOT_COVERED = {
    "fwsvd": "its Fisher statistics come from a backward pre-pass, and autograd cannot run on the emulated "
             "device (no CUDA device guard in a CPU build); its compress() is covered below with a Fisher "
             "statistic built on the device",
}


@pytest.fixture(autouse=True)
def torch_references(monkeypatch):
    """The emulated tensors say CUDA: keep the Triton kernels (which need a real GPU) out of it. The
    quantized linears' device forward still goes through the dispatch, so it runs on the torch reference
    (dequantize from the packed codes, then F.linear); tests/triton_kernels checks the kernel against it."""
    monkeypatch.setattr(dispatch, "use_triton", lambda *tensors: False)


def test_every_registered_method_is_covered_or_listed():
    assert set(COMPRESSORS) == set(CASES) | set(MOE) | set(NOT_COVERED)


def run_on_device(model, stages: list[Stage]) -> None:
    with emulated_device() as device:
        model.to(device)
        windows = WINDOWS.to(device)
        settings = PipelineSettings(batch_size=2, compute=device, offload=device)
        records = LayerwisePipeline(LayerWalk(model, adapter_for(model), windows, settings), stages).run()
        logits = model(input_ids=windows).logits
        assert records and logits.device == device and all_on_device(model)
        assert torch.isfinite(logits).all().item()


def stage(index: int, method: str, options: dict, targets: list[str]) -> Stage:
    cls = get_compressor(method)
    return Stage(index, cls(cls.Config(**options)), targets)


@pytest.mark.parametrize("method", sorted(CASES))
def test_linear_methods_on_a_device(method):
    run_on_device(tiny_model(num_hidden_layers=1), [stage(i, *spec) for i, spec in enumerate(CASES[method])])


@pytest.mark.parametrize("method", sorted(MOE))
def test_expert_methods_on_a_device(method):
    model = tiny_moe("qwen2_moe")
    model.config._experts_implementation = "eager"   # grouped_mm asks the (absent) CUDA runtime its capability
    run_on_device(model, [stage(0, method, MOE[method], ["*.mlp"])])


def test_fwsvd_compress_on_a_device():
    model = tiny_model()
    with emulated_device() as device:
        module = model.model.layers[0].mlp.down_proj.to(device)
        fisher = FisherStatistic.for_module(module, device)
        g = torch.Generator().manual_seed(0)
        fisher.input_sums.copy_(torch.rand(module.in_features, generator=g, dtype=torch.float64) + 0.1)
        fisher.output_sums.copy_(torch.rand(module.out_features, generator=g, dtype=torch.float64) + 0.1)
        fisher.count = 4
        cls = get_compressor("fwsvd")
        result = cls(cls.Config(ratio=0.3)).compress("down", module, {"fisher": fisher})
        x = torch.randn(3, module.in_features, device=device)
        assert all_on_device(result.module) and result.module(x).device == device
