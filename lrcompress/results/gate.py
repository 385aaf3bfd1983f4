"""The regression gate behind ``lrcompress check``: compare a run's metrics with a baseline's.

Metrics are read from the ``eval`` section of a metrics.json (or a baseline cache entry, or the output
of ``lrcompress eval --output``), typed by ``results.metrics``. Each metric carries its protocol; a candidate and a baseline metric are
compared only when they have the same name *and* the same protocol, so lrcompress's token-level
perplexity and lm-eval's word perplexities never meet.

Thresholds (gate-file keys are the flags' names; the old long names are accepted with a warning):
- ``max_ppl_increase`` (``--max-ppl-increase``): every perplexity must satisfy value ≤ baseline·(1 + x);
- ``min_recovery`` (``--min-recovery``): every accuracy must satisfy value / baseline ≥ x;
- ``bounds`` (``--bound``): absolute ``{metric: {min: a, max: b}}``, the metric named as in the table;
- ``confidence`` (``--confidence``, default 0.95) and ``strict`` (``--strict``), below.

Noise. A relative threshold fails only when the regression exceeds the noise: a one-sided z-test of the
difference against the threshold, using both sides' standard errors. For an accuracy with recovery x,
D = value − x·baseline, SE(D) = sqrt(se_run² + x²·se_base²); for a perplexity, on the log scale,
D = log(value) − log(baseline) − log(1 + x), SE(D) = sqrt(sl_run² + sl_base²) with sl the standard error
of log-perplexity (recorded, or se/value by the delta method). With z = −D/SE(D) for accuracies (+D/SE(D)
for perplexities) the verdict is:
- ``pass``: the point estimate meets the threshold;
- ``FAIL``: it does not, and z ≥ z_c (the one-sided normal quantile of ``confidence``, 1.645 at 0.95):
  a regression beyond the noise;
- ``too small``: it does not, but z < z_c: the sample is too small to decide (e.g. 20 documents,
  ±0.11). This does not fail the gate (exit 0, with the verdict and the documents it would take in the
  table): a CI gate must not page people for noise. ``strict`` turns it into a failure (exit 1), for
  gates that must *prove* quality rather than catch regressions.
Without a standard error on either side (e.g. an old metrics.json, one perplexity window) the point
estimate decides, marked "no stderr". Absolute bounds are always point comparisons.
"""
from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass
from statistics import NormalDist
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import LrcompressError
from ..eval.lm_eval_tasks import LOWER_IS_BETTER
from .metrics import read_eval_section
from ..eval.perplexity import PerplexityResult
from ..eval.section import EvalSection, LmEvalResult

log = logging.getLogger(__name__)


class GateInputError(LrcompressError):
    """A metrics file, baseline or gate file that cannot be read or compared (exit code 2)."""


@dataclass
class Metric:
    name: str               # "perplexity wikitext2/test", "arc_easy acc"
    value: float | None
    stderr: float | None
    kind: str               # "perplexity" (lower is better), "accuracy" (higher), "other" (bounds only)
    protocol: str
    log_stderr: float | None = None    # perplexities: the standard error of log(value)

    def log_se(self) -> float | None:
        """SE of log(value): recorded, or by the delta method from the value's own SE."""
        if self.log_stderr is not None:
            return self.log_stderr
        if self.stderr is not None and self.value:
            return self.stderr / self.value
        return None


class Bound(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: float | None = None
    max: float | None = None


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_ppl_increase: float | None = Field(None, ge=0)
    min_recovery: float | None = Field(None, ge=0)
    bounds: dict[str, Bound] = Field(default_factory=dict)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    strict: bool = False

    @property
    def z_critical(self) -> float:
        return NormalDist().inv_cdf(self.confidence)


DEPRECATED_KEYS = {"max_perplexity_increase": "max_ppl_increase", "min_accuracy_recovery": "min_recovery"}
FLAGS = {"max_ppl_increase": "--max-ppl-increase", "min_recovery": "--min-recovery", "bounds": "--bound",
         "confidence": "--confidence", "strict": "--strict"}


@dataclass
class Check:
    metric: str
    protocol: str
    value: float | None
    baseline: float | None
    bound: str
    passed: bool
    verdict: str = ""           # "pass", "FAIL", "too small" (inconclusive); "" = from ``passed``
    note: str = ""              # z and what it would take, for the table

    def __post_init__(self) -> None:
        self.verdict = self.verdict or ("pass" if self.passed else "FAIL")


@dataclass
class GateResult:
    checks: list[Check]
    strict: bool = False

    @property
    def inconclusive(self) -> list[Check]:
        return [check for check in self.checks if check.verdict == "too small"]

    @property
    def passed(self) -> bool:
        """No regression beyond the noise (and, when strict, nothing too small to decide)."""
        return all(check.passed for check in self.checks) and not (self.strict and self.inconclusive)


def perplexity_metrics(results: dict[str, PerplexityResult]) -> dict[str, Metric]:
    return {f"perplexity {key}": Metric(f"perplexity {key}", result.value, _number(result.stderr), "perplexity",
                                        result.protocol, _number(result.log_stderr))
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


def _renamed_keys(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The flags' names; an old key still works, with a deprecation message."""
    for old, new in DEPRECATED_KEYS.items():
        if old in data:
            if new in data:
                raise GateInputError(f"{where}: both {old!r} (deprecated) and {new!r} given; keep {new!r}")
            log.warning("%s: gate key %r is deprecated; use %r (as the flag %s)", where, old, new, FLAGS[new])
            data[new] = data.pop(old)
    return data


def _key_error(item: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in item["loc"])
    if item["type"] != "extra_forbidden":
        return f"{key}: {item['msg']}"
    hint = difflib.get_close_matches(str(item["loc"][-1]), list(FLAGS) + list(DEPRECATED_KEYS), n=1) \
        if len(item["loc"]) == 1 else []
    return f"{key}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "") + \
        (f"; keys: {', '.join(FLAGS)}" if len(item["loc"]) == 1 else "")


def load_gate_file(path: Path) -> GateConfig:
    if not path.is_file():
        raise GateInputError(f"{path}: no such gate file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise GateInputError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise GateInputError(f"{path}: a gate file is a mapping of thresholds ({', '.join(FLAGS)})")
    try:
        return GateConfig.model_validate(_renamed_keys(data, str(path)))
    except ValidationError as error:
        raise GateInputError(f"{path}: invalid gate file: {'; '.join(map(_key_error, error.errors()))}") from None


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


def gate_from_options(gate_file: Path | None, max_ppl_increase: float | None, min_recovery: float | None,
                      bounds: list[str], confidence: float | None = None, strict: bool | None = None) -> GateConfig:
    """The gate file's thresholds, overridden by command-line flags."""
    data = load_gate_file(gate_file).model_dump() if gate_file else {}
    flags = {"max_ppl_increase": max_ppl_increase, "min_recovery": min_recovery, "confidence": confidence,
             "strict": strict}
    data.update({key: value for key, value in flags.items() if value is not None})
    data.setdefault("bounds", {}).update({name: bound.model_dump() for name, bound in map(parse_bound, bounds)})
    try:
        return GateConfig.model_validate(data)
    except ValidationError as error:
        raise GateInputError("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                       for e in error.errors())) from None


def _noise_verdict(metric: Metric, base: Metric, gate: GateConfig, excess: float, se: float | None,
                   bound: str) -> Check:
    """``excess`` > 0: by how much the point estimate misses the threshold (in ``se``'s units)."""
    if excess <= 0:
        return Check(metric.name, metric.protocol, metric.value, base.value, bound, True, "pass")
    if se is None or se <= 0:
        return Check(metric.name, metric.protocol, metric.value, base.value, bound, False, "FAIL", "no stderr")
    z = excess / se
    if z >= gate.z_critical:
        return Check(metric.name, metric.protocol, metric.value, base.value, bound, False, "FAIL",
                     f"z = {z:.2f} ≥ {gate.z_critical:.2f}")
    # the same miss would be significant with (z_c / z)² times the documents (SE ∝ 1/sqrt(n))
    return Check(metric.name, metric.protocol, metric.value, base.value, bound, True, "too small",
                 f"z = {z:.2f} < {gate.z_critical:.2f}: within the noise at confidence {gate.confidence:g}; "
                 f"~{(gate.z_critical / z) ** 2:.1f}× the documents would decide")


def _relative_check(metric: Metric, base: Metric, gate: GateConfig) -> Check | None:
    value, reference = metric.value, base.value
    if metric.kind == "perplexity" and gate.max_ppl_increase is not None:
        if reference is None:
            return Check(metric.name, metric.protocol, value, None, "baseline missing", False)
        limit = reference * (1 + gate.max_ppl_increase)
        bound = f"≤ {limit:.4g} (+{100 * gate.max_ppl_increase:g}%)"
        if value is None or not math.isfinite(value) or value <= 0 or reference <= 0:
            return Check(metric.name, metric.protocol, value, reference, bound, value is not None and value <= limit)
        run_se, base_se = metric.log_se(), base.log_se()
        se = math.hypot(run_se, base_se) if run_se is not None and base_se is not None else None
        return _noise_verdict(metric, base, gate, math.log(value) - math.log(limit), se, bound)
    if metric.kind == "accuracy" and gate.min_recovery is not None:
        if reference is None:
            return Check(metric.name, metric.protocol, value, None, "baseline missing", False)
        limit = reference * gate.min_recovery
        bound = f"≥ {limit:.4g} (recovery {gate.min_recovery:g})"
        if value is None:
            return Check(metric.name, metric.protocol, value, reference, bound, False)
        se = math.hypot(metric.stderr, gate.min_recovery * base.stderr) \
            if metric.stderr is not None and base.stderr is not None else None
        return _noise_verdict(metric, base, gate, limit - value, se, bound)
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
    if gate.max_ppl_increase is None and gate.min_recovery is None and not gate.bounds:
        raise GateInputError("no threshold given: use --max-ppl-increase, --min-recovery, --bound or --gate FILE")
    checks: list[Check] = []
    relative = gate.max_ppl_increase is not None or gate.min_recovery is not None
    if relative:
        for name, base in baseline.items():
            metric = candidate.get(name)
            if metric is None:
                if (base.kind == "perplexity" and gate.max_ppl_increase is not None) or \
                        (base.kind == "accuracy" and gate.min_recovery is not None):
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
    return GateResult(checks, gate.strict)


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
        needs_baseline = gate.max_ppl_increase is not None or gate.min_recovery is not None
        if needs_baseline and not baseline:
            raise GateInputError(f"{metrics_path}: no --baseline given and the run has no dense baseline "
                                 "(recipe eval.baseline: true)")
    return evaluate_gate(candidate, baseline, gate)
