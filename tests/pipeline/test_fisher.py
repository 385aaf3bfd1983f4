"""The Fisher pre-pass against autograd's own weight gradients, window by window."""
from __future__ import annotations

import pytest
import torch
from helpers import tiny_model, smollm2_path
from torch import nn

from lrcompress.models import adapter_for
from lrcompress.pipeline import PREPASSES, LayerWalk, PipelineObserver, PipelineSettings

WINDOWS, SEQ_LEN = 5, 24


def _windows(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (WINDOWS, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def _targets(model: nn.Module) -> list[str]:
    return [name for name, module in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(module, nn.Linear)]


def _fisher(model: nn.Module, windows: torch.Tensor, targets: list[str], batch_size: int = 2):
    settings = PipelineSettings(batch_size=batch_size)
    return PREPASSES["fisher"](LayerWalk(model, adapter_for(model), windows, settings, PipelineObserver()), targets)


def _autograd_reference(model: nn.Module, windows: torch.Tensor, targets: list[str]):
    """Σ over windows of (∂L_d/∂W)² summed over rows / columns, from full ``.grad`` tensors, and the
    mean of the windows' losses (transformers' own shifted cross-entropy)."""
    columns = {name: 0.0 for name in targets}
    rows = {name: 0.0 for name in targets}
    losses = []
    for window in windows:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=window[None], labels=window[None]).loss
        loss.backward()
        losses.append(float(loss.detach()))
        for name in targets:
            squared = model.get_submodule(name).weight.grad.square()
            columns[name] = columns[name] + squared.sum(dim=0)
            rows[name] = rows[name] + squared.sum(dim=1)
    model.zero_grad(set_to_none=True)
    return columns, rows, sum(losses) / len(losses)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request) -> nn.Module:
    return tiny_model(request.param).double()


def test_hook_sums_equal_autograd_gradients(model: nn.Module) -> None:
    _check_against_autograd(model)


@pytest.mark.parametrize("family", ["gemma3_text", "granite"])
def test_per_layer_inputs_and_the_models_head_are_used(family: str) -> None:
    """Gemma 3: sliding and full layers get their own masks and rotary bases, logits are soft-capped;
    Granite: multipliers and logit scaling. Both enter the loss whose gradients are summed."""
    from families import family_model

    model = family_model(family).double()
    if family == "gemma3_text":
        model.config.final_logit_softcapping = 5.0
    _check_against_autograd(model)


def _check_against_autograd(model: nn.Module) -> None:
    windows, targets = _windows(), _targets(model)
    result = _fisher(model, windows, targets, batch_size=2)          # 2 + 2 + 1: a ragged last batch
    columns, rows, mean_loss = _autograd_reference(model, windows, targets)
    for name in targets:
        stat = result.statistics[name]
        assert stat.count == WINDOWS
        torch.testing.assert_close(stat.input_importance(name), columns[name].double(), rtol=1e-9, atol=0)
        torch.testing.assert_close(stat.output_importance(name), rows[name].double(), rtol=1e-9, atol=0)
        assert stat.input_importance(name).min() > 0
    assert result.report["mean_loss"] == pytest.approx(mean_loss, rel=1e-10)


def test_fisher_is_per_window_whatever_the_batch_size(model: nn.Module) -> None:
    windows, targets = _windows(1), _targets(model)[:4]
    one = _fisher(model, windows, targets, batch_size=1)
    all_at_once = _fisher(model, windows, targets, batch_size=WINDOWS)
    for name in targets:
        torch.testing.assert_close(one.statistics[name].input_sums, all_at_once.statistics[name].input_sums,
                                   rtol=1e-10, atol=0)


def test_merge_of_partial_passes_equals_one_pass(model: nn.Module) -> None:
    windows, targets = _windows(2), _targets(model)
    whole = _fisher(model, windows, targets)
    first, second = _fisher(model, windows[:2], targets), _fisher(model, windows[2:], targets)
    for name in targets:
        merged = first.statistics[name]
        merged.merge(second.statistics[name])
        assert merged.count == whole.statistics[name].count
        torch.testing.assert_close(merged.input_sums, whole.statistics[name].input_sums, rtol=1e-10, atol=0)
        torch.testing.assert_close(merged.output_sums, whole.statistics[name].output_sums, rtol=1e-10, atol=0)


def test_pass_leaves_weights_flags_and_grads_alone() -> None:
    model = tiny_model("llama").double().train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    _fisher(model, _windows(), _targets(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.training


def test_only_layers_above_the_lowest_target_are_swept(model: nn.Module) -> None:
    windows = _windows(3)
    targets = [t for t in _targets(model) if t.startswith("model.layers.1.")]
    result = _fisher(model, windows, targets)
    columns, _, _ = _autograd_reference(model, windows, targets)
    assert result.report["layers_swept"] == 1
    assert set(result.statistics) == set(targets)
    for name in targets:
        torch.testing.assert_close(result.statistics[name].input_importance(name), columns[name].double(),
                                   rtol=1e-9, atol=0)


def test_report_has_peak_memory_and_saved_boundaries(model: nn.Module) -> None:
    result = _fisher(model, _windows(), _targets(model)[:2], batch_size=2)
    report = result.report
    assert report["windows"] == WINDOWS
    assert report["peak_memory_bytes"] > 0 and report["peak_memory_growth_bytes"] >= 0
    hidden = model.config.hidden_size
    layers = model.config.num_hidden_layers
    assert report["saved_boundaries_bytes_per_batch"] == (layers + 1) * 2 * SEQ_LEN * hidden * 8


def test_fisher_statistic_refuses_forward_observation() -> None:
    from lrcompress.compressor.fisher import FisherStatistic

    with pytest.raises(TypeError, match="pre-pass"):
        FisherStatistic(3, 4).observe(torch.zeros(2, 4), torch.zeros(2, 3))


@pytest.mark.real_model
def test_fisher_pass_on_smollm2_matches_autograd() -> None:
    """SmolLM2-135M (float32): hook sums of the top and bottom layers' linears equal those from full
    ``.grad`` tensors, over 2 short windows; the weights are untouched."""

    from lrcompress.models import load_model

    path = smollm2_path()
    model = load_model(str(path), "float32").model
    windows = torch.randint(100, 40000, (2, 48), generator=torch.Generator().manual_seed(0))
    targets = [t for t in _targets(model) if t.startswith(("model.layers.0.", "model.layers.29."))]
    probe = model.get_submodule(targets[0]).weight.detach().clone()
    result = _fisher(model, windows, targets, batch_size=2)
    assert torch.equal(model.get_submodule(targets[0]).weight, probe)
    columns, rows, mean_loss = _autograd_reference(model, windows, targets)
    for name in targets:
        stat = result.statistics[name]
        torch.testing.assert_close(stat.input_importance(name), columns[name].double(), rtol=2e-3, atol=0)
        torch.testing.assert_close(stat.output_importance(name), rows[name].double(), rtol=2e-3, atol=0)
    assert result.report["mean_loss"] == pytest.approx(mean_loss, rel=1e-4)
