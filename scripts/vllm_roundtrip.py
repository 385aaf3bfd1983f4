"""Round trips of lrcompress's exported checkpoints through vLLM (issue 30; docs/vllm.md).

For each case (an lrcompress run, its export, optionally a LoRA adapter) this compares the model as vLLM
serves the export with the model as ``lrcompress.load(run, kernels=False)`` computes it:

* greedy decoding of ``--new-tokens`` tokens on the same prompts (the same token ids go to both sides):
  identical token ids, or the first position where they differ with the gap there — the difference of
  the two candidates' log-probabilities under each side (a near-tie that numerics flip is a gap of a few
  hundredths; a wrong model is a gap of several nats);
* perplexity on ``--windows`` consecutive windows of WikiText-2 test (``--seq-len`` tokens, as
  ``lrcompress eval`` cuts them): ours from the logits, vLLM's from its prompt logprobs;
* with ``--speed``: prefill and decode tokens/s in vLLM, measured as ``lrcompress bench-infer`` measures
  them (same seeded random token ids, same lengths, median of repeats after a warm-up).

A w8a8 export (compressed-tensors "int-quantized": weights re-quantized per channel, inputs rounded to int8
per token, ``lrcompress/checkpoint/compressed_tensors.py``) is not the checkpoint's weight-only model, so it
is also compared with two lrcompress references that take its steps one at a time (``VARIANTS``): the
re-quantized weights alone, and those plus per-token int8 inputs — the model vLLM should compute.

Two processes, because vLLM's pins (torch, transformers, compressed-tensors) differ from the project's:
the driver runs in the project's environment (lrcompress imported) and starts this same file with
``--vllm-python`` (the venv ``scripts/vllm_env.sh`` builds) for the vLLM side, which imports only vLLM and
torch. They exchange JSON. Writes ``<out>/results.json`` and ``<out>/results.md``.

usage (project venv):
  python scripts/vllm_roundtrip.py --out DIR --case name=N,run=RUN,model=EXPORT[,lora=ADAPTER] [--case ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The theory of general relativity states that",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, the first humans to walk on the Moon",
    "A good recipe for pancakes needs",
    "The largest planet in the solar system is",
]
TOP_K = 5                 # vLLM's alternatives kept per decoding step (to explain a divergence)
DECODE_PROMPT_TOKENS = 16  # lrcompress bench-infer's decode prompt length (eval/inference_bench.py)
# lrcompress references of a w8a8 export besides the checkpoint itself: levels of simulate_w8a8
VARIANTS = {"w8a8-weights": None, "w8a8": 127.0}


def load_reference(run: str, variant: str | None = None) -> Any:
    """``lrcompress.load(run, kernels=False)``, or with ``variant`` its w8a8 simulation (``VARIANTS``)."""
    import lrcompress
    from lrcompress.checkpoint.compressed_tensors import simulate_w8a8

    model = lrcompress.load(run, kernels=False)
    return model if variant is None else simulate_w8a8(model, VARIANTS[variant])


def export_format(model_dir: str) -> str | None:
    """The compressed-tensors format of an export (None for a dense one)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("format")


# ---------------------------------------------------------------- the lrcompress side (project venv)

def inputs(tokenizer_dir: str, windows: int, seq_len: int, text: str) -> dict[str, Any]:
    """The token ids both sides get: the prompts, and ``windows`` consecutive windows of ``text`` (a dataset
    name, ``wikitext2``: its test split, or a text file) cut as ``lrcompress eval`` cuts them."""
    from transformers import AutoTokenizer

    from lrcompress.data.sources import load_text
    from lrcompress.data.windows import evaluation_windows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = os.environ.get("LRCOMPRESS_DATA")
    source = load_text(text, "test", Path(data) if data else None).text
    return {"prompts": [tokenizer(prompt).input_ids for prompt in PROMPTS],
            "windows": evaluation_windows(tokenize(tokenizer, source), seq_len, windows).tolist()}


_MEMO: dict[str, Any] = {}     # references and bench-infer reports, shared by the cases of one invocation


def memoized(key: Any, compute: Any) -> Any:
    """``compute()`` once per ``key`` (JSON-able) in this process: cases that differ only in vLLM's dtype
    or kernel share lrcompress's side."""
    text = json.dumps(key, sort_keys=True)
    if text not in _MEMO:
        _MEMO[text] = compute()
    return _MEMO[text]


def reference(run: str, ids: dict[str, Any], new_tokens: int, variant: str | None = None) -> dict[str, Any]:
    """Greedy tokens, and the summed NLL of the perplexity windows, of
    ``lrcompress.load(run, kernels=False)`` (float32; full recomputation each step, no KV cache), or of its
    w8a8 ``variant``, on the :func:`inputs` ``ids``."""
    return memoized(["reference", run, ids, new_tokens, variant],
                    lambda: _reference(run, ids, new_tokens, variant))


def _reference(run: str, ids: dict[str, Any], new_tokens: int, variant: str | None) -> dict[str, Any]:
    import torch

    model = load_reference(run, variant)
    prompts = []
    with torch.inference_mode():
        for prompt_text, prompt in zip(PROMPTS, ids["prompts"]):
            sequence = list(prompt)
            for _ in range(new_tokens):
                sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
            prompts.append({"text": prompt_text, "ids": prompt, "tokens": sequence[len(prompt):]})
        sums = []
        for window in torch.tensor(ids["windows"]):
            logits = model(input_ids=window[None]).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
            sums.append(float(nll))
    seq_len = len(ids["windows"][0])
    return {"prompts": prompts, "window_nll": sums,
            "perplexity": math.exp(sum(sums) / (len(sums) * (seq_len - 1)))}


def logprobs_at(run: str, sequences: list[list[int]], variant: str | None = None) -> list[list[float]]:
    """The reference's next-token log-probabilities (float64) at the end of each sequence: the logit gap
    at a divergence is read off these, for the token vLLM chose and the one we chose."""
    import torch

    model = load_reference(run, variant)
    with torch.inference_mode():
        return [torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0, -1].double(), -1).tolist()
                for s in sequences]


# ---------------------------------------------------------------- the vLLM side (vLLM venv)

def use_onednn_int8() -> None:
    """Make vLLM's CPU w8a8 layers take its oneDNN int8 kernel. On a CPU with AMX, vLLM 0.32 picks its AMX
    kernel (``int8_scaled_mm_with_quant``), which on this machine fails in every dtype (docs/vllm.md); CPUs
    without AMX get the oneDNN kernel anyway. The choice is ``check_cpu_sgl_kernel``, imported by name."""
    import vllm.model_executor.kernels.linear.scaled_mm.cpu as cpu_scaled_mm

    cpu_scaled_mm.check_cpu_sgl_kernel = lambda n, k, dtype: False


def vllm_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Generate, score the windows and (optionally) time the model ``spec`` names, in vLLM."""
    import torch

    if spec.get("int8_kernel") == "onednn":
        use_onednn_int8()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    lora = None
    # no prefix caching: the timed prompts repeat, and a cached prefill would be timed as free
    options: dict[str, Any] = dict(model=spec["model"], dtype=spec["dtype"], enforce_eager=True, seed=0,
                                   enable_prefix_caching=False,
                                   max_model_len=spec["max_model_len"], max_num_seqs=8,
                                   tokenizer=spec.get("tokenizer") or spec["model"])
    if spec.get("lora"):
        from vllm.lora.request import LoRARequest

        options.update(enable_lora=True, max_lora_rank=spec["lora_rank"], max_loras=1)
        lora = LoRARequest("adapter", 1, spec["lora"])
    started = time.perf_counter()
    llm = LLM(**options)
    result: dict[str, Any] = {"load_seconds": time.perf_counter() - started, "vllm": _version("vllm"),
                              "torch": torch.__version__}
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True, logprobs=TOP_K)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], greedy,
                           lora_request=lora, use_tqdm=False)
    result["generations"] = [{"tokens": list(o.outputs[0].token_ids),
                              "top": [sorted(([int(t), float(lp.logprob)] for t, lp in step.items()),
                                             key=lambda pair: -pair[1])
                                      for step in o.outputs[0].logprobs]} for o in outputs]
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    windows = [TokensPrompt(prompt_token_ids=w) for w in spec["windows"]]
    if lora is None:
        scored = llm.generate(windows, scoring, use_tqdm=False)
    else:   # one window per step: with LoRA, vLLM maps the lm_head's LoRA rows per request, not per prompt
        # token, and prompt logprobs of several requests fail to broadcast (vllm-project/vllm#29955, #16668)
        scored = [llm.generate([w], scoring, lora_request=lora, use_tqdm=False)[0] for w in windows]
    result["window_nll"] = [-sum(step[token].logprob for token, step in zip(w[1:], o.prompt_logprobs[1:]))
                            for w, o in zip(spec["windows"], scored)]
    if spec.get("speed"):
        result["speed"] = vllm_speed(llm, lora, spec["speed"], TokensPrompt, SamplingParams)
    return result


def vllm_speed(llm: Any, lora: Any, settings: dict[str, int], tokens_prompt: Any, sampling: Any) -> dict[str, Any]:
    """Prefill and decode tokens/s as ``lrcompress bench-infer`` defines them (batch 1): prefill = a
    ``prompt_tokens`` prompt and one generated token; decode = ``new_tokens`` greedy tokens after a
    16-token prompt, its prefill included. Same seeded random ids; median of ``repeats`` after a warm-up."""
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prefill_ids = torch.randint(0, vocab, (1, settings["prompt_tokens"]), generator=g)[0].tolist()
    decode_ids = torch.randint(0, vocab, (1, DECODE_PROMPT_TOKENS), generator=g)[0].tolist()
    passes = {"prefill": (prefill_ids, 1), "decode": (decode_ids, settings["new_tokens"])}
    seconds: dict[str, list[float]] = {"prefill": [], "decode": []}
    for repeat in range(settings["repeats"] + 1):
        for kind, (ids, count) in passes.items():
            params = sampling(temperature=0.0, max_tokens=count, min_tokens=count, ignore_eos=True)
            started = time.perf_counter()
            out = llm.generate([tokens_prompt(prompt_token_ids=ids)], params, lora_request=lora, use_tqdm=False)
            took = time.perf_counter() - started
            assert len(out[0].outputs[0].token_ids) == count
            if repeat:                                        # repeat 0 is the warm-up
                seconds[kind].append(took)
    return {"prefill_tokens_per_s": settings["prompt_tokens"] / statistics.median(seconds["prefill"]),
            "decode_tokens_per_s": settings["new_tokens"] / statistics.median(seconds["decode"]),
            "samples": seconds, "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "torch_threads": torch.get_num_threads()}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (package, f"{package}-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "?"


# ---------------------------------------------------------------- comparison and report

def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)


def compare(case: dict[str, str], ref: dict[str, Any], served: dict[str, Any], seq_len: int,
            variant: str | None = None) -> dict[str, Any]:
    """Per prompt: identical or the first divergence with both sides' log-probability gap there (ours: the
    reference ``variant``)."""
    rows, pending = [], []
    for index, (prompt, generated) in enumerate(zip(ref["prompts"], served["generations"])):
        at = first_divergence(prompt["tokens"], generated["tokens"])
        row: dict[str, Any] = {"prompt": prompt["text"], "identical": at is None, "diverges_at": at}
        if at is not None:
            mine, theirs = prompt["tokens"][at], generated["tokens"][at]
            vllm_lp = dict((t, lp) for t, lp in generated["top"][at])
            row.update(ours=mine, vllm=theirs,
                       vllm_gap=vllm_lp[theirs] - vllm_lp[mine] if mine in vllm_lp else None)
            pending.append((index, prompt["ids"] + prompt["tokens"][:at], mine, theirs))
        rows.append(row)
    if pending:                  # our log-probabilities of both candidates at each divergence
        for (index, _, mine, theirs), lp in zip(pending, logprobs_at(case["run"], [p[1] for p in pending], variant)):
            rows[index]["ours_gap"] = lp[mine] - lp[theirs]
    count = len(ref["window_nll"]) * (seq_len - 1)
    vllm_ppl = math.exp(sum(served["window_nll"]) / count)
    return {"case": case, "reference": variant or "checkpoint", "prompts": rows,
            "identical": sum(r["identical"] for r in rows),
            "perplexity_ours": ref["perplexity"], "perplexity_vllm": vllm_ppl,
            "max_window_nll_diff": max(abs(a - b) for a, b in zip(ref["window_nll"], served["window_nll"])),
            "vllm": served.get("vllm"), "load_seconds": served.get("load_seconds"), "speed": served.get("speed")}


def markdown(results: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    lines = [f"Greedy, {settings['new_tokens']} new tokens, {len(PROMPTS)} prompts; perplexity: {settings['text']}, "
             f"{settings['windows']} windows of {settings['seq_len']} tokens (ours: lrcompress.load(run, "
             "kernels=False), float32; vLLM: enforce_eager, prompt logprobs, in the dtype shown). A divergence "
             "is shown as step: our margin / vLLM's margin, each side's log-probability of its own token minus "
             "that of the other side's token (nats) at the first differing step.", "",
             "| case | vLLM model | vLLM dtype | identical prompts | first divergences (step: ours / vLLM gap) "
             "| ppl ours | ppl vLLM | max window NLL diff |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']['name']} | {_served(r['case'])} | {r['case'].get('dtype', 'float32')} "
                         f"| error: {r['error']} | | | | |")
            continue
        for row in [r, *r.get("variants", [])]:
            diverged = "; ".join(f"{p['diverges_at']}: {_gap(p.get('ours_gap'))} / {_gap(p.get('vllm_gap'))}"
                                 for p in row["prompts"] if not p["identical"]) or "—"
            name = r["case"]["name"] + ("" if row is r else f" (ours: {row['reference']})")
            lines.append(f"| {name} | {_served(r['case'])} | {r['case'].get('dtype', 'float32')} "
                         f"| {row['identical']}/{len(row['prompts'])} "
                         f"| {diverged} | {row['perplexity_ours']:.4f} | {row['perplexity_vllm']:.4f} "
                         f"| {row['max_window_nll_diff']:.3g} |")
    speeds = [r for r in results if r.get("speed")]
    if speeds:
        lines += ["", "| case | vLLM prefill tok/s | vLLM decode tok/s | lrcompress prefill tok/s "
                  "| lrcompress decode tok/s | load (uptime) |", "|---|---|---|---|---|---|"]
        for r in speeds:
            s, b = r["speed"], r.get("bench_infer") or {}
            lines.append(f"| {r['case']['name']} | {s['prefill_tokens_per_s']:.0f} | {s['decode_tokens_per_s']:.1f} "
                         f"| {_num(b.get('prefill_tokens_per_s'), 0)} | {_num(b.get('decode_tokens_per_s'), 1)} "
                         f"| {r.get('uptime', '')} |")
    return "\n".join(lines) + "\n"


def _served(case: dict[str, str]) -> str:
    return Path(case["model"]).name + (f" + LoRA {Path(case['lora']).name}" if case.get("lora") else "")


def _gap(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def bench_infer(run: str, dense: str | None, settings: dict[str, int], threads: int, json_path: Path
                ) -> dict[str, float]:
    """``lrcompress bench-infer`` on the run (its compressed model), with the same lengths and threads;
    ``dense``: the original to compare with (default: the one the run's provenance names)."""
    subprocess.run([sys.executable, "-m", "lrcompress", "bench-infer", run, "--threads", str(threads),
                    "--prompt-tokens", str(settings["prompt_tokens"]), "--new-tokens", str(settings["new_tokens"]),
                    "--repeats", str(settings["repeats"]), "--json", str(json_path),
                    *(["--dense", dense] if dense else [])],
                   check=True, stdout=subprocess.DEVNULL)
    report = json.loads(json_path.read_text())
    return {"prefill_tokens_per_s": report["speeds"]["compressed"]["prefill_tokens_per_s"],
            "decode_tokens_per_s": report["speeds"]["compressed"]["decode_tokens_per_s"],
            "dense_prefill_tokens_per_s": report["speeds"]["dense"]["prefill_tokens_per_s"],
            "dense_decode_tokens_per_s": report["speeds"]["dense"]["decode_tokens_per_s"]}


def parse_case(text: str) -> dict[str, str]:
    case = dict(part.split("=", 1) for part in text.split(","))
    missing = {"name", "run", "model"} - set(case)
    if missing:
        raise SystemExit(f"--case {text!r}: missing {', '.join(sorted(missing))}")
    return case


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # the values vLLM's max_lora_rank accepts


def lora_rank(adapter: str) -> int:
    """vLLM's max_lora_rank for the adapter: the smallest value it accepts that covers every rank."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    largest = max([config["r"], *config.get("rank_pattern", {}).values()])
    return next(r for r in VLLM_LORA_RANKS if r >= largest)


def last_error(log: str, code: int) -> str:
    """The line of a failed vLLM side's log that says why (its last ``...Error: ...`` or C++ ``what():`` line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line) or "Value error" in line
              or line.startswith("what():")]      # a C++ exception that aborts the process
    return (errors or lines or [f"exit {code}"])[-1][:400]


def run_case(case: dict[str, str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    stem = out / case["name"].replace("/", "_")
    ids = inputs(case.get("tokenizer", case["model"]), args.windows, args.seq_len, args.text)
    spec = {"model": case["model"], "lora": case.get("lora"), "new_tokens": args.new_tokens, **ids,
            "max_model_len": max(args.seq_len + 1, 128), "tokenizer": case.get("tokenizer"),   # window + 1 sampled
            "dtype": case.get("dtype", "float32"), "int8_kernel": case.get("int8_kernel", "auto")}
    if case.get("lora"):
        spec["lora_rank"] = lora_rank(case["lora"])
    speed = {"prompt_tokens": 512, "new_tokens": 64, "repeats": 3} if args.speed else None
    spec["speed"] = speed
    if speed:
        spec["max_model_len"] = max(spec["max_model_len"], speed["prompt_tokens"] + 1)
    Path(f"{stem}.spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
               VLLM_CPU_OMP_THREADS_BIND=args.cpus, PYTHONPATH="")
    log = Path(f"{stem}.vllm.log")
    with log.open("w") as handle:
        done = subprocess.run([args.vllm_python, __file__, "vllm-side", f"{stem}.spec.json", f"{stem}.vllm.json"],
                              env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        return {"case": case, "error": last_error(log.read_text(), done.returncode), "log": str(log)}
    served = json.loads(Path(f"{stem}.vllm.json").read_text())
    result = compare(case, reference(case["run"], ids, args.new_tokens), served, args.seq_len)
    if export_format(case["model"]) == "int-quantized":          # w8a8: its steps one at a time
        result["variants"] = [compare(case, reference(case["run"], ids, args.new_tokens, variant), served,
                                      args.seq_len, variant) for variant in VARIANTS]
    if speed:
        result["bench_infer"] = memoized(["bench-infer", case["run"], case.get("dense")], lambda: bench_infer(
            case["run"], case.get("dense"), speed, args.threads, Path(f"{stem}.bench-infer.json")))
        result["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load ")[-1]
    return result


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "vllm-side":          # started by run_case in the vLLM venv
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(sys.argv[3]).write_text(json.dumps(vllm_side(spec)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", required=True, type=parse_case,
                        help="name=N,run=LRCOMPRESS_RUN,model=EXPORTED_DIR[,lora=ADAPTER_DIR][,tokenizer=DIR]"
                             "[,dense=ORIGINAL (bench-infer's --dense)]"
                             "[,dtype=float32|float16|bfloat16] (vLLM's CPU int4 kernel takes 16-bit activations only)"
                             "[,int8_kernel=auto|onednn] (w8a8 exports: onednn avoids vLLM's AMX int8 kernel)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vllm-python", default=os.environ.get("LRCOMPRESS_VLLM_PYTHON", ".venv-vllm/bin/python"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--text", default="wikitext2",
                        help="perplexity text: a dataset name (its test split) or a file")
    parser.add_argument("--speed", action="store_true", help="also time prefill/decode in vLLM and bench-infer")
    parser.add_argument("--threads", type=int, default=1, help="bench-infer threads (vLLM: --cpus)")
    parser.add_argument("--cpus", default="nobind", help="VLLM_CPU_OMP_THREADS_BIND for the vLLM side (nobind: its "
                        "threads follow OMP_NUM_THREADS, unpinned, as bench-infer's)")
    args = parser.parse_args()
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM python at {args.vllm_python}: build it with scripts/vllm_env.sh")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for case in args.case:
        results.append(run_case(case, args, args.out))
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    settings = {"new_tokens": args.new_tokens, "windows": args.windows, "seq_len": args.seq_len, "text": args.text}
    (args.out / "results.md").write_text(markdown(results, settings))
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
