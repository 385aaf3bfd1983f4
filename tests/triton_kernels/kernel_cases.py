"""Run each Triton kernel (interpreted when TRITON_INTERPRET=1) and its reference; print errors as JSON."""
import json
import math
import time

import torch

from lrcompress.core.packing import pack_codes
from lrcompress.triton_kernels import omp as omp_kernel
from lrcompress.triton_kernels import quantized as quantized_kernel
from lrcompress.triton_kernels import reference
from lrcompress.triton_kernels import sparse_dict as sparse_kernel


def sparse_cases():
    out = []
    # (tokens, atoms k, outputs n, sparsity s): s = 1, k not a power of two, n not a block multiple
    for m, k, n, s in [(5, 7, 3, 1), (33, 13, 70, 4), (1, 6, 65, 6), (40, 37, 129, 5)]:
        g = torch.Generator().manual_seed(m * 1000 + n)
        z = torch.randn(m, k, generator=g)
        idx = torch.stack([torch.randperm(k, generator=g)[:s] for _ in range(n)], dim=1).to(torch.int16)
        val = torch.randn(s, n, generator=g)
        got = sparse_kernel.sparse_dict_matmul(z, idx, val, block_m=16, block_n=32)
        want = reference.sparse_dict_matmul(z, idx, val)
        out.append({"shape": [m, k, n, s], "max_error": (got - want).abs().max().item(),
                    "scale": want.abs().max().item()})
    return out


def omp_cases():
    out = []
    for n, k, cols, s in [(9, 7, 5, 1), (20, 19, 11, 6), (16, 40, 3, 9), (6, 11, 4, 8)]:
        g = torch.Generator().manual_seed(n * 100 + k)
        d = torch.randn(n, k, generator=g, dtype=torch.float64)
        d /= d.norm(dim=0)
        x = torch.randn(n, cols, generator=g, dtype=torch.float64)
        x[:, 0] = 2 * d[:, 1] - d[:, 4]          # exactly 2-sparse: later slots take the "in the span" path
        gram = (d.T @ d).contiguous()
        alpha0 = (d.T @ x).T.contiguous()
        states = []
        for step_fn in (reference.omp_step, lambda *a: omp_kernel.omp_step(*a, block_k=8, block_t=4)):
            state = [alpha0.clone(), alpha0, torch.zeros(cols, s, dtype=torch.int64),
                     torch.zeros(cols, s, s, dtype=torch.float64), torch.zeros(cols, s, dtype=torch.float64),
                     torch.zeros(cols, k, dtype=torch.bool),
                     torch.zeros(cols, s, dtype=torch.bool)]
            alpha, a0, support, linv, y, selected, valid = state
            scattered = torch.zeros(cols, k, dtype=torch.float64)
            for t in range(s):
                step_fn(gram, alpha, a0, support, linv, y, selected, valid, t, 1e-10)
                scattered.zero_()
                scattered.scatter_(1, support[:, : t + 1], linv[:, t, : t + 1])
                alpha.sub_(y[:, t : t + 1] * (scattered @ gram))
            states.append((support.clone(), linv.clone(), y.clone(), valid.clone()))
        (s1, l1, y1, v1), (s2, l2, y2, v2) = states
        # once a column is exactly represented (invalid slots), the atoms picked from round-off differ
        same = torch.equal(v1, v2) and torch.equal(s1[v1], s2[v2])
        out.append({"shape": [n, k, cols, s], "supports_equal": bool(same), "invalid_slots": int((~v1).sum()),
                    "max_error": max((l1 - l2).abs().max().item(), (y1 - y2).abs().max().item())})
    return out


# (bits, in K, out N, x's leading shape, group, act order, activation dtype, bias, blocks or None = defaults):
# groups that divide K and ragged ones, N and K off the tile sizes, several K and N tiles with 16³ blocks
QUANTIZED = [
    (2, 40, 18, (1,), 8, False, torch.float32, True, None),
    (3, 45, 37, (5,), 16, False, torch.float32, False, (16, 16, 16)),
    (4, 48, 20, (2, 3), 16, True, torch.float32, True, (16, 16, 16)),
    (8, 33, 17, (3,), 10, True, torch.float16, False, None),
    (4, 40, 24, (1,), 32, True, torch.bfloat16, True, (16, 16, 16)),
    (3, 29, 19, (4,), 7, True, torch.bfloat16, False, None),
    (5, 29, 19, (4,), 7, True, torch.float32, True, (16, 16, 16)),
    (7, 23, 9, (1,), 23, False, torch.float16, True, None),
    (2, 70, 33, (17,), 16, False, torch.float16, False, None),
    (8, 36, 40, (2,), 12, False, torch.bfloat16, True, (16, 16, 16)),
]


def quantized_cases():
    out = []
    for bits, k, n, lead, group, act_order, dtype, has_bias, blocks in QUANTIZED:
        g = torch.Generator().manual_seed(bits * 1000 + k * 10 + n)
        groups = math.ceil(k / group)
        qweight = pack_codes(torch.randint(0, 2**bits, (n, k), generator=g), bits)
        scales = (torch.rand(n, groups, generator=g) / 2**bits + 1e-3).to(torch.float16)
        zeros = torch.randint(0, 2**bits, (n, groups), generator=g).to(torch.uint8)
        perm = torch.randperm(k, generator=g).to(torch.int32) if act_order else None
        bias = torch.randn(n, generator=g) if has_bias else None
        x = torch.randn(*lead, k, generator=g).to(dtype)
        block_m, block_n, block_k = blocks or (None, None, None)
        start = time.perf_counter()
        got = quantized_kernel.quantized_matmul(x, qweight, scales, zeros, bits, group, perm, bias,
                                                block_m=block_m, block_n=block_n, block_k=block_k)
        seconds = time.perf_counter() - start
        want = reference.quantized_matmul(x, qweight, scales, zeros, bits, group, perm, bias)
        out.append({"case": [bits, k, n, list(lead), group, act_order, str(dtype), has_bias, blocks],
                    "dtype": str(dtype).removeprefix("torch."), "shape": list(got.shape), "dtype_out": str(got.dtype),
                    "max_error": (got.double() - want.double()).abs().max().item(),
                    "scale": want.double().abs().max().item(), "seconds": seconds})
    return out


if __name__ == "__main__":
    print(json.dumps({"sparse_dict": sparse_cases(), "omp": omp_cases(), "quantized": quantized_cases()}))
