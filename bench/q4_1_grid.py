"""How far the demo model's weights sit from a 4-bit grid (issue 27, the confound): the demo model is a
dequantized Q4_1 GGUF, so 4-bit rounding re-quantizes weights that already lie on a 4-bit grid.

    .venv/bin/python bench/q4_1_grid.py --model models/smollm2-135m --json runs/q4_1_grid.json

For every decoder-layer linear (weight out × in), per block of ``--block`` consecutive inputs of a row:

- ``q4_1``: the GGUF Q4_1 grid, w ≈ d·q + m with q ∈ 0..15, d = (max − min)/15 and m = min, both stored
  as float16 (ggml's ``quantize_row_q4_1``: the minimum is a float, not an integer step from zero);
- ``rtn``: lrcompress's ``rtn`` grid (``compressor.quantgrid``: range widened to include 0, an integer
  zero point, float16 scale), at group 32 and at group 128, 4 bits.

It prints, over all weights, the relative error ‖W − Ŵ‖_F / ‖W‖_F of each, and the fraction of blocks
each reproduces to float16 precision (max |w − ŵ| ≤ 1e-3·d). If the model came from Q4_1, ``q4_1``
reproduces nearly every block; ``rtn`` g32 does so only for blocks whose minimum is 0 or an integer
number of steps below it. Data-free: no calibration, a few seconds per layer on one thread.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lrcompress.compressor.quantgrid import QuantConfig, round_to_nearest
from lrcompress.models import adapter_for
from lrcompress.models.loading import load_model


def q4_1(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's Q4_1 of ``weight`` (rows × in, in divisible by ``block``): the dequantized weight and each
    block's step d (rows × in/block), all float64."""
    rows, columns = weight.shape
    w = weight.to(torch.float64).reshape(rows, columns // block, block)
    low, high = w.amin(dim=2), w.amax(dim=2)
    d = ((high - low) / 15).to(torch.float16).to(torch.float64)
    m = low.to(torch.float16).to(torch.float64)
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.clamp(torch.round((w - m[..., None]) * inverse[..., None]), 0, 15)
    return (q * d[..., None] + m[..., None]).reshape(rows, columns), d


def rtn(weight: torch.Tensor, group: int) -> torch.Tensor:
    codes, scales, zeros = round_to_nearest(weight, QuantConfig(bits=4, group_size=group, scale_dtype="float16"))
    index = torch.arange(codes.shape[1]) // group          # each input's group
    return (codes.to(torch.float64) - zeros[:, index]) * scales[:, index]


def reproduced(weight: torch.Tensor, approx: torch.Tensor, step: torch.Tensor, block: int) -> tuple[int, int]:
    """(blocks reproduced to 1e-3 of their Q4_1 step, blocks)."""
    rows, columns = weight.shape
    error = (weight.to(torch.float64) - approx).abs().reshape(rows, columns // block, block).amax(dim=2)
    return int((error <= 1e-3 * step.clamp_min(1e-12)).sum()), error.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m")
    parser.add_argument("--block", type=int, default=32, help="Q4_1's block (ggml QK4_1 = 32)")
    parser.add_argument("--json", type=Path, help="write the totals and per-kind numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    loaded = load_model(args.model, "float32")
    model = loaded.model
    adapter = adapter_for(model)
    names = ["q4_1", "rtn g32", "rtn g128"]
    squared = dict.fromkeys(names, 0.0)
    hits = dict.fromkeys(names, 0)
    blocks, norm = 0, 0.0
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = module.weight.detach()
            grid, step = q4_1(weight, args.block)
            approx = {"q4_1": grid, "rtn g32": rtn(weight, 32), "rtn g128": rtn(weight, 128)}
            norm += float(weight.to(torch.float64).square().sum())
            for key, value in approx.items():
                squared[key] += float((weight.to(torch.float64) - value).square().sum())
                hit, count = reproduced(weight, value, step, args.block)
                hits[key] += hit
            blocks += count
    result = {key: {"relative_error": (squared[key] / norm) ** 0.5, "blocks_reproduced": hits[key] / blocks}
              for key in names}
    result["meta"] = {"model": args.model, "blocks": blocks, "seconds": time.perf_counter() - started,
                      "machine": platform.processor() or platform.machine()}
    for key in names:
        print(f"{key:9s} relative error {result[key]['relative_error']:.3e}   blocks reproduced "
              f"{100 * result[key]['blocks_reproduced']:.1f}%")
    print(f"{blocks:,} blocks of {args.block}; {result['meta']['seconds']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
