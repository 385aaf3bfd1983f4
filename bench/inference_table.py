"""One markdown table from `lrcompress bench-infer --json` reports (one report per checkpoint).

    python bench/inference_table.py REPORT.json ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(report: dict) -> list[str]:
    dense, compressed = report["speeds"]["dense"], report["speeds"]["compressed"]
    ratio = report["ratios"]
    name = Path(report["checkpoint"]).name
    return [f"| {name} | {dense['prefill_tokens_per_s']:.0f} | {compressed['prefill_tokens_per_s']:.0f} | "
            f"**{ratio['prefill']:.2f}×** | {dense['decode_tokens_per_s']:.1f} | {compressed['decode_tokens_per_s']:.1f} | "
            f"**{ratio['decode']:.2f}×** | {dense['tensor_bytes'] / 2**20:.0f} | {compressed['tensor_bytes'] / 2**20:.0f} | "
            f"{(compressed['decode_peak_rss_delta_bytes'] or 0) / 2**20:.0f} |"]


def main(paths: list[str]) -> None:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    s = reports[0]["settings"]
    print(f"batch {s['batch']}, {s['threads']} threads, prefill {s['prompt_tokens']} tokens, generate "
          f"{s['new_tokens']} tokens, median of {s['repeats']}, torch {reports[0]['torch']}\n")
    print("| checkpoint | dense prefill tok/s | compressed prefill tok/s | prefill ratio | dense decode tok/s | "
          "compressed decode tok/s | decode ratio | dense MiB | compressed MiB (incl. kernel layout) | "
          "decode peak RSS +MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for report in reports:
        print("\n".join(rows(report)))


if __name__ == "__main__":
    main(sys.argv[1:])
