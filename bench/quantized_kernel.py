"""The Triton quantized-matmul kernel against dequantize + F.linear, on SmolLM2-135M's linear shapes (CUDA).

    python bench/quantized_kernel.py [--bits 4] [--group 64] [--dtype bfloat16]

For each shape (out × in: 576×576, 1536×576, 576×1536) and batch (1 and 16 tokens): the kernel
(``triton_kernels.quantized.quantized_matmul``, straight from the packed codes) and what the CUDA forward
did before it (``QuantizedLinear.dense_weight()`` then ``F.linear``), each timed with CUDA events as the
median of 50 calls after 10 warm-up calls; the table gives both in µs and their ratio (dequant / kernel:
above 1, the kernel is faster) and the largest difference between their outputs relative to the largest
output (one bfloat16 unit is 2^-8 ≈ 0.004). Random codes: speed does not depend on the values. Needs a CUDA GPU
and Triton; on a machine without one it says so and exits. Not yet run: no GPU where it was written.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (1536, 576), (576, 1536)]
BATCHES = [1, 16]


def quantized_module(out_features: int, in_features: int, bits: int, group: int, dtype: torch.dtype):
    from lrcompress.modules import QuantizedLinear

    g = torch.Generator().manual_seed(out_features + in_features)
    groups = -(-in_features // group)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=g)
    scales = torch.rand(out_features, groups, generator=g) / 2**bits + 1e-3
    zeros = torch.randint(0, 2**bits, (out_features, groups), generator=g)
    module = QuantizedLinear.from_codes(codes, scales.to(torch.float16).float(), zeros, bits, group, "float16",
                                        None, dtype)
    return module.cuda()


def median_us(fn: Callable[[], torch.Tensor], repeats: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/quantized_kernel.py needs a CUDA GPU (the kernel is Triton on CUDA); none is available here")
    try:
        from lrcompress.triton_kernels.quantized import quantized_matmul
    except ImportError as error:
        sys.exit(f"bench/quantized_kernel.py needs Triton: {error}")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}  bits={args.bits} group={args.group} activations={args.dtype}")
    print(f"{'out×in':>10} {'batch':>5} {'kernel µs':>10} {'dequant+linear µs':>18} {'ratio':>6} {'rel diff':>9}")
    with torch.no_grad():
        for out_features, in_features in SHAPES:
            module = quantized_module(out_features, in_features, args.bits, args.group, dtype)
            ops = module.kernel_operands()
            for batch in BATCHES:
                x = torch.randn(batch, in_features, device="cuda", dtype=dtype)
                got = quantized_matmul(x, ops.qweight, ops.scales, ops.zeros, module.bits, module.group_size, ops.perm)
                want = F.linear(x, module.dense_weight().to(dtype))
                diff = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                kernel = median_us(lambda: quantized_matmul(x, ops.qweight, ops.scales, ops.zeros, module.bits,
                                                            module.group_size, ops.perm))
                dense = median_us(lambda: F.linear(x, module.dense_weight().to(dtype)))
                print(f"{out_features:>4}×{in_features:<5} {batch:>5} {kernel:>10.1f} {dense:>18.1f} "
                      f"{dense / kernel:>6.2f} {diff:>9.1e}")


if __name__ == "__main__":
    main()
