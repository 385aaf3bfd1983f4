"""llm-compressor's GPTQ (W4A16 or W3A16) beside lrcompress's ``gptq`` (same bits), same group size, on one model.

    python bench/peer_gptq.py --model MODEL --llmc-python $LLMC_VENV/bin/python --out DIR \
        [--calibration 32 --seq-len 512 --group-size 64 --bits 4 --domains wikitext2,webtext]
        [--lrcompress-run RUN --skip-dense]

``--lrcompress-run RUN``: take lrcompress's side from a finished ``lrcompress run`` directory of the same
calibration and settings (its perplexities as recorded under the same protocol, its bytes) instead of
compressing and evaluating again; ``--skip-dense``: no dense evaluation (the run's recorded baseline, if any).

Both get the same calibration windows: lrcompress's own (``calibration_windows``: WikiText-2 validation,
seeded random offsets, seed 0), handed to llm-compressor as a pre-tokenized dataset. Each compression
runs in its own process (llm-compressor in its own virtual environment: it pins its own transformers);
compression time is the wall time of the compression call (lrcompress: the ``compress`` timing of its
metrics, i.e. without loading and writing; llm-compressor: ``oneshot``), peak memory is the process's
peak resident set (``ru_maxrss``, compression only: neither process evaluates; lrcompress records it in its metrics, the
llm-compressor process reports its own). Perplexity is then
measured for both in this process by the project's protocol (``lrcompress.eval.perplexity``:
the test split of each of ``--domains`` — WikiText-2 and the web-text test file —, seq 512, first 40 windows): the lrcompress checkpoint through ``lrcompress.load``
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
    group_size, bits = int(sys.argv[5]), int(sys.argv[6])
    windows = torch.load(windows_path)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(),
                                 "attention_mask": torch.ones_like(windows).tolist()})
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # The W4A16 preset (symmetric int, per group) at the requested bits and group size (W3A16 at 3 bits).
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
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


def run_lrcompress(model: str, calibration: tuple[int, int], out: Path, group_size: int, bits: int) -> dict:
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "gptq.yaml"
    count, seq_len = calibration
    command = [sys.executable, "-m", "lrcompress", "run", str(recipe), "--set", f"model.path={model}",
               "--set", f"stages.0.bits={bits}", "--set", f"stages.0.group_size={group_size}",
               "--set", f"calibration.num_samples={count}", "--set", f"calibration.seq_len={seq_len}",
               "--set", f"runtime.threads={threads()}", "--set", "runtime.device=cpu",
               "--set", "eval.perplexity=[]", "--set", "eval.lm_eval=null", "--set", "eval.baseline=false", "--overwrite", "--output", str(out)]
    if not (out / "metrics.json").is_file():
        subprocess.run(command, check=True)
    return lrcompress_side(out)


def lrcompress_side(run: Path) -> dict:
    """Time, memory, bytes and the recorded perplexities of a finished ``lrcompress run`` directory."""
    metrics = json.loads((run / "metrics.json").read_text())
    evaluation = metrics.get("eval") or {}
    return {"seconds": metrics["timing"]["compress"], "peak_rss_bytes": metrics["memory"]["process_peak_rss_bytes"],
            "model_bytes": metrics["compression"].get("model_bytes_after"), **disk_bytes(run),
            "recorded_perplexity": {key.split("/")[0]: value["value"]
                                    for key, value in (evaluation.get("perplexity") or {}).items()},
            "recorded_baseline": {key.split("/")[0]: value["value"]
                                  for key, value in (evaluation.get("baseline_perplexity") or {}).items()}}


def disk_bytes(directory: Path) -> dict:
    """The safetensors files' sizes on disk, and the bytes of the tensors they hold (headers excluded)."""
    from safetensors import safe_open

    files, tensors = 0, 0
    for shard in sorted(directory.glob("*.safetensors")):
        files += shard.stat().st_size
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                tensors += tensor.numel() * tensor.element_size()
    return {"safetensors_file_bytes": files, "tensor_bytes": tensors}


def run_llmc(python: str, model: str, windows: Path, out: Path, settings: tuple[int, int]) -> dict:
    group_size, bits = settings
    saved = out.parent / "llmc_result.json"
    if saved.is_file() and (out / "config.json").is_file():
        return {**json.loads(saved.read_text()), **disk_bytes(out)}
    script = out.parent / "llmc_gptq.py"
    script.write_text(LLMC_SCRIPT)
    done = subprocess.run([python, str(script), model, str(windows), str(out), str(threads()), str(group_size),
                           str(bits)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"llm-compressor failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    line = next(text for text in done.stdout.splitlines() if text.startswith("RESULT "))
    saved.write_text(line[len("RESULT "):])
    return {**json.loads(line[len("RESULT "):]), **disk_bytes(out)}


def perplexities(model: str, loaders: dict, domains: list[str]) -> dict[str, dict[str, float]]:
    """Per loader name, per domain: the test split's perplexity, seq 512, first 40 windows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lrcompress
    from lrcompress.eval import EvalContext, perplexity
    from lrcompress.recipe import PerplexitySpec

    tokenizer = AutoTokenizer.from_pretrained(model)
    context = EvalContext(Path(os.environ["LRCOMPRESS_DATA"]))
    make = {"dense": lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            "lrcompress": lambda path: lrcompress.load(path, kernels=False),
            "llm-compressor": lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)}
    result: dict[str, dict[str, float]] = {}
    for name, path in loaders.items():
        loaded = make[name](path).eval()
        result[name] = {domain: perplexity(loaded, tokenizer, PerplexitySpec(dataset=domain, split="test", seq_len=512,
                                                                             max_windows=40), context).value
                        for domain in domains}
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--llmc-python", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64,
                        help="64 by default: llm-compressor refuses groups that do not divide a layer's inputs "
                             "(128 does not divide SmolLM2's 576); lrcompress takes any size")
    parser.add_argument("--bits", type=int, default=4, choices=(3, 4), help="W4A16 or W3A16")
    parser.add_argument("--domains", default="wikitext2,webtext", help="test sets, comma-separated")
    parser.add_argument("--lrcompress-run", type=Path, help="a finished lrcompress run of the same settings to "
                                                            "take lrcompress's side from (nothing run again)")
    parser.add_argument("--skip-dense", action="store_true", help="no dense evaluation")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    domains = [d for d in args.domains.split(",") if d]
    windows = args.out / "calibration.pt"
    write_windows(args.model, args.calibration, args.seq_len, windows)
    llmc = run_llmc(args.llmc_python, args.model, windows, args.out / "llmc", (args.group_size, args.bits))
    loaders = {"llm-compressor": str(args.out / "llmc")} | ({} if args.skip_dense else {"dense": args.model})
    if args.lrcompress_run is not None:
        lrc = lrcompress_side(args.lrcompress_run)
        ppl = perplexities(args.model, loaders, domains)
        ppl["lrcompress"] = {d: lrc["recorded_perplexity"][d] for d in domains}
    else:
        lrc = run_lrcompress(args.model, (args.calibration, args.seq_len), args.out / "lrcompress", args.group_size,
                             args.bits)
        ppl = perplexities(args.model, loaders | {"lrcompress": str(args.out / "lrcompress")}, domains)
    report = {"calibration": [args.calibration, args.seq_len], "threads": threads(), "group_size": args.group_size,
              "bits": args.bits, "domains": domains, "perplexity": ppl, "lrcompress": lrc, "llm-compressor": llmc}
    (args.out / "peer_gptq.json").write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(report: dict) -> None:
    g, bits, domains, ppl = report["group_size"], report["bits"], report["domains"], report["perplexity"]
    calibration = report["calibration"]
    dense = ", ".join(f"{d} {ppl['dense'][d]:.2f}" for d in domains) if "dense" in ppl else "not evaluated"
    print(f"\n{calibration[0]} calibration windows of {calibration[1]} tokens, {report['threads']} thread(s); "
          f"test perplexity, seq 512, 40 windows (dense: {dense})\n")
    print("| tool | method | " + " | ".join(domains) + " | tensor bytes | safetensors files | compression s | peak RSS GiB |")
    print("|---|---|" + "---|" * len(domains) + "---|---|---|---|")
    for name, method in (("lrcompress", f"gptq {bits}-bit g{g}, asymmetric, natural order"),
                         ("llm-compressor", f"GPTQ W{bits}A16 g{g}, symmetric, its default order")):
        result = report[name]
        print(f"| {name} | {method} | " + " | ".join(f"{ppl[name][d]:.2f}" for d in domains)
              + f" | {result['tensor_bytes']:,} | {result['safetensors_file_bytes']:,} | {result['seconds']:.1f} | "
              f"{result['peak_rss_bytes'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
