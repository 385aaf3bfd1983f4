"""The Triton sparse-dictionary kernel against its torch reference and the dense linear, on SmolLM2-135M's
linear shapes (CUDA).

    python bench/sparse_dict_kernel.py [--dtype float32] [--json OUT.json]

A CoSpaDi module computes y = (x·D)·S: a dense product with the dictionary D (in × k atoms), then the
column-sparse S (k × out, s nonzeros per column, stored as s × out indices and values). The kernel
(``triton_kernels.sparse_dict.sparse_dict_matmul``) does the second product straight from the indices;
the reference (``triton_kernels.reference``) gathers and sums in torch. For each shape, batch 1 and 16
tokens: both timed with CUDA events (median of 50 calls after 10 warm-up calls), the dense ``F.linear``
of the same in × out beside them, and the kernel's largest difference from the reference relative to the
reference's largest value. Atoms k = in/2, s = k/8 per column (random: speed does not depend on the
values). Needs a CUDA GPU and Triton; without them it says so and exits (code 1). Not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from quantized_kernel import median_us  # bench/quantized_kernel.py, beside this script

SHAPES = [(576, 576), (1536, 576), (576, 1536)]       # out × in
BATCHES = [1, 16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float32")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/sparse_dict_kernel.py needs a CUDA GPU (the kernel is Triton on CUDA); none is available here")
    try:
        from lrcompress.triton_kernels import reference
        from lrcompress.triton_kernels.sparse_dict import sparse_dict_matmul
    except ImportError as error:
        sys.exit(f"bench/sparse_dict_kernel.py needs Triton: {error}")
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{torch.cuda.get_device_name()}  activations={args.dtype}")
    print(f"{'out×in':>10} {'batch':>5} {'kernel µs':>10} {'reference µs':>13} {'dense µs':>9} {'rel diff':>9}")
    with torch.no_grad():
        for out_features, in_features in SHAPES:
            atoms = in_features // 2
            s = max(atoms // 8, 1)
            indices = torch.stack([torch.randperm(atoms, generator=g)[:s] for _ in range(out_features)], 1)
            indices = indices.to(torch.int16).cuda()
            values = torch.randn(s, out_features, generator=g).to(dtype).cuda()
            weight = torch.randn(out_features, in_features, generator=g).to(dtype).cuda()
            for batch in BATCHES:
                z = torch.randn(batch, atoms, generator=g).to(dtype).cuda()
                x = torch.randn(batch, in_features, generator=g).to(dtype).cuda()
                got, want = sparse_dict_matmul(z, indices, values), reference.sparse_dict_matmul(z, indices, values)
                diff = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                row = {"out": out_features, "in": in_features, "atoms": atoms, "s": s, "batch": batch,
                       "kernel_us": median_us(lambda: sparse_dict_matmul(z, indices, values)),
                       "reference_us": median_us(lambda: reference.sparse_dict_matmul(z, indices, values)),
                       "dense_us": median_us(lambda: F.linear(x, weight)), "relative_difference": diff}
                rows.append(row)
                print(f"{out_features:>4}×{in_features:<5} {batch:>5} {row['kernel_us']:>10.1f} "
                      f"{row['reference_us']:>13.1f} {row['dense_us']:>9.1f} {diff:>9.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
