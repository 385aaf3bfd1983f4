"""What a run will cost before it loads a weight: peak host and device memory, disk, and time per phase.

Everything comes from the model's config (a skeleton on the meta device: shapes, no weights), the plan
(``pipeline.plan``: every target with its method and size) and the recipe (calibration size, batch,
devices, lazy or resident, evaluation windows). The model is arithmetic over a few rates (``Rates``):

- time: a GEMM's flops over the device's rate; an SVD of m×n costs ``svd``·m·n·min(m, n), a Cholesky,
  a triangular inverse and an eigh ``cholesky``/``triangular``/``eigh``·n³; a decoder layer's forward
  (2·active params + 4·seq·attention width flops per token) runs at ``forward_<dtype>``; GPTQ's column
  loop costs ``gptq_column`` + ``gptq_column_row``·m per column; reading a shard ``read`` bytes/s, writing a
  finished segment durably ``write`` bytes/s (each is read back once: the journal restores it): "layer I/O".
  Each method's decomposition is written out from its code (``method_seconds``), e.g. ``whiten`` =
  Cholesky + triangular inverse + W·S + SVD + factor·S⁻¹, plus the output-error measure every Linear
  target gets (two n×n products). cospadi and compot (``dictionary_seconds``): whitening, the SVD start,
  per K-SVD iteration the batched OMP (``omp``·m·k·s) and the atom updates (``atom_update``·k·n·m), per
  COMPOT alternation an SVD of n×k, and the value refit (``refit``·m·s³), with s and k from the planned size.
- memory: what is held at once (the model, or one segment of layers plus the tensors outside them with
  ``runtime.lazy``), the activations between layers, the statistics of one layer's targets (float64
  Grams on CPU, float32 on accelerators), and the largest decomposition's workspace, counted from the
  code (``workspace_bytes``).

The CPU constants were measured on this project's development machine (one thread of a 2-core
Xeon with AMX, shared; ``bench/cost_constants.py``) and scale linearly with ``runtime.threads``, an
assumption. The CUDA constants are *estimates* from an H100 SXM's documented peak rates (67 TFLOP/s
float64/float32, 989 TFLOP/s bf16 dense) with assumed efficiencies, until a GPU run measures them:
``scripts/gpu_check.sh`` writes a JSON that ``LRCOMPRESS_COST_RATES=<file>`` loads in their place
(``load_rates``). Predictions against measurements on Llama-3-8B- and Qwen3-30B-A3B-shaped layers:
bench/history/issue31-costs.md.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LrcompressError
from ..models import adapter_for
from ..recipe import Recipe
from .plan import PlannedModule

RATES_ENV = "LRCOMPRESS_COST_RATES"
GIB = 2**30
DEFAULT_EVAL_TOKENS = 300_000      # a split's size when max_windows is not set (WikiText-2 test: ~290k tokens)
EXPERT_COUNT_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
DICTIONARY_ITERATIONS = {"cospadi": 4, "compot": 20}   # the methods' default K-SVD iterations / alternations
TRAIN_FORWARDS = 2.5               # runtime.distill: a window's forward + backward, in forwards (distill_seconds)


@dataclass(frozen=True)
class Rates:
    """Speeds of one device (per thread on CPU). Units: flop/s for ``gemm_*``/``forward_*``, seconds per
    unit of work for the decompositions (m·n·min(m,n) for ``svd``, n³ for the others), seconds per column
    and per column-row for GPTQ's loop, bytes/s for ``read``; ``process_bytes``: host memory of the
    process before the model (python, torch, transformers); the overheads: fixed seconds per module and per
    forward call (what dominates a tiny model, nothing at 8B)."""

    gemm_float32: float
    gemm_float64: float
    gemm_bfloat16: float
    forward_float32: float
    forward_bfloat16: float
    svd: float
    cholesky: float
    triangular: float
    eigh: float
    gptq_column: float
    gptq_column_row: float
    read: float
    process_bytes: float
    source: str
    svd_whitened: float = 0.3            # an SVD of W·S (whitened) takes this fraction of a random matrix's time
    module_overhead: float = 0.005       # seconds per target module outside its linear algebra (python, swap)
    batch_overhead: float = 0.003        # seconds per layer forward call outside its flops
    expert_overhead: float = 0.0045      # seconds per routed expert per MoE forward call (a python loop over them)
    write: float = 2.5e8                 # bytes/s of writing a segment durably (save_file + fsync)
    omp: float = 2.7e-8                  # s per m·k·s of K-SVD's batched OMP (float32, 16 atoms a step)
    atom_update: float = 2.1e-9          # s per k·n·m of K-SVD's rank-1 atom updates (matrix-vector passes)
    refit: float = 2.3e-11               # s per m·s³ of the values' least-squares refit on their supports
    alternation: float = 0.55            # a COMPOT alternation's measured share of its SVD + GEMM count (below)
    device: str = "cpu"

    def gemm(self, dtype: str) -> float:
        return {"float64": self.gemm_float64, "float32": self.gemm_float32}.get(dtype, self.gemm_bfloat16)

    def forward(self, dtype: str) -> float:
        return self.forward_float32 if dtype == "float32" else self.forward_bfloat16

    def scaled(self, threads: int) -> "Rates":
        """``threads`` CPU threads: every rate × threads (linear scaling, an assumption)."""
        if threads <= 1:
            return self
        per = {name: getattr(self, name) for name in ("gemm_float32", "gemm_float64", "gemm_bfloat16",
                                                      "forward_float32", "forward_bfloat16")}
        slow = {name: getattr(self, name) / threads for name in ("svd", "cholesky", "triangular", "eigh",
                                                                 "gptq_column_row")}
        return replace(self, **{k: v * threads for k, v in per.items()}, **slow,
                       source=f"{self.source}, × {threads} threads (assumed linear)")


# Measured here: bench/cost_constants.py, one thread, 2026-12-06 21:54 (load 2.7-3.1 on 2 cores, as during the
# bench/eight_b.py runs; at load 6 GEMMs ran ~1.3× slower). bfloat16 GEMMs run on
# AMX; forward_bfloat16 is assumed = float32's. Cholesky and the triangular inverse at n = 4096 (blocked LAPACK is
# ~2× more efficient there than at the script's 1024-2048). svd_whitened: corrected after the Qwen3-30B-A3B- and
# Llama-3-8B-shaped attention layers (bench/history/issue31-costs.md): gesdd on W·S, whose spectrum decays like
# the activations', took 0.25-0.31 of a random matrix's time.
CPU_RATES = Rates(gemm_float32=6.7e10, gemm_float64=3.3e10, gemm_bfloat16=3.7e11, forward_float32=5.2e10,
                  forward_bfloat16=5.2e10, svd=1.3e-9, cholesky=2.4e-11, triangular=3.2e-11, eigh=2.9e-10,
                  gptq_column=1.8e-4, gptq_column_row=5.4e-7, read=4.4e8, process_bytes=0.55 * GIB,
                  source="measured on this project's CPU (bench/cost_constants.py, 1 thread)")
# Estimates, not measurements: H100 SXM peaks (float64/float32 67 TFLOP/s, bf16 989 TFLOP/s dense) at an
# assumed 50% for GEMMs and 30% for a layer's forward; cuSOLVER factorizations at ~30% of the float64 peak
# (n³/3 flops for Cholesky, n³/3 for the triangular inverse); eigh (~4 n³ flops) and SVD (~10 m·n·k) at 1-5%:
# their bidiagonal/tridiagonal reductions are half matrix-vector work, bound by memory bandwidth; GPTQ's
# column loop launch-bound at ~30 µs per column. Data-centre GPUs only: consumer ones run float64 at 1/64.
CUDA_RATES = Rates(gemm_float32=3.3e13, gemm_float64=3.3e13, gemm_bfloat16=5.0e14, forward_float32=1.0e13,
                   forward_bfloat16=1.5e14, svd=10 / 6.7e11, cholesky=1 / 3 / 2.0e13, triangular=1 / 3 / 2.0e13,
                   eigh=4 / 3.4e12, gptq_column=3.0e-5, gptq_column_row=1e-10, read=2.0e9, process_bytes=1.5 * GIB,
                   source="ESTIMATED from H100 SXM documented peak rates (no GPU measurement yet)", device="cuda",
                   expert_overhead=5e-5, write=5e8, svd_whitened=1.0,     # spectrum speed-up unmeasured on GPU
                   omp=2.7e-10, atom_update=2.1e-11, refit=2.3e-13,      # K-SVD: assumed 100× the CPU's thread
                   alternation=1.0)


def load_rates(device: str, path: str | None = None) -> Rates:
    """The rates of ``device`` ("cpu"/"cuda"): built in, or from a JSON file (``path``, else
    ``$LRCOMPRESS_COST_RATES``) holding ``{"rates": {device: {constant: value}}}`` as
    bench/cost_constants.py and scripts/gpu_check.sh write it; the file's constants replace the built-in
    ones they name."""
    base = CUDA_RATES if device == "cuda" else CPU_RATES
    path = path or os.environ.get(RATES_ENV)
    if not path:
        return base
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LrcompressError(f"{RATES_ENV}={path}: cannot read the cost rates ({error})") from None
    given = (data.get("rates") or {}).get(device) if isinstance(data, dict) else None
    if not given:
        return base
    known = {k: float(v) for k, v in given.items() if k in Rates.__dataclass_fields__ and k not in ("source", "device")}
    return replace(base, **known, source=f"measured ({path})") if known else base


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs from the config (read from a meta skeleton): per decoder layer its
    parameters and those a token uses (MoE: the routed experts' share), the attention and MLP widths."""

    layer_params: list[int]
    active_params: list[int]
    outer_params: int
    hidden: int
    attention_width: int
    mlp_width: int
    vocab: int
    itemsize: int
    experts: int = 0
    source_itemsize: int = 2             # bytes per value in the checkpoint read (config.json's dtype)

    @property
    def total_params(self) -> int:
        return sum(self.layer_params) + self.outer_params


def model_shape(model: nn.Module) -> ModelShape:
    """Shapes of ``model`` (a meta skeleton is enough)."""
    adapter = adapter_for(model)
    config = model.config
    layers = list(adapter.decoder_layers(model))
    experts = next((getattr(config, k) for k in EXPERT_COUNT_KEYS if isinstance(getattr(config, k, None), int)), 0)
    top_k = getattr(config, "num_experts_per_tok", None) or 0
    share = top_k / experts if experts and top_k else 1.0
    layer_params, active = [], []
    for layer in layers:
        total = routed = 0
        for name, p in layer.named_parameters():
            total += p.numel()
            if ".experts." in f".{name}" and p.ndim == 3:
                routed += p.numel()
        layer_params.append(total)
        active.append(int(total - routed + routed * share))
    outer = sum(p.numel() for p in model.parameters()) - sum(layer_params)     # parameters() counts tied ones once
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    mlp = max(int(getattr(config, "intermediate_size", 0) or 0),
              int(getattr(config, "moe_intermediate_size", 0) or 0) * max(top_k, 1), hidden)
    itemsize = next(model.parameters()).element_size()
    stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return ModelShape(layer_params, active, outer, hidden, heads * head_dim, mlp,
                      int(getattr(config, "vocab_size", 0) or 0), itemsize, int(experts),
                      4 if stored.endswith("float32") else 2)


@dataclass
class RunCosts:
    """A run's predicted costs. Times in seconds per phase, memory and disk in bytes; ``parts``: the terms
    of the peak host/device memory; ``notes``: assumptions; ``refusals``: what would not fit, and the fix."""

    device: str
    rates_source: str
    phases: dict[str, float]
    layer_seconds: float                # the slowest decoder layer (statistics, decompositions, propagation, write)
    methods: dict[str, float]
    peak_host_bytes: float
    host_parts: dict[str, float]
    peak_device_bytes: float | None
    device_parts: dict[str, float]
    disk_bytes: float
    notes: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    layers: list[float] = field(default_factory=list)      # each decoder layer's seconds, as layer_seconds counts

    @property
    def total_seconds(self) -> float:
        return sum(self.phases.values())

    @property
    def dominant_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def dominant_memory(self) -> str:
        return max(self.host_parts, key=self.host_parts.get)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_seconds": self.total_seconds, "dominant_phase": self.dominant_phase,
                "dominant_memory": self.dominant_memory}


# -- time ---------------------------------------------------------------------------------------------

def dictionary_shape(method: str, module: PlannedModule) -> tuple[int, int]:
    """(s, k) of a cospadi/compot module: nonzeros per output and atoms, k = 2s (the default ρ; compot: at most
    n), from its planned size s·(ρ·n + m·(1 + an index's ~0.35 of a float32 value)), else the default ratio 0.2."""
    m, n = module.out_features, module.in_features
    after = module.params_after if 0 < module.params_after < m * n else 0.8 * m * n
    s = max(1, min(n, int(after / (2 * n + 1.35 * m))))
    return s, min(2 * s, n) if method == "compot" else 2 * s


def dictionary_seconds(method: str, module: PlannedModule, rates: Rates, iterations: int | None = None) -> float:
    """cospadi / compot, from their code (compressor/cospadi.py, compressor/dictionary.py): the whitening and
    Fᵀ·Wᵀ, the SVD start of the n×m signals, ``iterations`` K-SVD iterations (DᵀD, DᵀX, batched OMP, the
    residual, k rank-1 atom updates) or COMPOT alternations (X·Sᵀ, its n×k SVD, the Procrustes product, DᵀX),
    then the value refit in the layer's metric (Dᵀ·M, DᵀMD, DᵀMW and m Cholesky solves of s×s) and
    D = F⁻ᵀ·D_F. Both SVDs are of whitened matrices (``svd_whitened``); a COMPOT alternation took 0.42–0.69
    (× ``alternation``) of its count on Llama-3-8B's four shape classes (bench/history/issue31-costs.md: X·Sᵀ
    has the rank of the calibration at most, and gesdd deflates)."""
    m, n = module.out_features, module.in_features
    s, k = dictionary_shape(method, module)
    g32, g64 = rates.gemm("float32"), rates.gemm_float64
    setup = (rates.cholesky + rates.triangular) * n**3 + 2 * n * n * m / g64
    start = rates.svd * rates.svd_whitened * n * m * min(n, m)
    refit = rates.refit * m * s**3 + 2 * k * n * (n + k + m) / g64 + 2 * n * n * k / g64
    count = iterations or DICTIONARY_ITERATIONS[method]
    if method == "compot":
        each = rates.alternation * (rates.svd * rates.svd_whitened * n * k * min(n, k) + 2 * k * n * (2 * m + k) / g64)
    else:
        each = rates.omp * m * k * s + rates.atom_update * k * n * m + 2 * k * n * (k + 2 * m) / g32
    return setup + start + count * each + refit


def method_seconds(method: str, module: PlannedModule, rates: Rates, iterations: int | None = None) -> float:
    """One module's decomposition on ``rates``' device, from the method's code (float64 throughout), plus
    the output-error measure every Linear target gets (tr(E·G·Eᵀ) and tr(W·G·Wᵀ): two m·n·n products);
    ``iterations``: a dictionary method's K-SVD iterations / alternations (default: the method's)."""
    m, n = module.out_features, module.in_features
    k = min(m, n)
    r = module.rank or k
    g64 = rates.gemm_float64

    def gemm(a: int, b: int, c: int) -> float:
        return 2 * a * b * c / g64

    whitening = rates.cholesky * n**3 + rates.triangular * n**3
    measure = 2 * gemm(m, n, n) + rates.module_overhead
    white_svd = rates.svd * rates.svd_whitened * m * n * k
    if method in DICTIONARY_ITERATIONS:
        return dictionary_seconds(method, module, rates, iterations) + measure
    if method in ("whiten", "asvd"):
        return whitening + gemm(m, n, n) + white_svd + gemm(r, n, n) + measure
    if method == "svd" or method == "fwsvd":
        return rates.svd * m * n * k + measure
    if method == "lord":
        return gemm(m, n, n) + gemm(m, n, m) + rates.eigh * m**3 + gemm(r, m, n) + measure
    if method == "gptq":
        loop = n * (rates.gptq_column + rates.gptq_column_row * m) + gemm(m, n, n) / 2
        return whitening + gemm(n, n, n) + rates.cholesky * n**3 + loop + measure
    if method == "eora":
        return rates.eigh * n**3 + gemm(m, n, n) + white_svd + measure
    if method in ("rtn", "prune", "wanda", "magnitude"):
        return 50 * m * n / g64 + measure
    # a method without its own formula: whiten's, said in the notes
    return whitening + gemm(m, n, n) + white_svd + gemm(r, n, n) + measure


def _dtype(shape: ModelShape) -> str:
    return "float32" if shape.itemsize == 4 else "bfloat16"


def _forward_seconds(shape: ModelShape, tokens: int, seq_len: int, rates: Rates, batch: int = 4) -> list[float]:
    """Each decoder layer's forward over ``tokens`` tokens (windows of ``seq_len``, ``batch`` per call)."""
    rate = rates.forward(_dtype(shape))
    attention = 4 * seq_len * shape.attention_width
    calls = -(-tokens // (seq_len * batch))
    overhead = calls * (rates.batch_overhead + shape.experts * rates.expert_overhead)
    return [tokens * (2 * active + attention) / rate + overhead for active in shape.active_params]


def _gram_seconds(plan: list[PlannedModule], tokens: int, rates: Rates) -> float:
    """Accumulating XᵀX for every target: 2·tokens·n² flops each, float64 on CPU, float32 on accelerators."""
    rate = rates.gemm("float64" if rates.device == "cpu" else "float32")
    return sum(2 * tokens * p.in_features**2 for p in plan) / rate


def _passes(recipe: Recipe) -> tuple[int, int]:
    """(forwards per layer per stage for statistics, extra reference forwards): true_sequential runs one
    pass per input group (4 in a Llama layer), output matching runs the original layer beside."""
    runtime = recipe.runtime
    original = runtime.target == "original"
    true_sequential = runtime.true_sequential if runtime.true_sequential is not None else original
    passes = 4 if true_sequential else 1
    return passes, passes if original else 0


def _eval_tokens(recipe: Recipe) -> int:
    specs = recipe.eval.perplexity
    return sum((s.max_windows * s.seq_len) if s.max_windows else DEFAULT_EVAL_TOKENS for s in specs)


def _layer_index(name: str) -> int:
    """The decoder layer a target belongs to: the first number in its name (model.layers.<i>.…)."""
    return next((int(part) for part in name.split(".") if part.isdigit()), 0)


def _per_layer(recipe: Recipe, plan: list[PlannedModule], shape: ModelShape, rates: Rates) -> list[dict[str, float]]:
    """Each decoder layer's statistics, decompositions and propagation seconds."""
    cal = recipe.calibration
    tokens = cal.num_samples * cal.seq_len
    forwards = _forward_seconds(shape, tokens, cal.seq_len, rates, recipe.runtime.batch_size)
    passes, reference = _passes(recipe)
    stages = max(len(recipe.stages), 1)
    grams = 2 if recipe.runtime.target == "original" else 1              # the cross-Gram X̂ᵀX beside XᵀX
    targeted = set(_layers_of(plan))                  # a layer no stage targets gets no statistics pass
    layers = [{"statistics": stages * (passes + reference) * f if i in targeted else 0.0, "decompositions": 0.0,
               "propagation": f * (1 + (1 if reference else 0)) if recipe.runtime.sequential else 0.0}
              for i, f in enumerate(forwards)]
    for p in plan:
        layer = layers[min(_layer_index(p.name), len(layers) - 1)]
        layer["statistics"] += grams * _gram_seconds([p], tokens, rates)
        layer["decompositions"] += method_seconds(p.method, p, rates, _iterations(recipe, p))
    return layers


def _iterations(recipe: Recipe, module: PlannedModule) -> int | None:
    """The recipe's ``iterations`` for the stage that plans ``module`` (the dictionary methods'), if set."""
    stages = recipe.stages
    value = stages[module.stage].options.get("iterations") if module.stage < len(stages) else None
    return int(value) if isinstance(value, (int, float)) else None


def _phases(recipe: Recipe, plan: list[PlannedModule], shape: ModelShape, rates: Rates) -> dict[str, float]:
    per_layer = _per_layer(recipe, plan, shape, rates) or [{"statistics": 0.0, "decompositions": 0.0,
                                                           "propagation": 0.0}]
    statistics, decompositions, propagation = (sum(layer[k] for layer in per_layer)
                                               for k in ("statistics", "decompositions", "propagation"))
    stored = shape.total_params * shape.source_itemsize
    outer_stored = shape.outer_params * shape.source_itemsize
    load = (outer_stored if recipe.runtime.lazy else stored) / rates.read       # lazy: the layers come per layer
    layers_written, outer_written = _written(plan, shape) if recipe.output.save else (0.0, 0.0)
    layer_reads = (stored - outer_stored) / rates.read if recipe.runtime.lazy else 0.0
    io = layer_reads + (layers_written + outer_written) / rates.write + layers_written / rates.read  # read back once
    eval_tokens = _eval_tokens(recipe) * (2 if recipe.eval.baseline else 1)
    head = 2 * shape.vocab * shape.hidden * eval_tokens / rates.forward(_dtype(shape))
    evaluation = sum(_forward_seconds(shape, eval_tokens, recipe.eval.perplexity[0].seq_len, rates)) + head \
        if recipe.eval.perplexity else 0.0
    if recipe.runtime.lazy:
        evaluation += (layers_written + (stored if recipe.eval.baseline else 0)) / rates.read
    phases = {"load": load, "statistics": statistics, "decompositions": decompositions, "propagation": propagation,
              "layer I/O": io, "evaluation": evaluation}
    if recipe.runtime.distill is not None:
        phases["distillation"] = distill_seconds(recipe, shape, rates)
    return phases


def _distill_windows(recipe: Recipe) -> tuple[int, int]:
    """(training, held-out) windows of ``runtime.distill`` (``pipeline.distill.split_windows``'s count)."""
    count = recipe.calibration.num_samples * recipe.runtime.distill.windows_scale
    held = min(count - 1, max(1, round(recipe.runtime.distill.held_out * count)))
    return count - held, held


def distill_seconds(recipe: Recipe, shape: ModelShape, rates: Rates) -> float:
    """``runtime.distill``: the teacher's forward over every window, then per trained window a whole-model
    forward and backward with the LM head and the teacher's head, and the held-out evaluations (before, and
    ``evals_per_epoch`` per epoch). The backward computes input gradients through every layer but weight
    gradients of the factors only: forward + backward measured 2.4 forwards on SmolLM2-135M (one CPU thread,
    bench/history/distill-issue-26.md); counted as ``TRAIN_FORWARDS`` = 2.5."""
    spec, cal = recipe.runtime.distill, recipe.calibration
    if spec is None:
        return 0.0
    head = 2 * shape.vocab * shape.hidden * cal.seq_len / rates.forward(_dtype(shape))
    window = sum(_forward_seconds(shape, cal.seq_len, cal.seq_len, rates, 1)) + head
    train, held = _distill_windows(recipe)
    evaluations = (1 + spec.epochs * spec.evals_per_epoch) * held * (window + head)
    return (train + held) * window + spec.epochs * train * (TRAIN_FORWARDS * window + head) + evaluations


def distill_bytes(recipe: Recipe, plan: list[PlannedModule], shape: ModelShape) -> tuple[float, float]:
    """(teacher states, training working set) of ``runtime.distill`` in bytes: the original model's last layer
    outputs on every window (held from before the walk to the end), and during the training the gradients,
    AdamW's two moments, the best and the initial state of the factors, the autograd graph of one micro-batch
    through every layer, its logits (student, teacher, their log-softmaxes and the gradient) and a float32
    copy of a model stored narrower."""
    spec, cal = recipe.runtime.distill, recipe.calibration
    if spec is None:
        return 0.0, 0.0
    teacher = cal.num_samples * spec.windows_scale * cal.seq_len * shape.hidden * 4
    trained = [p for p in plan if p.rank is not None or p.method in DICTIONARY_ITERATIONS]   # refine's "factors"
    factors = sum(p.params_after for p in trained) * 4 * 5
    tokens = spec.micro_batch * cal.seq_len
    heads = max(shape.attention_width // 128, 1)
    # saved activations per token and layer: 20·hidden + 8·mlp + heads·seq floats, fitted to the measured peak
    # of SmolLM2-135M's distillation (4.69 GiB; 12·hidden + 4·mlp predicted 0.6 GiB less)
    graph = len(shape.layer_params) * tokens * (20 * shape.hidden + 8 * shape.mlp_width + heads * cal.seq_len) * 4
    logits = 5 * tokens * shape.vocab * 4
    upcast = shape.total_params * (4 - shape.itemsize)
    return float(teacher), float(factors + graph + logits + upcast)


# -- memory -------------------------------------------------------------------------------------------

def workspace_bytes(method: str, module: PlannedModule) -> float:
    """The float64 working set of one module's decomposition beside its Gram, counted from the code and
    checked by measuring the resident set's growth on 1024×3584 and 3584×1024 modules (within 25%): whiten
    holds the Cholesky factor and its inverse (2 n²; the identity and the shifted Gram are freed on the way)
    and W, W·S, the SVD's copy, U and Vᵀ (~5 m·n); gptq W, its codes and the Hessian's copies (3 m·n +
    5.5 n²); lord W·G·Wᵀ, its eigenvectors and a copy (3 m²) and 2 m·n; rtn its codes, scales and the
    output-error measure (E, W and E·G: 5 m·n in all); cospadi and compot the whitening (2 n²), the whitened
    signals, their float32 copies, the residual and W (~4 m·n), then the larger of the refit's (the metric
    G + ηI and its identity 2 n², the dictionary, Dᵀ·M and the un-whitened D 3 n·k, DᵀMD k²) and the index
    packing's (``core.packing.pack_codes`` widens s·m indices of ⌈log₂ k⌉ > 8 bits to one int64 per bit, twice:
    4.5 GiB for an 8B gate_proj)."""
    m, n = module.out_features, module.in_features
    measure = 3 * m * n
    if method == "gptq":
        elements = 5.5 * n * n + 3 * m * n
    elif method == "lord":
        elements = 3 * m * m + 2 * m * n
    elif method in ("svd", "fwsvd"):
        elements = 4 * m * n
    elif method in ("rtn", "prune", "wanda", "magnitude"):
        elements = 5 * m * n
    elif method in DICTIONARY_ITERATIONS:
        s, k = dictionary_shape(method, module)
        bits = max(1, math.ceil(math.log2(k)))
        elements = 2 * n * n + 4 * m * n + max(2 * n * n + 3 * n * k + k * k, 2 * s * m * bits)
    else:                                    # whiten and the methods that whiten first (eora, asvd)
        elements = 2 * n * n + 5 * m * n
    return 8.0 * max(elements, measure)


def _layer_working_set(recipe: Recipe, plan: list[PlannedModule], shape: ModelShape, device: str
                       ) -> dict[str, float]:
    """Per decoder layer, at its worst: its weights, its targets' statistics, the largest decomposition,
    and one batch's forward workspace."""
    accumulation = 8 if device == "cpu" else 4
    kinds = 2 if recipe.runtime.target == "original" else 1
    stats = max((sum(p.in_features**2 for p in mods) for mods in _layers_of(plan).values()), default=0)
    work = max((workspace_bytes(p.method, p) for p in plan), default=0.0)
    b, s = recipe.runtime.batch_size, recipe.calibration.seq_len
    heads = max(shape.attention_width // 128, 1)
    forward = b * s * (3 * shape.mlp_width + 4 * shape.hidden) * 4 + b * heads * s * s * 4
    layer = max(shape.layer_params, default=0) * shape.itemsize
    return {"statistics": float(stats * accumulation * kinds), "decomposition": work, "forward": float(forward),
            "layer": float(layer)}


def _layers_of(plan: list[PlannedModule]) -> dict[int, list[PlannedModule]]:
    """Targets grouped by their decoder layer."""
    groups: dict[int, list[PlannedModule]] = {}
    for p in plan:
        groups.setdefault(_layer_index(p.name), []).append(p)
    return groups


def _memory(recipe: Recipe, plan: list[PlannedModule], shape: ModelShape, rates: Rates
            ) -> tuple[dict[str, float], dict[str, float]]:
    """(host parts, device parts): the terms of each peak."""
    runtime, cal = recipe.runtime, recipe.calibration
    device = rates.device
    work = _layer_working_set(recipe, plan, shape, device)
    streams = 2 if runtime.target == "original" else 1
    activations = 2 * streams * cal.num_samples * cal.seq_len * shape.hidden * shape.itemsize
    if runtime.lazy:
        weights = shape.outer_params * shape.itemsize + work["layer"] * 2     # + the segment read back (restore)
        weights_label = "outer tensors + one layer (lazy)"
    else:
        weights = float(shape.total_params * shape.itemsize) + work["layer"]
        weights_label = "model weights (resident)"
    compute = work["statistics"] + work["decomposition"]
    host = {"process": rates.process_bytes if device == "cpu" else CPU_RATES.process_bytes, weights_label: weights}
    teacher, training = distill_bytes(recipe, plan, shape)
    if runtime.distill is not None:     # the training runs after the walk: it adds what the walk's set does not cover
        host["distillation teacher states"] = teacher
        if device == "cpu":
            host["distillation training (beyond the walk's working set)"] = max(
                training - activations - compute - work["forward"], 0.0)
    device_parts: dict[str, float] = {}
    if device == "cpu":
        host["activations"] = float(activations)
        host["statistics + largest decomposition"] = compute
        host["forward batch"] = work["forward"]
    else:
        if runtime.offload_device == "cuda":
            device_parts["activations (offload_device: cuda)"] = float(activations)
        else:
            host["activations"] = float(activations)
        device_parts.update({"layer": work["layer"], "statistics + largest decomposition": compute,
                             "forward batch": work["forward"], "CUDA context": 0.5 * GIB})
        if runtime.distill is not None:   # the whole model moves to the device for the training
            device_parts["distillation (the whole model, beyond the walk's working set)"] = max(
                weights + training - work["layer"] - compute - work["forward"], 0.0)
    return host, device_parts


def _written(plan: list[PlannedModule], shape: ModelShape) -> tuple[float, float]:
    """(decoder layers, the rest) as written: targets at their planned size, everything else as it is."""
    layers = sum(shape.layer_params) * shape.itemsize - sum(p.bytes_before for p in plan) + sum(p.bytes_after
                                                                                                 for p in plan)
    return float(max(layers, 0)), float(shape.outer_params * shape.itemsize)


def _disk(plan: list[PlannedModule], shape: ModelShape) -> float:
    """The written checkpoint; the staging directory is the output itself (renamed when complete), plus one
    segment's temporary file while it is written."""
    layers, outer = _written(plan, shape)
    return layers + outer + max(shape.layer_params, default=0) * shape.itemsize


def estimate(recipe: Recipe, plan: list[PlannedModule], shape: ModelShape, device: str) -> RunCosts:
    """The run's predicted costs on ``device`` ("cpu" or "cuda"), with its rates (``load_rates``)."""
    rates = load_rates(device)
    if device == "cpu":
        rates = rates.scaled(recipe.runtime.threads or torch.get_num_threads())
    phases = _phases(recipe, plan, shape, rates)
    methods: dict[str, float] = {}
    for p in plan:
        methods[p.method] = methods.get(p.method, 0.0) + method_seconds(p.method, p, rates, _iterations(recipe, p))
    host, device_parts = _memory(recipe, plan, shape, rates)
    count = max(len(shape.layer_params), 1)
    written = _written(plan, shape)[0] if recipe.output.save else 0.0
    per_write = written / count / rates.write + written / count / rates.read     # commit and restore, per layer
    layers = [sum(layer.values()) + per_write for layer in _per_layer(recipe, plan, shape, rates)]
    layer_seconds = max(layers, default=0.0)
    notes = []
    unknown = sorted({p.method for p in plan} - {"whiten", "svd", "fwsvd", "lord", "gptq", "eora", "rtn", "prune",
                                                  "wanda", "magnitude", *DICTIONARY_ITERATIONS})
    if unknown:
        notes.append(f"no cost formula for {', '.join(unknown)}: whiten's decomposition cost is used")
    dictionary = sorted({p.method for p in plan} & set(DICTIONARY_ITERATIONS))
    if dictionary:
        notes.append(f"{', '.join(dictionary)}: every K-SVD iteration / alternation counted (the early stop "
                     "on a small gain is not predicted: an upper bound)")
    prepasses = sorted({spec.method for spec in recipe.stages if spec.method == "fwsvd"}
                       | {f"allocation: {spec.allocation.strategy}" for spec in recipe.stages
                          if spec.allocation.strategy != "uniform"})
    if prepasses:
        notes.append(f"not counted: the whole-model pre-passes of {', '.join(prepasses)} (about one more statistics "
                     "pass, plus a backward pass for fwsvd's Fisher)")
    if recipe.eval.lm_eval is not None:
        notes.append("not counted: the lm-eval tasks (their documents × the model's forward)")
    if any(s.max_windows is None for s in recipe.eval.perplexity):
        notes.append(f"evaluation without max_windows: {DEFAULT_EVAL_TOKENS:,} tokens assumed per dataset")
    return RunCosts(device, rates.source, phases, layer_seconds, methods, sum(host.values()), host,
                    sum(device_parts.values()) if device_parts else None, device_parts, _disk(plan, shape), notes,
                    layers=layers)


# -- does it fit ---------------------------------------------------------------------------------------

def host_memory_available() -> float | None:
    """MemAvailable from /proc/meminfo (bytes), or None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_memory_available(device: str) -> float | None:
    if device != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return float(free)


def disk_available(directory: Path) -> float | None:
    for candidate in [directory, *directory.parents]:
        if candidate.exists():
            return float(shutil.disk_usage(candidate).free)
    return None


def refusals(costs: RunCosts, recipe: Recipe, available: dict[str, float | None]) -> list[str]:
    """What would not fit (``available``: "host", "device", "disk" in bytes, None = unknown), each with
    the setting that fixes it."""
    out = []
    host, limit = costs.peak_host_bytes, available.get("host")
    if limit is not None and host > limit:
        out.append(f"peak host memory {host / GIB:.1f} GiB > {limit / GIB:.1f} GiB available "
                   f"({_largest(costs.host_parts)}); {_host_fix(costs, recipe)}")
    dev, limit = costs.peak_device_bytes, available.get("device")
    if dev is not None and limit is not None and dev > limit:
        fix = ("set runtime.offload_device: cpu (the activations stay on the host)"
               if recipe.runtime.offload_device == "cuda" else
               f"lower runtime.batch_size (now {recipe.runtime.batch_size}) or use runtime.device: cpu")
        out.append(f"peak device memory {dev / GIB:.1f} GiB > {limit / GIB:.1f} GiB free "
                   f"({_largest(costs.device_parts)}); {fix}")
    disk, limit = costs.disk_bytes, available.get("disk")
    if limit is not None and disk > limit:
        out.append(f"the checkpoint needs {disk / GIB:.1f} GiB of disk and {limit / GIB:.1f} GiB are free under "
                   f"{recipe.output.dir}; set output.dir elsewhere")
    return out


def _largest(parts: dict[str, float]) -> str:
    name = max(parts, key=parts.get)
    return f"largest term: {name} {parts[name] / GIB:.1f} GiB"


def _host_fix(costs: RunCosts, recipe: Recipe) -> str:
    term = max(costs.host_parts, key=costs.host_parts.get)
    if not recipe.runtime.lazy and term.startswith("model weights"):
        if recipe.runtime.distill is not None:     # lazy mode cannot distil (the whole model trains at once)
            return "runtime.distill needs the whole model resident: drop runtime.distill, or use a larger machine"
        return "set runtime.lazy: true (one decoder layer at a time)"
    if term == "activations":
        return (f"lower calibration.num_samples (now {recipe.calibration.num_samples})"
                + (" or set runtime.device: cuda with offload_device: cuda" if recipe.runtime.device != "cpu" else ""))
    if term.startswith("distillation"):
        return (f"lower calibration.num_samples (now {recipe.calibration.num_samples}) or "
                f"runtime.distill.micro_batch (now {recipe.runtime.distill.micro_batch}), or drop runtime.distill")
    if term == "forward batch":
        return f"lower runtime.batch_size (now {recipe.runtime.batch_size})"
    return ("the largest module's statistics and decomposition need it: use a machine with more memory, or "
            "runtime.device: cuda")


def fit_refusals(costs: RunCosts, recipe: Recipe) -> list[str]:
    """What would not fit this machine (also stored in ``costs.refusals``): host memory against
    MemAvailable, device memory against CUDA's free memory, the checkpoint against the output's disk."""
    available = {"host": host_memory_available(), "device": device_memory_available(costs.device),
                 "disk": disk_available(Path(recipe.output.dir).resolve().parent) if recipe.output.save else None}
    costs.refusals = refusals(costs, recipe, available)
    return costs.refusals


def check_fit(costs: RunCosts, recipe: Recipe) -> None:
    """Refuse a run predicted not to fit this machine, naming what does not fit and the fix; the recipe
    key ``runtime.check_fit: false`` (or ``--set runtime.check_fit=false``) runs it anyway."""
    if fit_refusals(costs, recipe) and recipe.runtime.check_fit:
        raise LrcompressError("the run would not fit this machine (cost model, lrcompress.pipeline.costs): "
                              + "; ".join(costs.refusals)
                              + ". Set runtime.check_fit: false to run it anyway")
