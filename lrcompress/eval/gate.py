"""The regression gate behind ``lrcompress check``: compare a run's metrics with a baseline's.

Metrics are read from the ``eval`` section of a metrics.json (or a baseline cache entry, or the output
of ``lrcompress eval --output``), typed by ``eval.metrics``. Each metric carries its protocol; a candidate and a baseline metric are
compared only when they have the same name *and* the same protocol, so lrcompress's token-level
perplexity and lm-eval's word perplexities never meet.

Thresholds:
- ``max_perplexity_increase``: relative, every perplexity must satisfy value ≤ baseline·(1 + x);
- ``min_accuracy_recovery``: every accuracy must satisfy value / baseline ≥ x;
- ``bounds``: absolute ``{metric: {min: a, max: b}}``, the metric named as in the table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import LrcompressError
from .lm_eval_tasks import LOWER_IS_BETTER
from .metrics import EvalSection, LmEvalResult, read_eval_section
from .perplexity import PerplexityResult


class GateInputError(LrcompressError):
    """A metrics file, baseline or gate file that cannot be read or compared (exit code 2)."""


@dataclass
class Metric:
    name: str               # "perplexity wikitext2/test", "arc_easy acc"
    value: float | None
    stderr: float | None
    kind: str               # "perplexity" (lower is better), "accuracy" (higher), "other" (bounds only)
    protocol: str


class Bound(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_perplexity_increase: float | None = Field(None, ge=0)
    min_accuracy_recovery: float | None = Field(None, ge=0)
    bounds: dict[str, Bound] = Field(default_factory=dict)


@dataclass
class Check:
    metric: str
    protocol: str
    value: float | None
    baseline: float | None
    bound: str
    passed: bool


@dataclass
class GateResult:
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


def perplexity_metrics(results: dict[str, PerplexityResult]) -> dict[str, Metric]:
    return {f"perplexity {key}": Metric(f"perplexity {key}", result.value, None, "perplexity", result.protocol)
            for key, result in results.items()}


def lm_eval_metrics(results: dict[str, LmEvalResult]) -> dict[str, Metric]:
    metrics = {}
    for task, result in results.items():
        setting = f"{result.samples} documents, {result.num_fewshot}-shot"
        for metric, protocol in result.protocols.items():
            kind = "perplexity" if metric in LOWER_IS_BETTER else "accuracy" if metric.startswith("acc") else "other"
            name = f"{task} {metric}"
            metrics[name] = Metric(name, _number(result.metric(metric)), _number(result.metric(f"{metric}_stderr")),
                                   kind, f"{protocol}; {setting}")
    return metrics


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metrics_of(section: EvalSection, embedded_baseline: bool = False) -> dict[str, Metric]:
    """The metrics of an ``eval`` section; ``embedded_baseline``: its dense baseline instead."""
    if embedded_baseline:
        perplexities, tasks = section.baseline_perplexity, section.baseline_lm_eval
    else:
        perplexities, tasks = section.perplexity, section.lm_eval
    return {**perplexity_metrics(perplexities or {}), **lm_eval_metrics(tasks or {})}


def load_gate_file(path: Path) -> GateConfig:
    if not path.is_file():
        raise GateInputError(f"{path}: no such gate file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return GateConfig.model_validate(data)
    except yaml.YAMLError as error:
        raise GateInputError(f"{path}: not valid YAML: {error}") from None
    except ValidationError as error:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: "
                            f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}" for e in error.errors())
        raise GateInputError(f"{path}: invalid gate file: {details}") from None


def parse_bound(text: str) -> tuple[str, Bound]:
    """``"arc_easy acc>=0.4"`` or ``"perplexity wikitext2/test<=30"``."""
    for operator, field in ((">=", "min"), ("<=", "max")):
        if operator in text:
            name, raw = text.rsplit(operator, 1)
            try:
                return name.strip(), Bound(**{field: float(raw)})
            except ValueError:
                break
    raise GateInputError(f"--bound {text!r}: expected 'METRIC<=NUMBER' or 'METRIC>=NUMBER'")


def gate_from_options(gate_file: Path | None, max_perplexity_increase: float | None,
                      min_accuracy_recovery: float | None, bounds: list[str]) -> GateConfig:
    """The gate file's thresholds, overridden by command-line flags."""
    data = load_gate_file(gate_file).model_dump() if gate_file else {}
    if max_perplexity_increase is not None:
        data["max_perplexity_increase"] = max_perplexity_increase
    if min_accuracy_recovery is not None:
        data["min_accuracy_recovery"] = min_accuracy_recovery
    data.setdefault("bounds", {}).update({name: bound.model_dump() for name, bound in map(parse_bound, bounds)})
    try:
        return GateConfig.model_validate(data)
    except ValidationError as error:
        raise GateInputError("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                       for e in error.errors())) from None


def _relative_check(metric: Metric, base: Metric, gate: GateConfig) -> Check | None:
    value, reference = metric.value, base.value
    if metric.kind == "perplexity" and gate.max_perplexity_increase is not None:
        if reference is None:
            return Check(metric.name, metric.protocol, value, None, "baseline missing", False)
        limit = reference * (1 + gate.max_perplexity_increase)
        ok = value is not None and math.isfinite(value) and value <= limit
        return Check(metric.name, metric.protocol, value, reference,
                     f"≤ {limit:.4g} (+{100 * gate.max_perplexity_increase:g}%)", ok)
    if metric.kind == "accuracy" and gate.min_accuracy_recovery is not None:
        if reference is None:
            return Check(metric.name, metric.protocol, value, None, "baseline missing", False)
        limit = reference * gate.min_accuracy_recovery
        ok = value is not None and value >= limit
        return Check(metric.name, metric.protocol, value, reference,
                     f"≥ {limit:.4g} (recovery {gate.min_accuracy_recovery:g})", ok)
    return None


def _absolute_check(metric: Metric, bound: Bound, reference: float | None) -> Check:
    value = metric.value
    ok = value is not None and math.isfinite(value)
    parts = []
    if bound.min is not None:
        ok = ok and value >= bound.min
        parts.append(f"≥ {bound.min:g}")
    if bound.max is not None:
        ok = ok and value <= bound.max
        parts.append(f"≤ {bound.max:g}")
    return Check(metric.name, metric.protocol, value, reference, " and ".join(parts) + " (absolute)", ok)


def evaluate_gate(candidate: dict[str, Metric], baseline: dict[str, Metric], gate: GateConfig) -> GateResult:
    """Every relative threshold on every metric both sides share, plus every absolute bound."""
    if gate.max_perplexity_increase is None and gate.min_accuracy_recovery is None and not gate.bounds:
        raise GateInputError("no threshold given: use --max-ppl-increase, --min-recovery, --bound or --gate FILE")
    checks: list[Check] = []
    relative = gate.max_perplexity_increase is not None or gate.min_accuracy_recovery is not None
    if relative:
        for name, base in baseline.items():
            metric = candidate.get(name)
            if metric is None:
                if (base.kind == "perplexity" and gate.max_perplexity_increase is not None) or \
                        (base.kind == "accuracy" and gate.min_accuracy_recovery is not None):
                    checks.append(Check(name, base.protocol, None, base.value, "missing in the run", False))
                continue
            if metric.protocol != base.protocol:
                raise GateInputError(f"{name}: measured under different protocols, not comparable:\n"
                                     f"  run:      {metric.protocol}\n  baseline: {base.protocol}")
            check = _relative_check(metric, base, gate)
            if check is not None:
                checks.append(check)
        if not checks:
            raise GateInputError("the run and the baseline share no perplexity or accuracy metric "
                                 f"(run: {', '.join(candidate) or 'none'}; baseline: {', '.join(baseline) or 'none'})")
    for name, bound in gate.bounds.items():
        if name not in candidate:
            raise GateInputError(f"bound on {name!r}: no such metric in the run (metrics: {', '.join(candidate)})")
        reference = baseline[name].value if name in baseline else None
        checks.append(_absolute_check(candidate[name], bound, reference))
    return GateResult(checks)


def run_gate(metrics_path: Path, baseline_path: Path | None, gate: GateConfig) -> GateResult:
    """Read the files and evaluate; without a baseline file the run's own dense baseline is used."""
    section = read_eval_section(metrics_path)
    candidate = metrics_of(section)
    if not candidate:
        raise GateInputError(f"{metrics_path}: eval section holds no perplexity or lm-eval result")
    if baseline_path is not None:
        baseline = metrics_of(read_eval_section(baseline_path))
    else:
        baseline = metrics_of(section, embedded_baseline=True)
        needs_baseline = gate.max_perplexity_increase is not None or gate.min_accuracy_recovery is not None
        if needs_baseline and not baseline:
            raise GateInputError(f"{metrics_path}: no --baseline given and the run has no dense baseline "
                                 "(recipe eval.baseline: true)")
    return evaluate_gate(candidate, baseline, gate)
