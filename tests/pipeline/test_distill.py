"""``pipeline.distill``: end-to-end distillation of the compressed factors toward the original model's
next-token distributions. On tiny random models of several families (soft-capped Gemma 2, Phi-3, an MoE
with low-rank experts): the KL against the original drops on windows it never trained on, an absurd lr is
reverted by the held-out guard, everything but the factors stays bit-identical, a run is deterministic,
a family whose logits cannot be rebuilt and a non-finite gradient are refused with their cause named."""
import copy
import functools

import pytest
import torch

from families import SEQ, family_model
from lrcompress.compressor import get_compressor
from lrcompress.errors import LrcompressError, NumericalError
from lrcompress.models import adapter_for
from lrcompress.pipeline import LayerWalk, LayerwisePipeline, PipelineSettings, Stage
from lrcompress.pipeline.distill import (DistillConfig, distill_model, kl_per_token, split_windows,
                                         teacher_states)
from lrcompress.pipeline.refine import trainable_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

CALIBRATION = torch.randint(3, 259, (32, SEQ), generator=torch.Generator().manual_seed(1))
UNSEEN = torch.randint(3, 259, (16, SEQ), generator=torch.Generator().manual_seed(2))
CONFIG = DistillConfig(epochs=4, lr=3e-3, batch_size=4, micro_batch=4)   # 28 training windows: 7 steps per epoch


METHODS = {"whiten": dict(ratio=0.6), "cospadi": dict(ratio=0.6, iterations=1)}


@functools.cache
def _compressed(family: str, method: str = "whiten"):
    """(dense model, its compressed copy (whiten 0.6 or CoSpaDi 0.6), the teacher states of the calibration
    windows)."""
    dense = family_model(family)
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    teacher = teacher_states(model, adapter, CALIBRATION, 4, torch.device("cpu"))
    compressor = get_compressor(method)
    stage = Stage(0, compressor(compressor.Config(**METHODS[method])), ["*"], [])
    LayerwisePipeline(LayerWalk(model, adapter, CALIBRATION, PipelineSettings(batch_size=4)), [stage]).run()
    return dense, model, teacher


def _fresh(family: str, method: str = "whiten"):
    dense, model, teacher = _compressed(family, method)
    return dense, copy.deepcopy(model), teacher


@torch.no_grad()
def _kl(model, dense, windows=UNSEEN) -> float:
    return float(kl_per_token(model(input_ids=windows).logits, dense(input_ids=windows).logits))


@pytest.mark.parametrize("family, lr, bound", [("llama", 3e-3, 0.9), ("qwen2", 3e-3, 0.9), ("gemma2", 3e-3, 0.9),
                                              ("phi3", 3e-3, 0.9), ("qwen2_moe", 1e-3, 0.95)])
def test_distillation_lowers_the_kl_on_text_it_did_not_train_on(family, lr, bound):
    """Whiten 0.6, then 4 epochs. Measured KL on 16 unseen windows after/before: 0.62 (llama), 0.61 (qwen2),
    0.81 (gemma2, soft-capped logits), 0.59 (phi3), 0.87 (qwen2_moe: its fused experts are not factorized,
    only attention and the shared expert are; at 3e-3 every evaluated state was worse and the guard reverted).
    The bounds leave room for platform rounding, not for no effect."""
    dense, model, teacher = _fresh(family)
    before = _kl(model, dense)
    report = distill_model(model, adapter_for(model), CALIBRATION, teacher, CONFIG.model_copy(update={"lr": lr}))
    assert _kl(model, dense) < bound * before
    assert report.held_out_after < report.held_out_before and not report.reverted
    assert report.steps == 28 and report.train_windows == 28 and report.held_out_windows == 4
    assert len(report.curve) == 8 and report.kept_step in [c["step"] for c in report.curve]


def test_the_guard_reverts_an_absurd_learning_rate_and_only_factors_change():
    dense, model, teacher = _fresh("llama")
    state = {name: t.clone() for name, t in model.state_dict().items()}
    report = distill_model(model, adapter_for(model), CALIBRATION, teacher, CONFIG.model_copy(update={"lr": 5.0}))
    assert report.reverted and report.kept_step == 0 and report.held_out_after == report.held_out_before
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())
    report = distill_model(model, adapter_for(model), CALIBRATION, teacher, CONFIG)
    factors = {id(p) for p in trainable_parameters(adapter_for(model).decoder_layers(model), ["factors"])}
    names = {name for name, p in model.named_parameters() if id(p) in factors}
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, state[name])}
    assert changed and changed <= names and all(n.endswith(("up.weight", "down.weight")) for n in changed)
    assert all(p.grad is None for p in model.parameters())


def test_a_sparse_dictionary_is_distilled_on_its_support():
    """CoSpaDi 0.6 (W ≈ (D·S)ᵀ): the dictionaries and the nonzero values train, the indices do not move, nothing
    else changes, and the KL falls on windows never trained on (measured 0.71 of before)."""
    dense, model, teacher = _fresh("llama", "cospadi")
    state = {name: t.clone() for name, t in model.state_dict().items()}
    before = _kl(model, dense)
    report = distill_model(model, adapter_for(model), CALIBRATION, teacher, CONFIG)
    assert not report.reverted and _kl(model, dense) < 0.9 * before
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, state[name])}
    assert changed and all(name.endswith((".dictionary", ".values")) for name in changed)
    assert any(name.endswith(".dictionary") for name in changed) and any(name.endswith(".values") for name in changed)


def test_a_run_is_deterministic_and_the_model_keeps_its_dtypes():
    dense, model, teacher = _fresh("qwen2")
    other = copy.deepcopy(model).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    config = CONFIG.model_copy(update={"epochs": 1})
    first = distill_model(model, adapter_for(model), CALIBRATION, teacher, config)
    second = distill_model(other, adapter_for(other), CALIBRATION, teacher, config)
    assert first.curve == second.curve
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_non_finite_gradient_names_the_module():
    dense, model, teacher = _fresh("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.down.weight[0, 0] = float("inf")
    with pytest.raises(NumericalError, match=r"KL is nan|model\.layers\.\d\..*weight holds NaN/Inf"):
        distill_model(model, adapter_for(model), CALIBRATION, teacher, CONFIG)


def test_the_teacher_head_is_checked_against_the_models_logits(monkeypatch):
    model = family_model("gemma2")
    model.config.final_logit_softcapping = 0.05         # a cap the tiny model's logits reach (default 30)
    adapter = adapter_for(model)
    states = teacher_states(model, adapter, CALIBRATION[:6], 4, torch.device("cpu"))
    assert states.shape == (6, SEQ, model.config.hidden_size) and states.dtype == torch.float32
    monkeypatch.setattr(type(adapter), "head_logits", lambda self, m, h: m.lm_head(m.model.norm(h)))  # no soft-cap
    with pytest.raises(LrcompressError, match="cannot be rebuilt"):
        teacher_states(model, adapter, CALIBRATION[:4], 4, torch.device("cpu"))


def test_held_out_windows_are_spread_over_the_set():
    train, held = split_windows(32, 0.125)
    assert held == [4, 12, 20, 28] and len(train) == 28 and not set(train) & set(held)
    assert split_windows(2, 0.9) == ([0], [1])
    with pytest.raises(LrcompressError, match="at least 2 calibration windows"):
        split_windows(1, 0.5)


def test_the_divergences_match_torch_kl_div_and_mix_linearly():
    """Independent check: ``F.kl_div(input=log q, target=log p, log_target=True)`` is KL(p ‖ q)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2
    log_q, log_p = F.log_softmax(student / 2.0, -1), F.log_softmax(teacher / 2.0, -1)
    forward = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / 15 * 4.0
    reverse = F.kl_div(log_p, log_q, log_target=True, reduction="sum") / 15 * 4.0
    assert torch.allclose(kl_per_token(student, teacher, 2.0), forward, rtol=1e-5)
    assert torch.allclose(kl_per_token(student, teacher, 2.0, 1.0), reverse, rtol=1e-5)
    assert torch.allclose(kl_per_token(student, teacher, 2.0, 0.3), 0.7 * forward + 0.3 * reverse, rtol=1e-5)
    assert not torch.allclose(forward, reverse, rtol=1e-2)
    assert DistillConfig(divergence="reverse").reverse_share == 1.0 and DistillConfig().reverse_share == 0.0
    assert DistillConfig(divergence="mixed", reverse_weight=0.25).reverse_share == 0.25


def test_the_reverse_kl_seeks_the_mode_and_the_forward_kl_covers_the_mass():
    """The teacher puts two tokens far ahead (logit 5, the rest ~N(0, 1)); the student ranks the second of them
    with the rest and can only sharpen or flatten (q = softmax(s·z')). The forward KL's best s flattens the
    student to cover the missed token; the reverse KL's keeps it sharp on the one it has. Best-s entropies
    measured: 4.41 forward, 4.18 mixed, 3.94 reverse (teacher 3.51), the property that motivates
    ``divergence: reverse`` (MiniLLM, arXiv:2306.08543)."""
    teacher = torch.randn(64, 200, generator=torch.Generator().manual_seed(0))
    teacher[:, :2] = 5.0
    student = teacher.clone()
    student[:, 1] = 0.0
    scales = torch.linspace(0.05, 3.0, 296)

    def best_scale(share: float) -> float:
        losses = torch.stack([kl_per_token(s * student, teacher, 1.0, share) for s in scales])
        return float(scales[losses.argmin()])

    def entropy(scale: float) -> float:
        log_q = torch.log_softmax(scale * student, -1)
        return float(-(log_q.exp() * log_q).sum(-1).mean())

    forward, mixed, reverse = (entropy(best_scale(share)) for share in (0.0, 0.5, 1.0))
    assert reverse < mixed - 0.1 and mixed < forward - 0.1


@pytest.mark.parametrize("divergence", ["reverse", "mixed"])
def test_the_reverse_and_mixed_divergences_distil_on_unseen_text(divergence):
    """Whiten 0.6 on tiny Llama, then 4 epochs of the other objectives: the trained divergence falls on the
    unseen windows (measured after/before: 0.62 reverse, 0.62 mixed) and the report names it."""
    dense, model, teacher = _fresh("llama")
    config = CONFIG.model_copy(update={"divergence": divergence})
    share = config.reverse_share

    @torch.no_grad()
    def unseen() -> float:
        return float(kl_per_token(model(input_ids=UNSEEN).logits, dense(input_ids=UNSEEN).logits, 1.0, share))

    before = unseen()
    report = distill_model(model, adapter_for(model), CALIBRATION, teacher, config)
    assert report.divergence == divergence and not report.reverted
    assert unseen() < 0.9 * before and report.held_out_after < report.held_out_before
