"""Grow a trained mixture of experts from a dense Llama-style model, Branch-Train-MiX style.

Branch-Train-MiX (Sukhbaatar et al., arXiv 2403.07816): copy a dense model once per domain, fine-tune
each copy on its domain, then gather the copies' feed-forward blocks as the experts of one MoE layer
and train a router. Here, to fit a CPU:

* **domains** are k-means clusters (seeded) of the training text's paragraphs, each described by the
  idf-weighted mean of its tokens' input embeddings (no forward pass needed);
* only the MLPs of a chosen set of *late* layers are branched and trained; every other weight stays
  frozen, so the frozen prefix's activations at the first trained layer are computed once per window
  (``Trunk``) and every training step runs only the trained suffix;
* the **router** of each MoE layer is a multinomial logistic regression (no bias, L2-regularized)
  fitted on the dense model's MLP inputs at that layer, labelled with the domain of their window:
  its softmax is the router's, so top-k sends a token to the experts of the domains it looks like;
* the result is a **Qwen2-MoE** checkpoint (``moe_config``): its attention, norms and rotary embedding
  are Llama's when ``qkv_bias`` is off and sliding windows are off, untrained layers stay plain MLPs
  (``mlp_only_layers``), and top-k weights are renormalized (``norm_topk_prob``), so a layer whose E
  experts all equal the dense MLP computes the dense MLP exactly. Qwen2-MoE always has a shared
  expert; it is given one neuron and zero weights (its output is exactly 0).
"""
from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lrcompress.compressor.expert_merge import kmeans

log = logging.getLogger(__name__)

MIN_PARAGRAPH_CHARS = 200      # shorter paragraphs (headings, blank lines) join the next one


def moe_config(dense_config, experts: int, top_k: int, moe_layers: list[int]):
    """A Qwen2-MoE config with the dense (Llama-style) model's attention and E experts of its MLP
    size in ``moe_layers``; the other layers keep the dense MLP."""
    from transformers import Qwen2MoeConfig

    if getattr(dense_config, "attention_bias", False) or getattr(dense_config, "mlp_bias", False):
        raise ValueError("the dense model has attention/MLP biases: Qwen2-MoE cannot reproduce it")
    layers = dense_config.num_hidden_layers
    head_dim = getattr(dense_config, "head_dim", None) or dense_config.hidden_size // dense_config.num_attention_heads
    if head_dim * dense_config.num_attention_heads != dense_config.hidden_size:
        raise ValueError("Qwen2-MoE derives head_dim from hidden_size / heads; this model's differs")
    return Qwen2MoeConfig(
        vocab_size=dense_config.vocab_size, hidden_size=dense_config.hidden_size,
        intermediate_size=dense_config.intermediate_size, moe_intermediate_size=dense_config.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads, hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings, rms_norm_eps=dense_config.rms_norm_eps,
        tie_word_embeddings=dense_config.tie_word_embeddings, rope_parameters=dict(dense_config.rope_parameters),
        use_sliding_window=False, qkv_bias=False, num_experts=experts, num_experts_per_tok=top_k,
        norm_topk_prob=True, shared_expert_intermediate_size=1, decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(layers) if i not in set(moe_layers)],
        bos_token_id=dense_config.bos_token_id, eos_token_id=dense_config.eos_token_id,
        pad_token_id=getattr(dense_config, "pad_token_id", None))


def mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) weights of a Llama-style MLP, detached copies."""
    return tuple(p.weight.detach().clone() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))  # type: ignore


def assemble(dense: nn.Module, experts: dict[int, list[tuple[torch.Tensor, ...]]],
             routers: dict[int, torch.Tensor], top_k: int) -> nn.Module:
    """The Qwen2-MoE model: the dense model's weights, ``experts[layer]`` = E (gate, up, down) triples
    and ``routers[layer]`` (E × hidden) in the MoE layers."""
    from transformers import Qwen2MoeForCausalLM

    count = {len(v) for v in experts.values()}
    if len(count) != 1:
        raise ValueError(f"every MoE layer needs the same expert count, got {sorted(count)}")
    config = moe_config(dense.config, count.pop(), top_k, sorted(experts))
    state = {k: v for k, v in dense.state_dict().items() if not re.search(r"\.mlp\.", k) or
             int(k.split(".")[2]) not in experts}
    for layer, triples in experts.items():
        prefix = f"model.layers.{layer}.mlp"
        state[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u, _ in triples])
        state[f"{prefix}.experts.down_proj"] = torch.stack([d for _, _, d in triples])
        state[f"{prefix}.gate.weight"] = routers[layer]
        hidden = dense.config.hidden_size
        state[f"{prefix}.shared_expert.gate_proj.weight"] = torch.zeros(1, hidden)
        state[f"{prefix}.shared_expert.up_proj.weight"] = torch.zeros(1, hidden)
        state[f"{prefix}.shared_expert.down_proj.weight"] = torch.zeros(hidden, 1)
        state[f"{prefix}.shared_expert_gate.weight"] = torch.zeros(1, hidden)
    model = Qwen2MoeForCausalLM(config).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"weights do not map onto Qwen2-MoE: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


@torch.no_grad()
def dense_equivalence_error(dense: nn.Module, layers: list[int], experts: int, top_k: int,
                            ids: torch.Tensor) -> float:
    """Max |logit difference| between the dense model and its Qwen2-MoE whose E experts in ``layers`` all
    equal the dense MLP (random routers): 0 up to float round-off when the architecture maps exactly."""
    copies = {i: [mlp_weights(dense.model.layers[i].mlp)] * experts for i in layers}
    g = torch.Generator().manual_seed(0)
    routers = {i: torch.randn(experts, dense.config.hidden_size, generator=g) for i in layers}
    moe = assemble(dense, copies, routers, top_k)
    return float((moe(ids).logits - dense(ids).logits).abs().max())


# --- domains ------------------------------------------------------------------------------------------

def paragraphs(text: str, min_chars: int = MIN_PARAGRAPH_CHARS) -> list[str]:
    """Blank-line separated paragraphs; short ones (headings) are joined to the next."""
    parts, pending = [], ""
    for block in re.split(r"\n\s*\n", text):
        pending = f"{pending}\n\n{block}" if pending else block
        if len(pending.strip()) >= min_chars:
            parts.append(pending.strip())
            pending = ""
    if pending.strip():
        parts.append(pending.strip())
    return parts


def domain_labels(parts: list[str], tokenizer, embedding: torch.Tensor, domains: int, seed: int) -> torch.Tensor:
    """k-means labels of the paragraphs, each described by the idf-weighted mean of its tokens' input
    embeddings (unit-normalized): topical clusters without running the model."""
    ids = [torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"], dtype=torch.long) for p in parts]
    vocab = embedding.shape[0]
    document_frequency = torch.zeros(vocab, dtype=torch.float64)
    for row in ids:
        document_frequency[row.unique()] += 1
    idf = torch.log((1 + len(parts)) / (1 + document_frequency)) + 1
    emb = embedding.detach().to(torch.float64)
    vectors = torch.stack([(idf[row, None] * emb[row]).sum(0) / max(len(row), 1) for row in ids])
    vectors = vectors - vectors.mean(0)
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return kmeans(vectors, domains, seed)


def domain_windows(parts: list[str], labels: torch.Tensor, tokenizer, seq_len: int) -> list[torch.Tensor]:
    """Per domain: its paragraphs (in text order) tokenized, joined and cut into windows (N × seq_len)."""
    out = []
    for domain in range(int(labels.max()) + 1):
        text = "\n\n".join(p for p, label in zip(parts, labels.tolist()) if label == domain)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        usable = (len(ids) // seq_len) * seq_len
        if usable == 0:
            raise ValueError(f"domain {domain} has fewer than {seq_len} tokens: use fewer domains or more text")
        out.append(ids[:usable].reshape(-1, seq_len))
    return out


# --- training the suffix ---------------------------------------------------------------------------------

class Trunk:
    """A decoder-only model split at layer ``start``: the frozen prefix runs once per window
    (``prefix``), the suffix (layers ``start``… , final norm, head) runs from cached hidden states."""

    def __init__(self, model: nn.Module, start: int) -> None:
        self.model, self.start = model, start

    @torch.no_grad()
    def prefix(self, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:
        out = []
        for chunk in windows.split(batch):
            h = self.model.model.embed_tokens(chunk)
            pe = self._positions(h)
            for layer in self.model.model.layers[:self.start]:
                h = layer(h, attention_mask=None, position_ids=pe[0], position_embeddings=pe[1])
            out.append(h)
        return torch.cat(out)

    def suffix(self, hidden: torch.Tensor, hook_layers: dict[int, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Logits from the hidden states at layer ``start``; ``hook_layers``: collect the MLP inputs."""
        return self.model.lm_head(self.final_hidden(hidden, hook_layers))

    def final_hidden(self, hidden: torch.Tensor, hook_layers: dict[int, list[torch.Tensor]] | None = None
                     ) -> torch.Tensor:
        """The final norm's output (the head's input) from the hidden states at layer ``start``."""
        pe = self._positions(hidden)
        h = hidden
        for index, layer in enumerate(self.model.model.layers[self.start:], self.start):
            if hook_layers is not None and index in hook_layers:
                handle = layer.mlp.register_forward_pre_hook(
                    lambda m, a, i=index: hook_layers[i].append(a[0].reshape(-1, a[0].shape[-1]).detach()))
                h = layer(h, attention_mask=None, position_ids=pe[0], position_embeddings=pe[1])
                handle.remove()
            else:
                h = layer(h, attention_mask=None, position_ids=pe[0], position_embeddings=pe[1])
        return self.model.model.norm(h)

    def _positions(self, h: torch.Tensor):
        position_ids = torch.arange(h.shape[1])[None].expand(h.shape[0], -1)
        return position_ids, self.model.model.rotary_emb(h, position_ids)


@dataclass
class TrainSettings:
    """How one expert is trained. The defaults are issue 15's (constant rate, windows drawn with
    replacement, the loss on every position); issue 32's specialists use ``schedule="cosine"``,
    ``draw="epochs"`` and ``loss_positions`` (see ``train_expert``)."""

    steps: int = 60
    batch: int = 2
    lr: float = 2e-4
    seed: int = 0
    schedule: str = "constant"       # "constant" | "cosine" (linear warm-up, cosine decay to ~0)
    warmup: int = 0                  # warm-up steps of the cosine schedule
    draw: str = "random"             # "random": windows with replacement | "epochs": a fresh permutation per pass
    loss_positions: int = 0          # 0: every position | k: k seeded random positions per window
    reinit: float = 0.0              # Drop-Upcycling: fraction of the MLP's neurons re-initialized first

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine") or self.draw not in ("random", "epochs"):
            raise ValueError(f"unknown schedule {self.schedule!r} or draw {self.draw!r}")
        if self.schedule == "constant" and self.warmup:
            raise ValueError("warm-up needs schedule='cosine'")
        if not 0 <= self.warmup < self.steps or self.loss_positions < 0:
            raise ValueError("warmup must be in [0, steps) and loss_positions >= 0")
        if not 0.0 <= self.reinit <= 1.0:
            raise ValueError(f"reinit must be a fraction in [0, 1], got {self.reinit}")


def learning_rate_factor(step: int, settings: TrainSettings) -> float:
    """The rate multiplier at ``step`` (0-based): 1, or a linear warm-up to 1 over ``warmup`` steps, then a
    cosine decay that would reach 0 one step after the last."""
    if settings.schedule == "constant":
        return 1.0
    if step < settings.warmup:
        return (step + 1) / (settings.warmup + 1)
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def window_draws(windows: int, settings: TrainSettings, generator: torch.Generator) -> torch.Tensor:
    """steps × batch window indices: with replacement, or passes over a fresh permutation each (every
    window is seen once before any is seen twice)."""
    total = settings.steps * settings.batch
    if settings.draw == "random":
        return torch.randint(windows, (settings.steps, settings.batch), generator=generator)
    passes = -(-total // windows)
    return torch.cat([torch.randperm(windows, generator=generator) for _ in range(passes)])[:total].reshape(
        settings.steps, settings.batch)


def drop_upcycle(weights: tuple[torch.Tensor, ...], ratio: float, generator: torch.Generator
                 ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Drop-Upcycling's partial re-initialization (Nakamura et al., ICLR 2025, arXiv 2502.19261) of one
    expert's (gate, up, down): round(ratio · I) of the I intermediate neurons, drawn at random, get new
    gate and up rows and a new down column, each weight drawn from N(μ, σ²) with μ, σ the mean and standard
    deviation of that whole matrix in the dense MLP; every other weight is kept. Returns the new weights
    and the re-initialized neuron indices.

    Why (issue 32): experts copied from one dense MLP and fine-tuned stay within ≈ 10 % of each other at
    any rate that keeps them better than the dense MLP on their own text (bench/history/issue32-submoe.md);
    the paper re-initializes a different random part of every expert so that upcycled experts specialize
    instead of staying copies, and the trained re-initialized neurons are domain features that the other
    experts do not have (not aligned across experts: what an expert merge has to reconcile)."""
    gate, up, down = weights
    chosen = torch.randperm(gate.shape[0], generator=generator)[:round(ratio * gate.shape[0])]

    def redrawn(matrix: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        mean, std = matrix.double().mean(), matrix.double().std()
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * std + mean).to(matrix.dtype)

    gate, up, down = gate.clone(), up.clone(), down.clone()
    gate[chosen] = redrawn(gate, (len(chosen), gate.shape[1]))
    up[chosen] = redrawn(up, (len(chosen), up.shape[1]))
    down[:, chosen] = redrawn(down, (down.shape[0], len(chosen)))
    return (gate, up, down), chosen


def next_token_loss(trunk: Trunk, hidden: torch.Tensor, ids: torch.Tensor, positions: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Mean next-token loss of the windows; with ``positions`` = k > 0 on k positions per window drawn
    uniformly without replacement (seeded): an unbiased estimate of the full loss whose head costs k/L of
    the full one (every position still runs through the layers and feeds the attention)."""
    final = trunk.final_hidden(hidden)[:, :-1]
    targets = ids[:, 1:]
    if positions and positions < final.shape[1]:
        pick = torch.stack([torch.randperm(final.shape[1], generator=generator)[:positions]
                            for _ in range(final.shape[0])])
        final = torch.gather(final, 1, pick[..., None].expand(-1, -1, final.shape[-1]))
        targets = torch.gather(targets, 1, pick)
    logits = trunk.model.lm_head(final)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_expert(trunk: Trunk, layers: list[int], hidden: torch.Tensor, targets: torch.Tensor,
                 settings: TrainSettings, on_step: Callable[[int], None] | None = None
                 ) -> tuple[dict[int, tuple[torch.Tensor, ...]], list[float]]:
    """Fine-tune a copy of the MLPs of ``layers`` on (hidden at the trunk's start, token ids) windows
    with AdamW (no weight decay), next-token loss; every other weight is frozen.
    The model is left unchanged. Returns the trained (gate, up, down) per layer and the loss curve.
    ``on_step(step)`` runs after every step (1-based) while the trained copy is in the model (snapshots).

    Why the cosine schedule (issue 32): at a constant rate the experts drift apart only slowly
    (≈ steps^0.43) while the late, noisy steps turn the held-out loss back up; a high peak rate moves the
    weights far early, and the decay to 0 removes the step noise at the end (annealing), so distance and
    held-out quality stop pulling against each other. ``draw="epochs"`` keeps a domain's windows from
    repeating before all were seen; ``loss_positions`` cuts the 49k-vocabulary head's cost, ≈ 80% of a
    full-loss step (bench/history/issue32-submoe.md); ``reinit`` > 0 starts every layer's copy from
    ``drop_upcycle`` (its own generator, seeded by ``seed``, so the window draws are those of reinit 0)."""
    model = trunk.model
    originals = {i: copy.deepcopy(model.model.layers[i].mlp) for i in layers}
    if settings.reinit:
        reinit = torch.Generator().manual_seed(settings.seed)
        for i in layers:
            mlp = model.model.layers[i].mlp
            new, _ = drop_upcycle(mlp_weights(mlp), settings.reinit, reinit)
            for linear, w in zip((mlp.gate_proj, mlp.up_proj, mlp.down_proj), new):
                linear.weight.data.copy_(w)
    params = [p for i in layers for p in model.model.layers[i].mlp.parameters()]
    losses = fit_parameters(trunk, params, hidden, targets, settings, on_step)
    trained = {i: mlp_weights(model.model.layers[i].mlp) for i in layers}
    for i in layers:
        model.model.layers[i].mlp = originals[i]
    return trained, losses


def fit_parameters(trunk: Trunk, params: list[nn.Parameter], hidden: torch.Tensor, targets: torch.Tensor,
                   settings: TrainSettings, on_step: Callable[[int], None] | None = None) -> list[float]:
    """AdamW (no weight decay) on ``params`` alone, every other weight of the trunk's model frozen, with the
    rate schedule, window draws and next-token loss of ``settings``; returns the loss curve. The parameters
    are trained in place and left frozen."""
    for p in trunk.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(settings.seed)
    losses = []
    try:
        for step, pick in enumerate(window_draws(len(hidden), settings, g)):
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * learning_rate_factor(step, settings)
            loss = next_token_loss(trunk, hidden[pick], targets[pick], settings.loss_positions, g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(len(losses))
    finally:
        for p in params:
            p.requires_grad_(False)
    return losses


def train_routers(moe: nn.Module, layers: list[int], hidden: torch.Tensor, targets: torch.Tensor,
                  settings: TrainSettings) -> list[float]:
    """Branch-Train-MiX's last stage restricted to the routers: the routers of the MoE ``layers`` (started
    from the domain classifiers of ``fit_routers``) are trained in place on the next-token loss of the
    assembled MoE, experts and everything else frozen; ``hidden``: the frozen prefix's output on ``targets``.

    Why (issue 32): a domain classifier sends a token to the experts of the domain it looks like, and about
    half of web text's tokens look like book or question text, so the MoE can lose to the dense model on web
    text although its web experts beat it (bench/history/issue32-submoe.md); BTX learns the router on the
    language-modelling loss instead, which sends a token to the experts that predict it best. Trained on the
    router-fit windows only (never an expert's training text, never held-out text)."""
    return fit_parameters(Trunk(moe, min(layers)), [moe.model.layers[i].mlp.gate.weight for i in layers],
                          hidden, targets, settings)


def fit_router(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = 1e-4,
               iterations: int = 100) -> torch.Tensor:
    """Multinomial logistic regression without bias (classes × hidden), fitted by L-BFGS in float64 on
    mean cross-entropy + l2·‖W‖²: the router whose softmax predicts the token's domain."""
    x = features.to(torch.float64)
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(x @ weight.T, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    result = weight.detach()
    if not torch.isfinite(result).all():
        raise ValueError("router fit diverged (NaN/Inf)")
    return result.to(torch.float32)


# --- how different the experts are ---------------------------------------------------------------------

def expert_differences(triples: list[tuple[torch.Tensor, ...]], dense: tuple[torch.Tensor, ...],
                       inputs: torch.Tensor, act: nn.Module) -> dict[str, float]:
    """Relative Frobenius distances (all three weights together) between experts and to the dense MLP,
    and the mean cosine of their outputs on ``inputs`` (T × hidden)."""
    def flat(t):
        return torch.cat([w.flatten().double() for w in t])

    def out(t):
        g, u, d = (w.double() for w in t)
        x = inputs.double()
        return (act(x @ g.T) * (x @ u.T)) @ d.T

    scale = float(flat(dense).norm())
    vectors = [flat(t) for t in triples]
    outputs = [out(t) for t in triples]
    dense_out = out(dense)
    pairs = [(i, j) for i in range(len(triples)) for j in range(i + 1, len(triples))]

    def cos(a, b):
        return float(nn.functional.cosine_similarity(a, b, dim=-1).mean())

    return {
        "pairwise_rel_frobenius_mean": sum(float((vectors[i] - vectors[j]).norm()) for i, j in pairs) / len(pairs) / scale,
        "to_dense_rel_frobenius_mean": sum(float((v - flat(dense)).norm()) for v in vectors) / len(vectors) / scale,
        "pairwise_output_cosine_mean": sum(cos(outputs[i], outputs[j]) for i, j in pairs) / len(pairs),
        "to_dense_output_cosine_mean": sum(cos(o, dense_out) for o in outputs) / len(outputs),
        "pairwise_output_rel_error_mean": sum(float((outputs[i] - outputs[j]).norm() / outputs[j].norm())
                                              for i, j in pairs) / len(pairs),
    }


# --- the whole build ------------------------------------------------------------------------------------

@dataclass
class BuildSettings:
    experts: int = 8
    top_k: int = 2
    moe_layers: tuple[int, ...] = ()
    seq_len: int = 256
    windows_per_domain: int = 64         # cached prefix windows per domain (training draws from them)
    router_windows: int = 8              # windows per domain whose tokens fit the router
    train: TrainSettings = field(default_factory=TrainSettings)
    seed: int = 0
    domain_lr: dict[str, float] = field(default_factory=dict)   # domain name -> its peak rate (else train.lr)
    domain_reinit: dict[str, float] = field(default_factory=dict)   # domain name -> its reinit (else train.reinit)
    router_train: TrainSettings | None = None   # train_routers on the router-fit windows (None: classifiers only)


def expert_train_settings(settings: BuildSettings, domain: int, name: str) -> TrainSettings:
    """How the expert of domain ``domain`` (``name``) is trained: ``settings.train`` with the seed
    ``settings.seed + domain`` and the domain's own peak rate when ``domain_lr`` names it.

    Why a per-domain rate (issue 32): one peak rate for all domains either leaves the experts of text the
    dense model already models well (web, book) worse than the dense MLP (2e-3) or keeps the others close to
    it; a domain absent from ``domain_lr`` is trained exactly as before (same settings, same fingerprint),
    so its saved expert is reused. ``domain_reinit`` does the same for Drop-Upcycling's fraction
    (``drop_upcycle``): what an expert can re-learn of its re-initialized neurons grows with its rate."""
    rate = settings.domain_lr.get(name, settings.train.lr)
    reinit = settings.domain_reinit.get(name, settings.train.reinit)
    return TrainSettings(**{**vars(settings.train), "seed": settings.seed + domain, "lr": rate, "reinit": reinit})


@dataclass
class DomainSplit:
    """One domain's windows (N × seq_len token ids), disjoint by use: the expert trains on ``train``; the
    router is fitted on ``router_fit`` and its accuracy measured on ``router_test`` (out of sample);
    ``held_out`` is for the per-domain losses. Empty tensors are allowed for the last three."""

    name: str
    train: torch.Tensor
    router_fit: torch.Tensor
    router_test: torch.Tensor
    held_out: torch.Tensor


def build(dense: nn.Module, tokenizer, text: str, settings: BuildSettings,
          progress=lambda message: None, checkpoints: Path | None = None) -> tuple[nn.Module, dict]:
    """Dense model + training text -> (the MoE model, a record of how it was built and what it is); the
    domains are k-means clusters of the text's paragraphs. The router is fitted on the last
    ``router_windows`` training windows of each domain (in sample) and tested on as many unused ones."""
    dense.eval()
    parts = paragraphs(text)
    labels = domain_labels(parts, tokenizer, dense.model.embed_tokens.weight, settings.experts, settings.seed)
    windows = domain_windows(parts, labels, tokenizer, settings.seq_len)
    progress(f"{len(parts)} paragraphs -> {settings.experts} domains of {[len(w) for w in windows]} windows "
             f"of {settings.seq_len}")
    g = torch.Generator().manual_seed(settings.seed)
    splits = []
    for domain, w in enumerate(windows):
        order = torch.randperm(len(w), generator=g)
        chosen, unused = w[order[:settings.windows_per_domain]], w[order[settings.windows_per_domain:]]
        splits.append(DomainSplit(f"cluster{domain}", chosen, chosen[-settings.router_windows:],
                                  unused[:settings.router_windows], unused[:0]))
    model, info = build_from_domains(dense, splits, settings, progress, checkpoints)
    info.update(domains_windows=[len(w) for w in windows], paragraphs=len(parts))
    return model, info


class BuildPaused(Exception):
    """``max_new_experts`` experts were trained and checkpointed; the next run resumes after them."""


def build_from_domains(dense: nn.Module, splits: list[DomainSplit], settings: BuildSettings,
                       progress=lambda message: None, checkpoints: Path | None = None,
                       max_new_experts: int | None = None, prefix_cache: Path | None = None
                       ) -> tuple[nn.Module, dict]:
    """One expert per domain split, a router per MoE layer, the assembled MoE and its record.

    With ``checkpoints`` every trained expert is saved there (``expert-<i>-<name>.pt``, with a fingerprint
    of its settings and training windows) and reused on the next run: an interrupted build resumes.
    ``max_new_experts``: raise ``BuildPaused`` before training one more than that (a bounded job stops
    cleanly between experts); ``prefix_cache``: see ``cached_prefix``."""
    layers = sorted(settings.moe_layers)
    if not layers:
        raise ValueError("no MoE layers chosen")
    if len(splits) != settings.experts:
        raise ValueError(f"{len(splits)} domains for {settings.experts} experts")
    unknown = sorted((set(settings.domain_lr) | set(settings.domain_reinit)) - {s.name for s in splits})
    if unknown or any(not rate > 0 for rate in settings.domain_lr.values()):
        raise ValueError(f"domain_lr/domain_reinit: unknown domains {unknown} or a rate <= 0 in {settings.domain_lr}")
    dense.eval()
    trunk = Trunk(dense, layers[0])
    experts: dict[int, list[tuple[torch.Tensor, ...]]] = {i: [] for i in layers}
    curves, new, own_losses = [], 0, {}
    for domain, split in enumerate(splits):
        path = checkpoints / f"expert-{domain}-{split.name}.pt" if checkpoints is not None else None
        may_train = max_new_experts is None or new < max_new_experts
        trained, losses, own, fresh = saved_or_trained_expert(trunk, layers, domain, split,
                                                              expert_train_settings(settings, domain, split.name),
                                                              path, may_train, prefix_cache, progress)
        new += fresh
        for i in layers:
            experts[i].append(tuple(trained[i]))
        curves.append(losses)
        own_losses[split.name] = own
    routers, accuracy = fit_routers(trunk, layers, splits)
    dense_mlps = {i: mlp_weights(dense.model.layers[i].mlp) for i in layers}
    act = dense.model.layers[layers[0]].mlp.act_fn
    features = router_features(trunk, layers, [s.router_fit for s in splits])
    differences = {i: expert_differences(experts[i], dense_mlps[i], torch.cat(features[i])[::7], act)
                   for i in layers}
    model = assemble(dense, experts, routers, settings.top_k)
    trained_routers = route_by_loss(model, layers, splits, settings, prefix_cache) if settings.router_train else {}
    info = {**trained_routers, "domains": [s.name for s in splits], "moe_layers": layers,
            "windows": {s.name: {k: len(getattr(s, k)) for k in ("train", "router_fit", "router_test", "held_out")}
                        for s in splits},
            "loss_first": [c[0] for c in curves], "loss_last5": [sum(c[-5:]) / len(c[-5:]) for c in curves],
            "router_top1_domain_accuracy": accuracy["in_sample"],
            "router_top1_domain_accuracy_out_of_sample": accuracy["out_of_sample"],
            "expert_differences": differences, "expert_own_held_out_loss": own_losses,
            "expert_lr": {s.name: expert_train_settings(settings, d, s.name).lr for d, s in enumerate(splits)}}
    if settings.train.reinit or settings.domain_reinit:
        info["expert_reinit"] = {s.name: expert_train_settings(settings, d, s.name).reinit for d, s in enumerate(splits)}
    return model, info


def saved_or_trained_expert(trunk: Trunk, layers: list[int], domain: int, split: DomainSplit, train: TrainSettings,
                            path: Path | None, may_train: bool, prefix_cache: Path | None, progress
                            ) -> tuple[dict[int, tuple[torch.Tensor, ...]], list[float], float | None, bool]:
    """One domain's expert: the checkpoint at ``path`` when its fingerprint (layers, settings, windows) matches,
    else trained now and saved there (write, then rename). Returns (weights per layer, loss curve, the expert's
    own held-out loss or None, whether it was trained now); ``may_train`` False raises ``BuildPaused`` instead."""
    fingerprint = expert_fingerprint(layers, train, split.train)
    saved = torch.load(path) if path is not None and path.exists() else None
    if saved is not None and saved["fingerprint"] == fingerprint:
        progress(f"domain {domain} ({split.name}): reused {path.name}")
        return saved["trained"], saved["losses"], saved.get("own_held_out_loss"), False
    if not may_train:
        raise BuildPaused(f"new experts trained up to the limit; stopped before domain {domain} ({split.name})")
    started = time.perf_counter()
    hidden = cached_prefix(trunk, split.train, prefix_cache)
    progress(f"domain {domain} ({split.name}): prefix of {len(split.train)} windows ({time.perf_counter() - started:.0f} s)")
    trained, losses = train_expert(trunk, layers, hidden, split.train, train)
    own = expert_loss(trunk, trained, split.held_out) if len(split.held_out) else None
    progress(f"domain {domain} ({split.name}): loss {losses[0]:.3f} -> {sum(losses[-5:]) / len(losses[-5:]):.3f} "
             f"({time.perf_counter() - started:.0f} s)")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"fingerprint": fingerprint, "trained": trained, "losses": losses, "own_held_out_loss": own},
                   path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return trained, losses, own, True


def route_by_loss(model: nn.Module, layers: list[int], splits: list[DomainSplit], settings: BuildSettings,
                  prefix_cache: Path | None) -> dict:
    """``train_routers`` on every domain's router-fit windows, in place; the record: the loss curve's ends and
    the trained routers' top-1 = domain accuracy on the MoE's own MLP inputs, in and out of sample."""
    assert settings.router_train is not None
    ids = torch.cat([s.router_fit for s in splits])
    trunk = Trunk(model, min(layers))
    losses = train_routers(model, layers, cached_prefix(trunk, ids, prefix_cache), ids, settings.router_train)
    routers = {i: model.model.layers[i].mlp.gate.weight.detach() for i in layers}
    fit = router_features(trunk, layers, [s.router_fit for s in splits])
    test = router_features(trunk, layers, [s.router_test for s in splits])
    return {"router_train_loss_first_last5": [losses[0], sum(losses[-5:]) / len(losses[-5:])],
            "trained_router_top1_domain_accuracy": router_accuracy(routers, fit),
            "trained_router_top1_domain_accuracy_out_of_sample": router_accuracy(routers, test)}


def expert_fingerprint(layers: list[int], train: TrainSettings, windows: torch.Tensor) -> str:
    """What a saved expert must match to be reused: its layers, training settings and windows."""
    import hashlib

    digest = hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    # reinit 0 is left out: the experts saved before the option existed keep their fingerprints
    fields = sorted((k, v) for k, v in vars(train).items() if not (k == "reinit" and v == 0.0))
    return f"layers={layers};{fields};windows={tuple(windows.shape)}:{digest}"


def router_features(trunk: Trunk, layers: list[int], windows: list[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """The MLP inputs of every MoE layer on each domain's ``windows`` (dense model), one tensor per domain."""
    features: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    with torch.no_grad():
        for ids in windows:
            collected: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
            if len(ids):
                trunk.suffix(trunk.prefix(ids), collected)
            for i in layers:
                features[i].append(torch.cat(collected[i]) if collected[i] else torch.zeros(0, trunk.model.config.hidden_size))
    return features


def fit_routers(trunk: Trunk, layers: list[int], splits: list[DomainSplit]
                ) -> tuple[dict[int, torch.Tensor], dict[str, dict[int, float | None]]]:
    """Per MoE layer, the logistic-regression router fitted on the ``router_fit`` windows' MLP inputs
    (labelled by domain), and its top-1 = domain accuracy on them and on the ``router_test`` windows."""
    fit = router_features(trunk, layers, [s.router_fit for s in splits])
    test = router_features(trunk, layers, [s.router_test for s in splits])
    routers = {i: fit_router(torch.cat(fit[i]), domain_labels_of(fit[i]), len(splits)) for i in layers}
    return routers, {"in_sample": router_accuracy(routers, fit), "out_of_sample": router_accuracy(routers, test)}


def domain_labels_of(features: list[torch.Tensor]) -> torch.Tensor:
    """The domain index of every row of ``torch.cat(features)`` (one tensor per domain)."""
    return torch.cat([torch.full((len(f),), d, dtype=torch.long) for d, f in enumerate(features)])


def router_accuracy(routers: dict[int, torch.Tensor], features: dict[int, list[torch.Tensor]]
                    ) -> dict[int, float | None]:
    """Per layer, the share of tokens whose top-1 expert is their domain's (None without tokens)."""
    accuracy: dict[int, float | None] = {}
    for i, router in routers.items():
        x, y = torch.cat(features[i]), domain_labels_of(features[i])
        accuracy[i] = float(((x.double() @ router.double().T).argmax(1) == y).double().mean()) if len(y) else None
    return accuracy


def held_out_loss(trunk: Trunk, ids: torch.Tensor, batch: int = 4, hidden: torch.Tensor | None = None) -> float:
    """Mean next-token loss of the trunk's model on ``ids`` (N × seq_len); ``hidden``: their prefix
    output, if already computed."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            h = hidden[start:start + batch] if hidden is not None else trunk.prefix(chunk)
            logits = trunk.suffix(h)
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               chunk[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(loss), count + chunk[:, 1:].numel()
    return total / count


def expert_loss(trunk: Trunk, trained: dict[int, tuple[torch.Tensor, ...]], ids: torch.Tensor,
                hidden: torch.Tensor | None = None) -> float:
    """``held_out_loss`` of the dense model with the MLPs of ``trained``'s layers replaced by one expert's
    (gate, up, down): the expert alone on ``ids``, as against the dense MLP. The model is left unchanged.
    ``hidden``: the frozen prefix's output on ``ids``, if computed (the prefix precedes every MoE layer)."""
    mlps = {i: trunk.model.model.layers[i].mlp for i in trained}
    saved = {i: mlp_weights(m) for i, m in mlps.items()}
    try:
        for i, weights in trained.items():
            for linear, w in zip((mlps[i].gate_proj, mlps[i].up_proj, mlps[i].down_proj), weights):
                linear.weight.data.copy_(w)
        return held_out_loss(trunk, ids, hidden=hidden)
    finally:
        for i, weights in saved.items():
            for linear, w in zip((mlps[i].gate_proj, mlps[i].up_proj, mlps[i].down_proj), weights):
                linear.weight.data.copy_(w)


def cached_prefix(trunk: Trunk, windows: torch.Tensor, cache: Path | None) -> torch.Tensor:
    """``trunk.prefix(windows)``, saved under ``cache`` (named by the split layer and the windows' hash)
    and reused: the frozen prefix costs as much as the training itself, and a pilot's domains recur in
    the build."""
    import hashlib

    if cache is None:
        return trunk.prefix(windows)
    digest = hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    path = cache / f"prefix-{trunk.start}-{tuple(windows.shape)}-{digest}.pt".replace(" ", "")
    if path.exists():
        return torch.load(path)
    hidden = trunk.prefix(windows)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(hidden, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return hidden


__all__ = ["BuildPaused", "BuildSettings", "DomainSplit", "Trunk", "TrainSettings", "assemble", "build", "build_from_domains",
           "cached_prefix", "domain_labels", "domain_windows", "drop_upcycle", "expert_differences", "expert_loss", "expert_train_settings", "fit_router", "fit_routers", "held_out_loss",
           "fit_parameters", "learning_rate_factor", "mlp_weights", "moe_config", "next_token_loss", "paragraphs",
           "route_by_loss", "router_accuracy", "router_features", "saved_or_trained_expert", "train_expert", "train_routers", "window_draws"]
