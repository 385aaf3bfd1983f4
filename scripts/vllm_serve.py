"""vLLM's OpenAI-compatible server with w8a8 layers on vLLM's oneDNN int8 kernel (docs/vllm.md, section 2).

On a CPU with AMX, vLLM 0.32 serves compressed-tensors w8a8 with its AMX int8 kernel, which on the machine
of bench/vllm.md runs in bfloat16 only (float32 is refused, float16 aborts); CPUs without AMX use the oneDNN
kernel anyway, in any dtype. This applies the same
switch as ``scripts/vllm_roundtrip.py`` (``int8_kernel=onednn``) and then runs
``python -m vllm.entrypoints.openai.api_server`` with the same arguments, in the vLLM venv:

  .venv-vllm/bin/python scripts/vllm_serve.py --model out/rtn-8bit --dtype float16
"""
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_roundtrip import use_onednn_int8  # noqa: E402

SERVER = "vllm.entrypoints.openai.api_server"

if __name__ == "__main__":
    # the engine runs in this process, so that it sees the switch (a spawned engine process would not)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    use_onednn_int8()
    sys.argv[0] = SERVER
    runpy.run_module(SERVER, run_name="__main__", alter_sys=True)
