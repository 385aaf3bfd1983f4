"""Triton kernels against their torch references, run by the Triton interpreter on the CPU.

TRITON_INTERPRET must be set before triton is imported, so the comparisons run in a subprocess
(``kernel_cases.py``) and report their errors as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def results() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("kernel_cases.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sparse_dict_forward_kernel_matches_the_reference(results):
    cases = results["sparse_dict"]
    assert len(cases) >= 4
    for case in cases:
        assert case["max_error"] <= 1e-5 * max(1.0, case["scale"]), case


def test_omp_step_kernel_matches_the_reference(results):
    cases = results["omp"]
    assert len(cases) >= 3 and any(case["invalid_slots"] for case in cases)   # the in-span path ran too
    for case in cases:
        assert case["supports_equal"], case
        assert case["max_error"] <= 1e-9, case


# Kernel and reference both round Ŵ and the bias to x's dtype, sum the products in float32 (in different
# orders: ~1e-6 relative apart) and round y once. In float32 that leaves the summation order; in float16
# the two float32 sums may round to neighbouring values: at most one unit in the last place of |y|,
# ≤ 2^-10·max|y| (11 significant bits). bfloat16 gets two units (2^-6 with 8 significant bits): the
# interpreter casts float32 → bfloat16 by truncation, not round-to-nearest as a GPU does (the Triton
# debugging guide: the interpreter does not support bfloat16 arithmetic), so the kernel's weight and
# output roundings there are each up to one unit instead of half; measured 1.1–1.6 units at most.
QUANTIZED_TOLERANCE = {"float32": 1e-5, "float16": 2.0**-10, "bfloat16": 2.0**-6}


def test_quantized_matmul_kernel_matches_the_reference(results):
    cases = results["quantized"]
    assert {case["case"][0] for case in cases} >= {2, 3, 4, 8}                     # code widths
    assert {case["case"][5] for case in cases} == {True, False}                    # act order
    assert {case["dtype"] for case in cases} == set(QUANTIZED_TOLERANCE)
    assert any(case["case"][1] % case["case"][4] for case in cases)                # a ragged last group
    assert any(case["case"][1] % case["case"][4] == 0 for case in cases)
    for case in cases:
        bits, k, n, lead = case["case"][:4]
        assert case["shape"] == [*lead, n] and case["dtype_out"] == f"torch.{case['dtype']}", case
        assert case["max_error"] <= QUANTIZED_TOLERANCE[case["dtype"]] * max(1.0, case["scale"]), case
