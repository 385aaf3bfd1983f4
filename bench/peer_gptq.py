"""llm-compressor's GPTQ (W4A16) beside lrcompress's ``gptq`` (4 bits), same group size, on one model.

    python bench/peer_gptq.py --model MODEL --llmc-python $LLMC_VENV/bin/python --out DIR \
        [--calibration 32 --seq-len 512 --group-size 64]

Both get the same calibration windows: lrcompress's own (``calibration_windows``: WikiText-2 validation,
seeded random offsets, seed 0), handed to llm-compressor as a pre-tokenized dataset. Each compression
runs in its own process (llm-compressor in its own virtual environment: it pins its own transformers);
compression time is the wall time of the compression call (lrcompress: the ``compress`` timing of its
metrics, i.e. without loading and writing; llm-compressor: ``oneshot``), peak memory is the process's
peak resident set (``ru_maxrss``, compression only: neither process evaluates; lrcompress records it in its metrics, the
llm-compressor process reports its own). Perplexity is then
measured for both in this process by the project's protocol (``lrcompress.eval.perplexity``:
WikiText-2 test, seq 512, first 40 windows): the lrcompress checkpoint through ``lrcompress.load``
(its exact dequantized reference), the llm-compressor checkpoint through transformers with the
compressed-tensors package (dequantized on load).

Each side runs with its own defaults, what a user gets, at one group size: llm-compressor's W4A16 scheme
(symmetric int4 per group; GPTQModifier's default activation ordering and dampening 0.01) with the
group size set explicitly, since llm-compressor refuses a group that does not divide a layer's inputs
(128 does not divide SmolLM2's 576: hence 64 by default); lrcompress's gptq is asymmetric (a zero point
per group), columns in their natural order, damping 0.01. Threads: whatever OMP_NUM_THREADS says
(one thread for the numbers in bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

LLMC_SCRIPT = textwrap.dedent('''
    import json, resource, sys, time
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model_path, windows_path, out = sys.argv[1:4]
    torch.set_num_threads(int(sys.argv[4]))
    group_size = int(sys.argv[5])
    windows = torch.load(windows_path)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(),
                                 "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # The W4A16 preset (symmetric int4, per group) at the requested group size.
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"])
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=windows.shape[1],
            num_calibration_samples=windows.shape[0], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - started
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    print("RESULT " + json.dumps({"seconds": seconds,
                                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
''')


def threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "1"))


def write_windows(model: str, count: int, seq_len: int, path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from lrcompress.data import load_text
    from lrcompress.data.windows import calibration_windows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = load_text("wikitext2", "validation", Path(os.environ["LRCOMPRESS_DATA"])).text
    torch.save(calibration_windows(tokenize(tokenizer, text), count, seq_len, seed=0), path)


def run_lrcompress(model: str, count: int, seq_len: int, out: Path, group_size: int) -> dict:
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "gptq.yaml"
    command = [sys.executable, "-m", "lrcompress", "run", str(recipe), "--set", f"model.path={model}",
               "--set", "stages.0.bits=4", "--set", f"stages.0.group_size={group_size}",
               "--set", f"calibration.num_samples={count}", "--set", f"calibration.seq_len={seq_len}",
               "--set", f"runtime.threads={threads()}", "--set", "runtime.device=cpu",
               "--set", "eval.perplexity=[]", "--set", "eval.baseline=false", "--overwrite", "--output", str(out)]
    if not (out / "metrics.json").is_file():
        subprocess.run(command, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"seconds": metrics["timing"]["compress"], "peak_rss_bytes": metrics["memory"]["process_peak_rss_bytes"]}


def run_llmc(python: str, model: str, windows: Path, out: Path, group_size: int) -> dict:
    saved = out.parent / "llmc_result.json"
    if saved.is_file() and (out / "config.json").is_file():
        return json.loads(saved.read_text())
    script = out.parent / "llmc_gptq.py"
    script.write_text(LLMC_SCRIPT)
    done = subprocess.run([python, str(script), model, str(windows), str(out), str(threads()), str(group_size)],
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"llm-compressor failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    line = next(text for text in done.stdout.splitlines() if text.startswith("RESULT "))
    saved.write_text(line[len("RESULT "):])
    return json.loads(line[len("RESULT "):])


def perplexities(model: str, lrc: Path, llmc: Path) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lrcompress
    from lrcompress.eval import EvalContext, perplexity
    from lrcompress.recipe import PerplexitySpec

    tokenizer = AutoTokenizer.from_pretrained(model)
    data = Path(os.environ["LRCOMPRESS_DATA"])
    loaders = {"dense": lambda: AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
               "lrcompress": lambda: lrcompress.load(lrc, kernels=False),
               "llm-compressor": lambda: AutoModelForCausalLM.from_pretrained(llmc, dtype=torch.float32)}
    spec, context = PerplexitySpec(dataset="wikitext2", split="test", seq_len=512, max_windows=40), EvalContext(data)
    return {name: perplexity(load().eval(), tokenizer, spec, context).value for name, load in loaders.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--llmc-python", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64,
                        help="64 by default: llm-compressor refuses groups that do not divide a layer's inputs "
                             "(128 does not divide SmolLM2's 576); lrcompress takes any size")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    windows = args.out / "calibration.pt"
    write_windows(args.model, args.calibration, args.seq_len, windows)
    llmc = run_llmc(args.llmc_python, args.model, windows, args.out / "llmc", args.group_size)
    lrc = run_lrcompress(args.model, args.calibration, args.seq_len, args.out / "lrcompress", args.group_size)
    ppl = perplexities(args.model, args.out / "lrcompress", args.out / "llmc")
    report = {"calibration": [args.calibration, args.seq_len], "threads": threads(), "group_size": args.group_size,
              "perplexity": ppl,
              "lrcompress": lrc, "llm-compressor": llmc}
    (args.out / "peer_gptq.json").write_text(json.dumps(report, indent=2))
    print(f"\n{args.calibration} calibration windows of {args.seq_len} tokens, {threads()} thread(s); "
          f"WikiText-2 test perplexity, seq 512, 40 windows (dense: {ppl['dense']:.2f})\n")
    print("| tool | method | perplexity | compression s | peak RSS GiB |")
    print("|---|---|---|---|---|")
    g = args.group_size
    for name, result, method in (("lrcompress", lrc, f"gptq 4-bit g{g}, asymmetric, natural order"),
                                 ("llm-compressor", llmc, f"GPTQ W4A16 g{g}, symmetric, its default order")):
        print(f"| {name} | {method} | {ppl[name]:.2f} | {result['seconds']:.1f} | "
              f"{result['peak_rss_bytes'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
