"""The recipe: a YAML file validated before any work starts.

Every section forbids unknown keys. Stage options are validated against the chosen method's own
config schema, so a typo such as ``ratoi`` is reported as ``stages.0.ratoi`` together with the file.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_serializer, model_validator)

from .compressor import COMPRESSORS, CompressorConfig
from .compressor.quantgrid import QuantConfig
from .errors import RecipeError

DEFAULT_TARGETS = ["*"]  # every nn.Linear inside the decoder layers (the adapter defines that set)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Section):
    path: str = Field(description="local HF directory, safetensors directory, .gguf file or hub id")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    trust_remote_code: bool = False


class DataSpec(Section):
    """A dataset reference (``data.sources``): a known name, a local .txt/.jsonl/.parquet file or a hub id."""

    dataset: str = Field("wikitext2", description="wikitext2, a .txt/.jsonl/.parquet path, or a hub dataset id")
    config: str | None = Field(None, description="hub dataset config (e.g. wikitext-2-raw-v1)")
    split: str = "validation"
    text_column: str = Field("text", description="the column (or JSON field) holding the text")


class CalibrationSource(DataSpec):
    """One source of a calibration mixture (``calibration.sources``): its own data and its own windows."""

    num_samples: int = Field(ge=1, description="windows drawn from this source alone")
    chat_template: bool = Field(False, description="render this source's records with the tokenizer's chat template")


# The keys of the one-source form; with ``sources`` each source carries its own.
SINGLE_SOURCE_KEYS = ("dataset", "config", "split", "text_column", "chat_template")


class CalibrationSpec(DataSpec):
    """The calibration windows: one source (``dataset``, ``split``, ... here) or a mixture (``sources``).

    A mixture tokenizes and windows every source on its own: source i draws its ``num_samples`` windows
    from its own text with the seed ``data.windows.source_seed(seed, i)`` (source 0: ``seed`` itself,
    so a one-source mixture and the one-source form give the same windows, and adding a source leaves
    the others' windows as they were). The windows are concatenated in the order of ``sources``, and
    ``num_samples`` is their sum."""

    chat_template: bool = Field(False, description="render each record with the tokenizer's chat template "
                                                   "(instruct models; a 'messages' column or plain text)")
    num_samples: int = Field(32, ge=1)
    seq_len: int = Field(512, ge=2)
    seed: int = 0
    sources: list[CalibrationSource] | None = Field(
        None, min_length=1, description="a mixture: several datasets with a number of windows each (instead of "
                                        "dataset/config/split/text_column/chat_template)")

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("sources") is not None:
            for key in SINGLE_SOURCE_KEYS:
                if key in value:
                    raise ValueError(f"calibration.{key} is given beside calibration.sources: a mixture names "
                                     f"its data in each source; move {key} into the sources (or drop sources)")
        return value

    @model_validator(mode="after")
    def _total(self) -> "CalibrationSpec":
        if self.sources is not None:
            total = sum(source.num_samples for source in self.sources)
            if "num_samples" in self.model_fields_set and self.num_samples != total:
                raise ValueError(f"calibration.num_samples is {self.num_samples} but the sources' num_samples sum "
                                 f"to {total}: with sources, leave num_samples out (it is their sum)")
            self.num_samples = total
        return self

    @model_serializer(mode="wrap")
    def _one_form_dump(self, handler: Any) -> dict[str, Any]:
        """The form that was given: a one-source section dumps as before mixtures existed (so its recipe
        and resume fingerprints are unchanged), a mixture without the unused one-source keys."""
        data = handler(self)
        if self.sources is None:
            data.pop("sources", None)
        else:
            for key in SINGLE_SOURCE_KEYS:
                data.pop(key, None)
        return data

    @property
    def is_mixture(self) -> bool:
        return self.sources is not None

    def parts(self) -> list[CalibrationSource]:
        """The sources in order; the one-source form as a single source of ``num_samples`` windows."""
        if self.sources is not None:
            return list(self.sources)
        return [CalibrationSource(dataset=self.dataset, config=self.config, split=self.split,
                                  text_column=self.text_column, num_samples=self.num_samples,
                                  chat_template=self.chat_template)]

    @property
    def uses_chat_template(self) -> bool:
        return any(part.chat_template for part in self.parts())


class AllocationSpec(Section):
    """How a stage spreads its size over its modules (docs/budget.md).

    ``uniform``: every module gets the method's own ratio (or rank). ``spectrum`` and ``global``: the
    method's ratio (or rank) sets one budget for all the stage's modules together, and each module's
    rank is chosen from the whitened spectra of the uncompressed model (a pre-pass). ``floor`` and
    ``ceiling`` bound every module's rank as fractions of its largest useful rank."""

    strategy: Literal["uniform", "spectrum", "global"] = "uniform"
    floor: float = Field(0.1, ge=0.0, le=1.0, description="smallest rank, as a fraction of the module's largest")
    ceiling: float = Field(1.0, gt=0.0, le=1.0, description="largest rank, as a fraction of the module's largest")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"strategy": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _ordered(self) -> "AllocationSpec":
        if self.floor > self.ceiling:
            raise ValueError(f"floor {self.floor} is above ceiling {self.ceiling}")
        return self


def _compiled(patterns: list[str]) -> list[str]:
    """Target patterns: globs, or regular expressions after 're:' (which must compile)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({error}); "
                                 "patterns without 're:' are globs") from None
    return patterns


def _known(method: str) -> str:
    if method not in COMPRESSORS:
        hint = difflib.get_close_matches(method, COMPRESSORS, n=1)
        raise ValueError(f"unknown method {method!r}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; known: {', '.join(sorted(COMPRESSORS))}")
    return method


class StageSpec(Section):
    """One compression stage. Method options sit beside ``method`` and are checked by the method."""

    model_config = ConfigDict(extra="allow")
    method: str
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    ignore: list[str] = Field(default_factory=list)
    allocation: AllocationSpec = Field(default_factory=AllocationSpec,
                                       description="uniform | spectrum | global, or a mapping with floor/ceiling")
    allow_growth: bool = Field(False, description="accept modules that this stage would not shrink (a rank at "
                                                  "or above the break-even m·n/(m+n)); refused by default")

    _patterns_compile = field_validator("targets", "ignore")(lambda patterns: _compiled(patterns))
    _known_method = field_validator("method")(lambda method: _known(method))

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RefineSpec(Section):
    """``runtime.refine``: after each decoder layer is compressed, a short Adam refinement of its trainable
    parameters toward the uncompressed model's outputs of that layer (lrcompress.pipeline.refine,
    docs/refine.md). The shuffle of each layer's batches is seeded from the recipe's ``seed``."""

    epochs: int = Field(8, ge=1, description="passes over the training batches (one Adam step per batch)")
    lr: float = Field(3e-4, gt=0.0, description="Adam's peak learning rate, decayed to 0 on a cosine")
    parameters: list[Literal["factors", "norms", "biases"]] = Field(
        default_factory=lambda: ["factors"], min_length=1,
        description="what is trained: factors (both factors of every low-rank module, a sparse dictionary's atoms "
                    "and nonzero values), norms, biases")
    loss: Literal["mse", "token_relative"] = Field("mse", description="mean squared error, or per token relative")
    holdout: float = Field(0.125, ge=0.0, lt=1.0, description="fraction of the batches held out (the last ones): "
                                                              "never trained on, the honest before/after")
    revert_if_worse: bool = Field(True, description="undo a layer's refinement when its held-out loss did not drop")


class DistillSpec(Section):
    """``runtime.distill``: after the layer walk, a short end-to-end distillation of the compressed modules'
    float factors toward the original model's next-token distributions on the calibration windows
    (forward KL by default; reverse or a mixture with ``divergence``; lrcompress.pipeline.distill,
    docs/distill.md). Seeded from the recipe's ``seed``."""

    epochs: int = Field(1, ge=1, description="passes over the training windows")
    lr: float = Field(2e-5, gt=0.0, description="AdamW's peak learning rate (linear warm-up, then cosine decay to 0)")
    batch_size: int = Field(4, ge=1, description="windows per AdamW step (gradients accumulated window by window)")
    micro_batch: int = Field(1, ge=1, description="windows per forward/backward call (memory: the logits and the "
                                                   "autograd graph of that many windows)")
    held_out: float = Field(0.125, gt=0.0, lt=1.0, description="fraction of the calibration windows never trained on "
                                                               "(spread over the mixture): the keep/revert guard")
    warmup: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of the steps with a linear warm-up of the lr")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's decoupled weight decay")
    windows_scale: int = Field(1, ge=1, description="distil on this many times each calibration source's windows, "
                                                    "drawn from the same texts with the calibration's seed (1: the "
                                                    "calibration windows themselves)")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature of both distributions (loss × T²)")
    evals_per_epoch: int = Field(2, ge=1, description="held-out evaluations per epoch; the best state is kept")
    revert_if_worse: bool = Field(True, description="keep the factors as compressed when no evaluated state beats "
                                                    "them on the held-out windows")
    divergence: Literal["forward", "reverse", "mixed"] = Field(
        "forward", description="forward: KL(original ‖ compressed), mass-covering; reverse: KL(compressed ‖ "
                               "original), mode-seeking; mixed: (1 − reverse_weight)·forward + reverse_weight·reverse")
    reverse_weight: float | None = Field(None, gt=0.0, lt=1.0, description="divergence: mixed only: the reverse "
                                                                         "KL's weight (unset: 0.5)")

    @model_validator(mode="after")
    def _weight_needs_mixed(self) -> "DistillSpec":
        if self.reverse_weight is not None and self.divergence != "mixed":
            raise ValueError(f"reverse_weight applies only to divergence: mixed (divergence is {self.divergence})")
        return self

    @property
    def reverse_share(self) -> float:
        """β of the objective (1 − β)·KL(p ‖ q) + β·KL(q ‖ p): 0 forward, 1 reverse, ``reverse_weight`` mixed."""
        if self.divergence == "mixed":
            return 0.5 if self.reverse_weight is None else self.reverse_weight
        return 1.0 if self.divergence == "reverse" else 0.0


class BudgetStepSpec(Section):
    """A method and its options; a list value lists alternatives (``bits: [3, 4]`` with
    ``group_size: [32, 128]`` is four)."""

    model_config = ConfigDict(extra="allow")
    method: str

    _known_method = field_validator("method")(lambda method: _known(method))

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def alternatives(self) -> list[dict[str, Any]]:
        """Every combination of the listed alternatives, in order (the last option varies fastest)."""
        combos: list[dict[str, Any]] = [{}]
        for key, value in self.options.items():
            combos = [{**c, key: v} for c in combos for v in (value if isinstance(value, list) else [value])]
        return combos


class BudgetChoiceSpec(BudgetStepSpec):
    """One allowed choice of a byte budget: a method, and optionally methods applied after it to the same
    module (``then: [{method: eora, rank: [32, 64]}]``: a compensation of the first one's error)."""

    then: list[BudgetStepSpec] = Field(default_factory=list, description="methods applied after this one to "
                                                                         "the same module, in order")

    def expanded(self) -> list[list[tuple[str, dict[str, Any]]]]:
        """Every combination of every step's alternatives: a list of (method, options) per choice."""
        chains: list[list[tuple[str, dict[str, Any]]]] = [[(self.method, o)] for o in self.alternatives()]
        for step in self.then:
            chains = [chain + [(step.method, o)] for chain in chains for o in step.alternatives()]
        return chains


class BudgetSpec(Section):
    """A byte budget for the whole model (docs/budget.md, "A byte budget for the model"): one choice per
    target module among ``choices``, all chosen together from one estimate of loss per byte. Replaces
    ``stages``."""

    bytes: int | None = Field(None, ge=1, description="the model's stored bytes (every tensor, tied ones once)")
    mib: float | None = Field(None, gt=0, description="the same in MiB (2^20 bytes)")
    bits_per_weight: float | None = Field(None, gt=0, description="bytes of the targets (codes, scales, factors, "
                                                                   "biases) per weight value of the targets, × 8")
    choices: list[BudgetChoiceSpec] = Field(min_length=1, description="allowed choices per module")
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    ignore: list[str] = Field(default_factory=list)
    solver: Literal["auto", "dp", "greedy"] = Field("auto", description="dp: exact (a table over the bytes); "
                                                    "greedy: convex-hull greedy; auto: dp where the table is small")

    _patterns_compile = field_validator("targets", "ignore")(lambda patterns: _compiled(patterns))

    @model_validator(mode="after")
    def _one_size(self) -> "BudgetSpec":
        given = [k for k in ("bytes", "mib", "bits_per_weight") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'bytes', 'mib' or 'bits_per_weight'"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    def total_bytes(self, fixed_bytes: int, target_weights: int) -> tuple[int, str]:
        """The whole model's budget in bytes and the size as given, from the bytes outside the targets
        and the targets' weight count (for bits per weight)."""
        if self.bytes is not None:
            return self.bytes, f"{self.bytes:,} bytes"
        if self.mib is not None:
            return int(self.mib * MIB), f"{self.mib:g} MiB"
        return fixed_bytes + int(self.bits_per_weight * target_weights / 8), f"{self.bits_per_weight:g} bits per weight"


MIB = 2**20


class EmbeddingSpec(Section):
    """``embedding``: the token embedding quantized round-to-nearest per group of a row, data-free, before the
    layer walk (docs/quantized-embedding.md). A tied LM head shares its codes (stored once); an untied one
    is quantized on the same grid unless ``untied_lm_head: false``."""

    bits: int = Field(8, ge=2, le=8, description="bits per code")
    group_size: int | None = Field(128, ge=1, description="features of a row sharing one scale/zero (null: the row)")
    symmetric: bool = Field(False, description="zero point fixed at 2^(bits-1), step max|w|/(2^(bits-1)-1) "
                                               "(Q8_0-like); false: the asymmetric min/max grid of rtn")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="storage format of the scales")
    untied_lm_head: bool = Field(True, description="also quantize an untied LM head on this grid (a tied head "
                                                   "always shares the embedding's codes)")

    def grid(self) -> "QuantConfig":
        return QuantConfig(bits=self.bits, group_size=self.group_size, scale_dtype=self.scale_dtype)


class RuntimeSpec(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(4, ge=1, description="calibration windows per forward call")
    offload_device: Literal["cpu", "cuda"] = "cpu"
    sequential: bool = Field(True, description="feed the compressed layer's outputs to the next layer")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    lazy: bool = Field(False, description="meta-device skeleton; each decoder layer is read from the safetensors "
                                          "shards when processed and released after it is written")
    target: Literal["layer", "original"] = Field(
        "layer", description="what a module is fitted to: its own outputs on the inputs it receives (layer) or the "
                             "uncompressed model's outputs (original: one more forward per layer, see "
                             "docs/output-matching.md)")
    target_damping: float = Field(1e-2, ge=0.0, description="λ of the ridge toward W in the target W* (target: "
                                                            "original), relative to mean(diag X̂ᵀX̂)")
    target_blend: float = Field(1.0, ge=0.0, le=1.0,
                                description="α: the fraction of the output-matching correction applied, target "
                                            "W + α(W* − W) (target: original; 1: the full objective)")
    true_sequential: bool | None = Field(
        None, description="within a layer, collect each set of targets sharing an input (q/k/v, o, gate/up, down) "
                          "after the previous set is compressed: one forward per set (default: on for target: "
                          "original only)")
    check_fit: bool = Field(True, description="refuse a run the cost model predicts would not fit this machine's "
                                              "host memory, device memory or disk (lrcompress.pipeline.costs)")
    refine: RefineSpec | None = Field(
        None, description="refine each compressed layer toward the uncompressed model's layer outputs (a mapping "
                          "of RefineSpec keys, or true for the defaults; docs/refine.md)")

    distill: DistillSpec | None = Field(
        None, description="after the layer walk, distil the compressed model's factors toward the original model's "
                          "next-token distributions (a mapping of DistillSpec keys, or true for the defaults; "
                          "docs/distill.md)")

    @field_validator("refine", "distill", mode="before")
    @classmethod
    def _refine_switch(cls, value: Any) -> Any:
        """``refine: true`` / ``distill: true`` is the defaults, ``false`` (or null) is off."""
        return {} if value is True else None if value is False else value

    @model_validator(mode="after")
    def _refine_needs_propagation(self) -> "RuntimeSpec":
        if self.refine is not None and not self.sequential:
            raise ValueError("runtime.refine needs runtime.sequential: true (a refined layer corrects the error "
                             "the compressed layers before it propagate, and its outputs feed the next layer)")
        if self.distill is not None and self.lazy:
            raise ValueError("runtime.distill trains the whole compressed model end to end and needs it resident; "
                             "runtime.lazy: true holds one decoder layer at a time: drop one of them")
        return self


class OutputSpec(Section):
    dir: str = "runs/out"
    overwrite: bool = False
    save: bool = True


class PerplexitySpec(DataSpec):
    split: str = "test"
    seq_len: int = Field(512, ge=2)
    max_windows: int | None = Field(None, ge=1)


class LmEvalSpec(Section):
    """Zero-shot tasks through lm-eval (arc_easy, arc_challenge, piqa, lambada_openai read local files)."""

    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(None, ge=1, description="first N documents of each task (cost)")
    batch_size: int = Field(8, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    include_path: list[str] = Field(default_factory=list, description="directories of your own lm-eval task "
                                                                      "YAMLs (their task names become usable)")

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


# ``eval: {protocol: standard}``: two domains and four zero-shot tasks, the dense model beside
# (README, "The standard evaluation"; the zero-shot average is eval.protocol.zero_shot_average).
STANDARD_EVAL: dict[str, Any] = {
    "perplexity": [{"dataset": "wikitext2", "split": "test", "seq_len": 512, "max_windows": 40},
                   {"dataset": "webtext", "split": "test", "seq_len": 512, "max_windows": 40}],
    "lm_eval": {"tasks": ["arc_easy", "arc_challenge", "piqa", "lambada_openai"], "limit": 200},
    "baseline": True,
}


class EvalSpec(Section):
    protocol: Literal["standard"] | None = Field(
        None, description="standard: WikiText-2 test and web-text test (40 windows of 512 each), arc_easy, "
                          "arc_challenge, piqa and lambada_openai (200 documents each) and the dense baseline; "
                          "keys given beside it replace the protocol's")
    perplexity: list[PerplexitySpec] = Field(default_factory=lambda: [PerplexitySpec()])
    lm_eval: LmEvalSpec | None = None
    baseline: bool = Field(False, description="also evaluate the uncompressed model (cached by fingerprint)")
    allow_calibration_split: bool = Field(False, description="evaluate on the very text used for calibration "
                                                             "(refused by default: the number would be optimistic)")

    @model_validator(mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("protocol") == "standard":
            return {**STANDARD_EVAL, **value}
        return value


class Recipe(Section):
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    stages: list[StageSpec] = Field(default_factory=list)
    budget: BudgetSpec | None = Field(None, description="one byte budget for the model, instead of stages")
    embedding: EmbeddingSpec | None = Field(None, description="quantize the token embedding (and an untied LM "
                                                              "head) before the layer walk; null: keep it")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    data_dir: str | None = Field(None, description="where dataset names resolve to local files")
    seed: int = 0

    # Validated stage configs, by (index, method, options): a stage's config is validated once (parse_recipe
    # checks every one; the run builds its stages from the same objects).
    _configs: dict[tuple[int, str, str], CompressorConfig] = PrivateAttr(default_factory=dict)

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        """Without ``embedding`` a recipe dumps as before the key existed (its fingerprints are unchanged)."""
        data = handler(self)
        if self.embedding is None:
            data.pop("embedding", None)
        return data

    @model_validator(mode="after")
    def _budget_or_stages(self) -> "Recipe":
        if self.budget is not None and self.stages:
            raise ValueError("give either 'stages' or 'budget': a byte budget chooses every target's method itself")
        return self

    def budget_configs(self) -> list[tuple[str, list[tuple[str, CompressorConfig]]]]:
        """(label, [(method, validated config), ...]) of every choice the ``budget`` section allows, in order."""
        if self.budget is None:
            return []
        found: dict[str, list[tuple[str, CompressorConfig]]] = {}
        for choice in self.budget.choices:
            for chain in choice.expanded():
                label = " + ".join(method + "".join(f" {k}={v}" for k, v in options.items())
                                   for method, options in chain)
                found.setdefault(label, [(method, COMPRESSORS[method].Config(**options)) for method, options in chain])
        return list(found.items())

    def stage_config(self, index: int) -> CompressorConfig:
        stage = self.stages[index]
        key = (index, stage.method, json.dumps(stage.options, sort_keys=True, default=repr))
        if key not in self._configs:
            self._configs[key] = COMPRESSORS[stage.method].Config(**stage.options)
        return self._configs[key]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def _format_errors(source: str, error: ValidationError, prefix: tuple[Any, ...] = ()) -> str:
    lines = [f"{source}: invalid recipe"]
    for item in error.errors():
        key = ".".join(str(p) for p in prefix + tuple(item["loc"])) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in item and item["type"] not in ("missing",) and not isinstance(item["input"], dict):
            message += f" (got {item['input']!r})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; the value is parsed as YAML (numbers, booleans, lists)."""
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"--set {override!r}: expected KEY=VALUE, e.g. stages.0.ratio=0.3")
        key, raw = override.split("=", 1)
        node: Any = data
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"--set {override!r}: {key!r} is not a dotted key such as stages.0.ratio")
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, create=True, where=".".join(parts[: depth + 1]), source=source)
        last = parts[-1]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            problem = str(getattr(error, "problem", None) or error).splitlines()[0]
            raise RecipeError(f"--set {key}: the value {raw!r} is not valid YAML ({problem}); quote strings "
                              "and close brackets, e.g. --set 'stages=[{method: svd, ratio: 0.3}]'") from None
        if isinstance(node, list):
            node[_index(node, last, key, source)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise _not_a_section(node, ".".join(parts), source)
    return data


def _index(node: list, part: str, where: str, source: str) -> int:
    """``part`` as an index into ``node``, the list at the key before ``where``'s last part."""
    parent = where.rpartition(".")[0] or "the top level"
    if not part.isdigit():
        raise RecipeError(f"{source}: {parent} is a list of {len(node)}, not a section, so {where} cannot be "
                          f"set (a list's items are named by index: {parent}.0, ...)")
    if int(part) >= len(node):
        raise RecipeError(f"{source}: {where}: {parent} is a list of {len(node)}, it has no item {part}")
    return int(part)


def _not_a_section(node: Any, where: str, source: str) -> RecipeError:
    parent = where.rpartition(".")[0]
    return RecipeError(f"{source}: {parent} is a {type(node).__name__}, not a section, so {where} cannot be set")


def _child(node: Any, part: str, create: bool, where: str, source: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where, source)]
    if not isinstance(node, dict):
        raise _not_a_section(node, where, source)
    if part not in node and create:
        node[part] = {}
    if node[part] is None and create:      # an empty section in the YAML (``eval:``)
        node[part] = {}
    return node[part]


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections (model, calibration, stages, ...)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_format_errors(source, error)) from None
    for index, stage in enumerate(recipe.stages):
        try:
            recipe.stage_config(index)
        except ValidationError as error:
            raise RecipeError(_format_errors(source, error, ("stages", index))) from None
    if recipe.budget is not None:
        _check_budget_choices(recipe.budget, source)
    return recipe


def _check_budget_choices(budget: BudgetSpec, source: str) -> None:
    """Every expanded choice validates against its methods' schemas, and each method can be priced on one
    module at a time from what the pre-pass has: the calibration Gram (and, after the first step of a
    choice, the module's original weight, for a compensation such as EoRA)."""
    from .compressor.block import BlockCompressor

    for index, choice in enumerate(budget.choices):
        steps = [(("budget", "choices", index), choice)] + [(("budget", "choices", index, "then", j), step)
                                                            for j, step in enumerate(choice.then)]
        for position, (where, step) in enumerate(steps):
            cls = COMPRESSORS[step.method]
            needs = cls.needs if isinstance(cls.needs, frozenset) else None      # a property: needs depend on options
            allowed = {"gram"} if position == 0 else {"gram", "original_weight"}
            if issubclass(cls, BlockCompressor) or needs is None or not needs <= allowed:
                what = "whole blocks" if issubclass(cls, BlockCompressor) or needs is None else sorted(needs - allowed)
                raise RecipeError(f"{source}: invalid recipe\n  {'.'.join(map(str, where))}.method: {step.method!r} "
                                  f"cannot be a budget choice{' step' if position else ''}: it needs {what}, and a "
                                  "choice is priced from the calibration Gram of one module"
                                  + ("" if position else " (a compensation such as eora goes under 'then')"))
            for options in step.alternatives():
                try:
                    config = cls.Config(**options)
                except ValidationError as error:
                    raise RecipeError(_format_errors(source, error, where)) from None
                if cls(config).group_size > 1:
                    raise RecipeError(f"{source}: invalid recipe\n  {'.'.join(map(str, where))}.group_size: a "
                                      "budget choice compresses one module at a time")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe file ``path`` with ``overrides`` applied; every way the file can be unreadable is one
    message naming it (and the line, for YAML and encoding errors)."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a directory, not a file; give the YAML file itself")
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    data = _parse_yaml(path, _recipe_text(path))
    data = apply_overrides(data or {}, overrides or [], str(path))
    return parse_recipe(data, str(path))


def _recipe_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise RecipeError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                          "a recipe is a YAML file saved as UTF-8") from None


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = "; ".join(str(part) for part in (error.context, error.problem) if part)
        raise RecipeError(f"{where}: not valid YAML ({problem})") from None
    except yaml.reader.ReaderError as error:    # a control character: a position, no line
        raise RecipeError(f"{path}: not valid YAML ({error.reason}: character #x{error.character:04x} at "
                          f"position {error.position})") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
