"""End-to-end distillation: after the layer walk, train the compressed modules' float factors so that the
compressed model's next-token distributions match the original model's on the calibration windows.

Objective, over the training windows' tokens t, with p the original model's distribution and q_θ the
compressed model's (both at temperature T, docs/distill.md):

    min_θ  T² · mean_t KL(p_t ‖ q_θ,t) = T² · mean_t Σ_v p_t(v) (log p_t(v) − log q_θ,t(v))

(``divergence: forward``, the default). The forward KL is mass-covering: where the compressed model cannot
follow the original everywhere, it spreads its probability over every token the original gives any, which
can lower the original's most likely token. (That was the first reading of the LAMBADA loss the distillation
causes on SmolLM2, bench/history/zeroshot-issue-26.md §5; §6 refutes it there: the reverse KL below lost more.)
``divergence: reverse`` trains T² · mean_t KL(q_θ,t ‖ p_t) instead, which is mode-seeking: it penalizes mass
where the original has little and lets the student drop the original's tail. MiniLLM (Gu et al. 2024,
arXiv:2306.08543) argues for the reverse KL in generative distillation for this reason; it optimizes the
sequence-level reverse KL with a policy gradient on sampled text, whereas here the student is scored on the
calibration text's tokens (teacher forcing), the token-level reverse KL that Wu et al. (2024, "Rethinking
Kullback-Leibler Divergence in Knowledge Distillation for LLMs", arXiv:2404.02657) compare and that they
find to converge to the same optimum as the forward KL but through different parts of the distribution first.
``divergence: mixed`` trains (1 − β)·forward + β·reverse with β = ``reverse_weight``, a fixed-weight reading
of their adaptive mixture (AKL). The held-out guard scores the same objective as the training.

This is logit distillation from the uncompressed model, which Minitron found the best retraining after
pruning (Sreenivas et al. 2024, arXiv:2407.14679, forward KL on the logits), applied to the parameter
update SVD-LLM makes after truncation (Wang et al. 2024, arXiv:2403.07378: a LoRA-style update of the
factors cut its LLaMA-7B C4 perplexity at 20 % from 15.84 to 12.23). Where a block refinement
(``pipeline.refine``) matches one layer's hidden states, this matches what the model is used for, the
output distribution, through every layer at once.

The teacher never runs beside the student: before the walk, the original model's last decoder layer outputs
on every calibration window are kept (``teacher_states``, N × seq × hidden floats: 151 MB for 128 windows of
SmolLM2-135M); the final norm and the LM head, which this distillation never trains, turn them into the
original logits one micro-batch at a time (``ArchitectureAdapter.head_logits``: Gemma 2's soft-capping and the
other families' logit scales included, checked against the model's own logits at capture).

What is trained: both factors of every ``LowRankLinear``, the unquantized residual factors of every
``CompensatedLinear`` and the float dictionary and nonzero values (on their fixed support) of every
``SparseDictLinear`` (``refine.trainable_parameters``'s ``factors``); everything else, embeddings, norms,
biases, quantized codes, untouched weights, stays frozen and bit-identical. The model runs in float32 while
trained (a bf16 model is cast up and back, as ``refine`` does). AdamW, linear warm-up then cosine decay to 0,
one step per ``batch_size`` windows (accumulated ``micro_batch`` at a time), window order reshuffled each
epoch by a generator seeded from the recipe's seed. A ``held_out`` fraction of the windows, spread evenly over
the set (a mixture's sources are in order), is never trained on: the KL there is measured before training and
``evals_per_epoch`` times per epoch; the best state is kept, and the compressed one when none beats it
(``revert_if_worse``). A non-finite loss or gradient raises ``NumericalError`` naming the module.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from ..errors import LrcompressError, NumericalError
from ..models import ArchitectureAdapter
from ..recipe import DistillSpec
from .refine import Trainable, trainable_parameters

log = logging.getLogger(__name__)


class DistillConfig(DistillSpec):
    """``runtime.distill``'s keys and the seed of the window shuffle (the recipe's ``seed``)."""

    seed: int = 0


class DistillReport(BaseModel):
    """What a distillation did: the trained divergence per token (``divergence``: forward is KL(original ‖
    compressed)) on the held-out and training windows, the evaluation curve, the kept step (0: the compressed
    factors were kept), time and memory."""

    parameters: int
    divergence: str = "forward"
    train_windows: int
    held_out_windows: int
    steps: int
    kept_step: int
    reverted: bool
    held_out_before: float
    held_out_after: float
    curve: list[dict[str, float]] = []
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    teacher_seconds: float = 0.0


def kl_per_token(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                 reverse_share: float = 0.0) -> torch.Tensor:
    """T² · mean over tokens of (1 − β)·KL(p ‖ q) + β·KL(q ‖ p), p = softmax(teacher/T), q = softmax(student/T),
    β = ``reverse_share`` (0: the forward KL alone), in float32."""
    t, beta = float(temperature), float(reverse_share)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    gap = log_p - log_q
    per_token = torch.zeros(gap.shape[:-1], device=gap.device)
    if beta < 1.0:
        per_token = per_token + (1.0 - beta) * (log_p.exp() * gap).sum(-1)
    if beta > 0.0:
        per_token = per_token - beta * (log_q.exp() * gap).sum(-1)
    return per_token.mean() * t * t


def split_windows(count: int, held_out: float) -> tuple[list[int], list[int]]:
    """(training, held-out) window indices: ``round(held_out · count)`` held out (at least one, never all),
    evenly spaced so that every source of a mixture (whose windows are in source order) is represented."""
    if count < 2:
        raise LrcompressError(f"runtime.distill needs at least 2 calibration windows (one held out); got {count}")
    held_count = min(count - 1, max(1, round(held_out * count)))
    held = sorted({min(count - 1, int((j + 0.5) * count / held_count)) for j in range(held_count)})
    return [i for i in range(count) if i not in held], held


@torch.no_grad()
def teacher_states(model: nn.Module, adapter: ArchitectureAdapter, windows: torch.Tensor, batch: int,
                   device: torch.device) -> torch.Tensor:
    """The model's last decoder layer outputs (the final norm's input) for every window, on the CPU in float32;
    the head on the first batch's is checked against the model's own logits (a family whose logit head
    ``head_logits`` does not reproduce is refused, not distilled toward wrong targets)."""
    norm = model.get_submodule(adapter.final_norm)
    kept: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda _m, args, _o: kept.append(args[0].detach().float().cpu()))
    first: torch.Tensor | None = None
    try:
        for start in range(0, len(windows), batch):
            ids = windows[start:start + batch].to(device)
            if first is None:                  # the first window's logits, for the check; then none are needed
                first = model(input_ids=ids, use_cache=False).logits[:1].clone()
            else:                              # logits_to_keep=1: the LM head runs on one position only
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    _check_head(model, adapter, kept[0][:1].to(device), first)    # after: the check runs the final norm too
    return torch.cat(kept)


def _check_head(model: nn.Module, adapter: ArchitectureAdapter, hidden: torch.Tensor, logits: torch.Tensor) -> None:
    rebuilt = adapter.head_logits(model, hidden.to(logits.dtype)).float()
    scale = float(logits.float().abs().max()) or 1.0
    if not torch.allclose(rebuilt, logits.float(), atol=1e-3 * scale, rtol=1e-3):
        raise LrcompressError(f"runtime.distill: the logits of {type(model).__name__} cannot be rebuilt from its last "
                              "decoder layer's outputs (final norm + LM head + the config's logit settings); "
                              "this family is not supported by runtime.distill")


@dataclass
class _Student:
    """The model being distilled, its windows and teacher states, and where it runs."""

    model: nn.Module
    adapter: ArchitectureAdapter
    windows: torch.Tensor
    teacher: torch.Tensor
    config: DistillConfig
    device: torch.device
    names: dict[int, str] = field(default_factory=dict)     # parameter id -> its name, for NaN messages

    def loss(self, indices: list[int]) -> torch.Tensor:
        """Mean per-token divergence (``config.divergence``) on the windows ``indices`` (one forward)."""
        ids = self.windows[indices].to(self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits
        with torch.no_grad():
            target = self.adapter.head_logits(self.model, self.teacher[indices].to(self.device))
        return kl_per_token(logits, target, self.config.temperature, self.config.reverse_share)

    @torch.no_grad()
    def mean_kl(self, indices: list[int]) -> float:
        """Per-token KL over ``indices`` (float64 sum of the micro-batches' means, weighted by windows)."""
        step = self.config.micro_batch
        total = sum(float(self.loss(indices[i:i + step])) * len(indices[i:i + step]) for i in range(0, len(indices), step))
        return total / len(indices)


def _schedule(total: int, warmup: float) -> Callable[[int], float]:
    """The lr multiplier: linear warm-up over ``warmup`` · total steps (at least one when > 0), then a cosine
    from 1 to 0 over the rest."""
    ramp = max(1, round(warmup * total)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        return 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, total - ramp)))
    return factor


def _check_gradients(student: _Student, params: list[nn.Parameter], step: int) -> None:
    for parameter in params:
        if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
            raise NumericalError(f"runtime.distill: the gradient of {student.names.get(id(parameter), '?')} holds "
                                 f"NaN/Inf at step {step} (try a smaller runtime.distill.lr)")


def _step(student: _Student, batch: list[int], params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
          step: int) -> float:
    """One AdamW step on ``batch`` (gradients accumulated ``micro_batch`` windows at a time); its mean KL."""
    optimizer.zero_grad(set_to_none=True)
    size, total = student.config.micro_batch, 0.0
    for start in range(0, len(batch), size):
        part = batch[start:start + size]
        loss = student.loss(part)
        if not torch.isfinite(loss):
            raise NumericalError(f"runtime.distill: the KL is {loss.item()} at step {step} (non-finite logits; "
                                 "check the compressed model, or try a smaller runtime.distill.lr)")
        (loss * len(part) / len(batch)).backward()
        total += float(loss.detach()) * len(part)
    _check_gradients(student, params, step)
    optimizer.step()
    return total / len(batch)


@dataclass
class _Best:
    """The best held-out state so far (CPU copies of the trained parameters) and its step."""

    kl: float
    step: int = 0
    state: list[torch.Tensor] | None = None

    def offer(self, kl: float, step: int, params: list[nn.Parameter]) -> bool:
        if not kl < self.kl:
            return False
        self.kl, self.step = kl, step
        self.state = [p.detach().to("cpu", copy=True) for p in params]
        return True


@torch.enable_grad()
def _train(student: _Student, train: list[int], held: list[int], params: list[nn.Parameter],
           report: DistillReport) -> _Best:
    """AdamW over ``epochs`` passes of ``train``; the held-out KL after every ``1/evals_per_epoch`` epoch."""
    config = student.config
    per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.epochs * per_epoch
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, config.warmup))
    evals = {round(per_epoch * (k + 1) / config.evals_per_epoch) for k in range(config.evals_per_epoch)}
    generator = torch.Generator().manual_seed(config.seed)
    best, step, seen = _Best(report.held_out_before), 0, []
    best.state = [p.detach().to("cpu", copy=True) for p in params]        # step 0: the factors as compressed
    for epoch in range(config.epochs):
        order = [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]
        for position in range(per_epoch):
            step += 1
            began = time.perf_counter()
            seen.append(_step(student, order[position * config.batch_size:(position + 1) * config.batch_size],
                              params, optimizer, step))
            log.info("distill step %d/%d: KL %.4f, lr %.3g, %.1fs", step, total, seen[-1],
                     optimizer.param_groups[0]["lr"], time.perf_counter() - began)
            schedule.step()
            if position + 1 in evals:
                kl = student.mean_kl(held)
                kept = best.offer(kl, step, params)
                report.curve.append({"step": step, "epoch": epoch + 1, "train_kl": sum(seen) / len(seen),
                                     "held_out_kl": kl, "lr": optimizer.param_groups[0]["lr"]})
                log.info("distill step %d/%d (epoch %d): train KL %.4f, held-out KL %.4f%s", step, total, epoch + 1,
                         sum(seen) / len(seen), kl, " (best so far)" if kept else "")
                seen = []
    report.steps = step
    return best


def distill_model(model: nn.Module, adapter: ArchitectureAdapter, windows: torch.Tensor, teacher: torch.Tensor,
                  config: DistillConfig) -> DistillReport:
    """Distil ``model``'s factors in place toward the teacher states ``teacher`` (``teacher_states`` of the
    original model on ``windows``); returns the report. The model runs on the device its parameters are on."""
    started = time.perf_counter()
    params = trainable_parameters(adapter.decoder_layers(model), ["factors"])
    if not params:
        raise LrcompressError("runtime.distill: the compressed model has no float factors to train (low-rank pairs "
                              "or sparse dictionaries; quantized or pruned weights are not distilled)")
    device = params[0].device
    train, held = split_windows(len(windows), config.held_out)
    student = _Student(model, adapter, windows, teacher, config, device,
                       {id(p): name for name, p in model.named_parameters()})
    with Trainable(model, params):
        before = student.mean_kl(held)
        log.info("distill: %d trained values, %d training and %d held-out windows; held-out %s KL before %.4f",
                 sum(p.numel() for p in params), len(train), len(held), config.divergence, before)
        report = DistillReport(parameters=sum(p.numel() for p in params), divergence=config.divergence,
                               train_windows=len(train),
                               held_out_windows=len(held), steps=0, kept_step=0, reverted=False,
                               held_out_before=before, held_out_after=before)
        best = _train(student, train, held, params, report)
        if config.revert_if_worse:               # the best evaluated state, the compressed one included
            with torch.no_grad():
                for parameter, saved in zip(params, best.state):
                    parameter.copy_(saved)
            report.kept_step, report.held_out_after = best.step, best.kl
        else:                                    # the last state, whatever its held-out KL
            report.kept_step, report.held_out_after = report.steps, report.curve[-1]["held_out_kl"]
        report.reverted = report.kept_step == 0
    report.seconds = time.perf_counter() - started
    return report
