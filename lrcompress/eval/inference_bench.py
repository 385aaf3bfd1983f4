"""Inference speed of a compressed checkpoint against its dense original, measured in one process.

Both models are loaded side by side and measured in alternation (dense, compressed, dense, ...), so
that a slow moment of a shared machine hits both; each figure is the median over the repeats.

- prefill: one forward pass over ``prompt_tokens`` tokens (batch ``batch``), tokens/s = batch·prompt/time;
- decode: ``generate`` of exactly ``new_tokens`` greedy tokens after a short prompt, with the KV cache,
  tokens/s = batch·new_tokens/time (the short prompt's prefill is included: it is what a user waits for);
- memory: the bytes of the model's tensors (parameters, buffers, and the layouts compressed modules
  build for inference), and the peak resident set above the level before each pass (activations, KV
  cache, kernel workspaces), sampled during the pass.

Token ids are drawn at random (seeded): speed does not depend on the text.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..checkpoint import read_metadata
from ..errors import LrcompressError
from ..models.loading import load_ready
from ..modules import CompressedModule
from ..pipeline.memory import PeakMemory

DECODE_PROMPT_TOKENS = 16


@dataclass
class InferenceSettings:
    prompt_tokens: int = 512
    new_tokens: int = 64
    batch: int = 1
    threads: int = 2
    repeats: int = 3
    seed: int = 0


@dataclass
class ModelSpeed:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    tensor_bytes: int
    prefill_peak_rss_delta_bytes: int | None
    decode_peak_rss_delta_bytes: int | None
    samples: dict[str, list[float]] = field(default_factory=dict)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model holds, inference layouts of compressed modules included."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers(), *_inference_tensors(model)]:
        seen.setdefault(tensor.data_ptr(), tensor.numel() * tensor.element_size())
    return sum(seen.values())


def _inference_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Tensors that ``prepare_inference`` built (outside the state dict)."""
    return [t for module in model.modules() if isinstance(module, CompressedModule)
            for t in module.inference_tensors()]


def _timed(pass_: Callable[[], Any]) -> tuple[float, int | None]:
    with PeakMemory(torch.device("cpu")) as peak:
        started = time.perf_counter()
        pass_()
        seconds = time.perf_counter() - started
    delta = None if peak.peak_bytes is None or peak.baseline_bytes is None else peak.peak_bytes - peak.baseline_bytes
    return seconds, delta


def _passes(model: nn.Module, settings: InferenceSettings, vocab: int) -> dict[str, Callable[[], Any]]:
    g = torch.Generator().manual_seed(settings.seed)
    prefill_ids = torch.randint(0, vocab, (settings.batch, settings.prompt_tokens), generator=g)
    prompt = torch.randint(0, vocab, (settings.batch, DECODE_PROMPT_TOKENS), generator=g)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else 0

    def prefill() -> None:
        model(input_ids=prefill_ids, use_cache=False)

    def decode() -> None:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=settings.new_tokens,
                             min_new_tokens=settings.new_tokens, do_sample=False, pad_token_id=pad)
        assert out.shape[1] == DECODE_PROMPT_TOKENS + settings.new_tokens

    return {"prefill": prefill, "decode": decode}


def compare_inference(models: dict[str, nn.Module], settings: InferenceSettings) -> dict[str, ModelSpeed]:
    """Measure every model in ``models`` (alternating, after one warm-up pass each)."""
    torch.set_num_threads(settings.threads)
    passes = {name: _passes(model, settings, model.config.vocab_size) for name, model in models.items()}
    seconds: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in models}
    peaks: dict[str, dict[str, list[int]]] = {name: {"prefill": [], "decode": []} for name in models}
    with torch.inference_mode():
        for name in models:                                   # warm-up: allocator, kernels, caches
            for run in passes[name].values():
                run()
        for repeat in range(settings.repeats):
            order = list(models) if repeat % 2 == 0 else list(reversed(models))
            for name in order:
                for kind, run in passes[name].items():
                    took, delta = _timed(run)
                    seconds[name][kind].append(took)
                    if delta is not None:
                        peaks[name][kind].append(delta)
    tokens = {"prefill": settings.batch * settings.prompt_tokens, "decode": settings.batch * settings.new_tokens}
    return {name: ModelSpeed(
        prefill_tokens_per_s=tokens["prefill"] / statistics.median(seconds[name]["prefill"]),
        decode_tokens_per_s=tokens["decode"] / statistics.median(seconds[name]["decode"]),
        tensor_bytes=tensor_bytes(models[name]),
        prefill_peak_rss_delta_bytes=max(peaks[name]["prefill"], default=None),
        decode_peak_rss_delta_bytes=max(peaks[name]["decode"], default=None),
        samples=seconds[name]) for name in models}


def ratios(speeds: dict[str, ModelSpeed], reference: str = "dense") -> dict[str, dict[str, float]]:
    """Every model's speeds and tensor bytes divided by the reference's (speed > 1: faster)."""
    base = speeds[reference]
    return {name: {"prefill": s.prefill_tokens_per_s / base.prefill_tokens_per_s,
                   "decode": s.decode_tokens_per_s / base.decode_tokens_per_s,
                   "tensor_bytes": s.tensor_bytes / base.tensor_bytes}
            for name, s in speeds.items() if name != reference}


def bench_checkpoint(checkpoint: str, dense: str | None, settings: InferenceSettings) -> dict[str, Any]:
    """Load CHECKPOINT and its dense original (``dense``, else the source its provenance names) and
    compare them; returns a JSON-able report."""
    torch.set_num_threads(settings.threads)
    if dense is None:
        _, meta = read_metadata(Path(checkpoint))
        dense = meta.get("provenance", {}).get("model_source")
        if not dense:
            raise LrcompressError(f"{checkpoint} does not name its source model: pass --dense")
    models = {"dense": AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval(),
              "compressed": load_ready(checkpoint)}
    speeds = compare_inference(models, settings)
    return {"checkpoint": str(checkpoint), "dense": str(dense), "settings": asdict(settings),
            "torch": torch.__version__, "speeds": {name: asdict(s) for name, s in speeds.items()},
            "ratios": ratios(speeds)["compressed"]}
