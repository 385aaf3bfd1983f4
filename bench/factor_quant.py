"""Quantized factors (issue 27 item 1): per module, how much output error 4-bit quantization of a whiten pair's
factors adds, against quantizing the dense weight, for each way of splitting Σ between the factors.

    .venv/bin/python bench/factor_quant.py --model models/smollm2-135m --layers 0,10 --json runs/factor_quant.json

Every Gram comes from the *dense* model (WikiText-2 validation, ``--calibration`` seeded windows, as the recipe
draws them), so the numbers isolate one module's quantization from error propagation. Per module: the rank of
``--ratio`` and the whiten factors (SVD-LLM, S·Sᵀ = G + λ·mean(diag G)·I, W·S = UΣVᵀ): ``balanced`` is what
``whiten`` stores (B = U_rΣ_r^½, A = Σ_r^½V_rᵀS⁻¹), ``sigma-up`` puts Σ into B (A = V_rᵀS⁻¹), ``sigma-down``
into A (B = U_r). Each pair is quantized by the ``rtn``/``gptq`` stages' own code with ``apply_to: factors``
(GPTQ: A with G, B with A_q·G·A_qᵀ) at ``--bits`` and each group size. Printed: ‖X(W−Ŵ)ᵀ‖_F/‖XWᵀ‖_F on the
calibration Gram, for the dense weight quantized by gptq, the float pair, and every quantized pair.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from grams import collect_grams
from matching_drift import truncated
from lrcompress.compressor import get_compressor
from lrcompress.compressor.linalg import rank_for_ratio, relative_output_error, truncated_svd, whitening
from lrcompress.data.sources import data_dir, load_text
from lrcompress.data.windows import calibration_windows, tokenize
from lrcompress.models.loading import load_model
from lrcompress.modules import LowRankLinear, dense_weight

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def splits(weight: torch.Tensor, gram: torch.Tensor, rank: int, damping: float) -> dict[str, tuple]:
    """(B, A) of the whiten truncation for each way of splitting Σ."""
    white = whitening(gram, damping)
    u, s, vh = truncated_svd(weight.to(torch.float64) @ white.factor, rank)
    down = vh @ white.inverse
    return {"balanced": (u * s.sqrt(), s.sqrt()[:, None] * down), "sigma-up": (u * s, down),
            "sigma-down": (u, s[:, None] * down)}


def module_row(name: str, linear: torch.nn.Linear, stat, ratio: float, bits: int, groups: list[int],
               damping: float) -> dict:
    weight = linear.weight.detach()
    gram = stat.gram(name).to(torch.float64)
    rank = rank_for_ratio(weight.shape[0], weight.shape[1], ratio)
    row = {"module": name, "rank": rank}
    gptq = get_compressor("gptq")
    for group in groups:
        quantized = gptq(gptq.Config(bits=bits, group_size=group)).compress(name, linear, {"gram": stat}).module
        row[f"dense gptq g{group}"] = relative_output_error(weight, dense_weight(quantized), gram)
    for split, (up, down) in splits(weight, gram, rank, damping).items():
        pair = LowRankLinear.from_factors(up, down, None, weight.dtype)
        row["float pair"] = relative_output_error(weight, dense_weight(pair), gram)
        for method in ("rtn", "gptq"):
            cls = get_compressor(method)
            for group in groups:
                quantizer = cls(cls.Config(bits=bits, group_size=group, apply_to="factors"))
                packed = quantizer.compress(name, pair, {"gram": stat}).module
                row[f"{split} {method} g{group}"] = relative_output_error(weight, dense_weight(packed), gram)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", default="0,10", help="comma-separated decoder layer indices")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--groups", default="128,32", help="comma-separated group sizes")
    parser.add_argument("--damping", type=float, default=1e-4, help="whiten's λ")
    parser.add_argument("--calibration", type=int, default=8, help="calibration windows (WikiText-2 validation)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("runs/factor_quant.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    layers = [int(i) for i in args.layers.split(",")]
    groups = [int(g) for g in args.groups.split(",")]
    loaded = load_model(args.model)
    model = truncated(loaded.model, max(layers) + 1)
    directory = data_dir()
    if directory is None:
        raise SystemExit("set LRCOMPRESS_DATA (the directory holding wikitext-2-raw/)")
    ids = tokenize(loaded.tokenizer, load_text("wikitext2", "validation", directory).text)
    names = [f"model.layers.{i}.{linear}" for i in layers for linear in LINEARS]
    stats = collect_grams(model, names, calibration_windows(ids, args.calibration, args.seq_len, 0), batch_size=4)
    rows = [module_row(name, model.get_submodule(name), stats[name], args.ratio, args.bits, groups,
                       args.damping) for name in names]
    columns = [key for key in rows[0] if key not in ("module", "rank")]
    print(f"relative output error on the calibration Gram; ratio {args.ratio}, {args.bits}-bit, "
          f"{args.calibration}×{args.seq_len} windows")
    print("module".ljust(32) + "".join(c.rjust(22) for c in columns))
    for row in rows:
        print(row["module"].removeprefix("model.").ljust(32) + "".join(f"{row[c]:22.4f}" for c in columns))
    means = {c: sum(r[c] for r in rows) / len(rows) for c in columns}
    print("mean".ljust(32) + "".join(f"{means[c]:22.4f}" for c in columns))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "means": means,
                                     "seconds": time.perf_counter() - started, "platform": platform.platform()},
                                    indent=2))
    print(f"{time.perf_counter() - started:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
