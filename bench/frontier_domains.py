"""The rate–distortion frontier on both domains of the standard evaluation (issue 27, item 3): whole-model
bytes against WikiText-2 and web-text perplexity, one panel each, one line per series, and the markdown table
with the ratios to dense.

    python bench/frontier_domains.py --out runs/f27/frontier \
        --run "gptq g128" "gptq 3-bit g128" runs/f27/gptq3-g128 \
        --row "rtn g128" "rtn 4-bit g128" 169166592 38.36 36.69 bench/history/issue27-budget.md \
        --peer "llm-compressor g32" runs/f27/peer-w4/peer_gptq.json ...

``--run SERIES LABEL RUN``: a finished ``lrcompress run`` directory (its metrics.json gives the model's stored
bytes, ``compression.model_bytes_after``, and the two perplexities it recorded). ``--row SERIES LABEL BYTES
WIKITEXT2 WEBTEXT SOURCE``: a row measured earlier under the same protocol, copied from SOURCE. ``--peer
SERIES JSON``: llm-compressor's checkpoint from ``bench/peer_gptq.py`` (its size: the bytes of the tensors
of its safetensors files). Points of one series are joined by a line
in order of size. The dense model (28.69 / 27.77 at 538,060,032 bytes, far right of every point) is a
dashed line.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

DENSE = (538_060_032, 28.69, 27.77)
DOMAINS = (("wikitext2", "WikiText-2 test"), ("webtext", "web-text test"))


@dataclass
class Point:
    series: str
    label: str
    bytes: int
    wikitext2: float
    webtext: float
    source: str


def from_run(series: str, label: str, run: Path) -> Point:
    metrics = json.loads((run / "metrics.json").read_text())
    ppl = {key.split("/")[0]: value["value"] for key, value in metrics["eval"]["perplexity"].items()}
    return Point(series, label, metrics["compression"]["model_bytes_after"], ppl["wikitext2"], ppl["webtext"], str(run))


def from_row(row: list[str]) -> Point:
    series, label, size, wikitext2, webtext, source = row
    return Point(series, label, int(size), float(wikitext2), float(webtext), source)


def from_peer(series: str, path: str) -> Point:
    report = json.loads(Path(path).read_text())
    ppl = report["perplexity"]["llm-compressor"]
    label = f"llm-compressor GPTQ W{report['bits']}A16 g{report['group_size']}"
    return Point(series, label, report["llm-compressor"]["tensor_bytes"], ppl["wikitext2"], ppl["webtext"], path)


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    series = list(dict.fromkeys(p.series for p in points))
    palette, markers = plt.get_cmap("tab10"), "osD^v<>pXh"
    for ax, (domain, title) in zip(axes, DOMAINS):
        for number, name in enumerate(series):
            mine = sorted((p for p in points if p.series == name), key=lambda p: p.bytes)
            ax.plot([p.bytes / 2**20 for p in mine], [getattr(p, domain) for p in mine], marker=markers[number % 10],
                    color=palette(number % 10), label=name)
        ax.axhline(DENSE[1] if domain == "wikitext2" else DENSE[2], color="black", linestyle="--",
                   label=f"dense (float32, {DENSE[0] / 2**20:.0f} MiB)")
        ax.set_yscale("log")
        ax.set_title(f"{title} (40 × 512)")
        ax.set_xlabel("whole-model stored bytes (MiB)")
        ax.set_ylabel("perplexity (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.suptitle("SmolLM2-135M: rate–distortion on both domains (issue 27)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(points: list[Point]) -> str:
    lines = ["| recipe | bytes (MiB) | WikiText-2 | × dense | web text | × dense | source |",
             "|---|---|---|---|---|---|---|",
             f"| dense (float32) | {DENSE[0]:,} ({DENSE[0] / 2**20:.2f}) | {DENSE[1]:.2f} | 1 | {DENSE[2]:.2f} | 1 | — |"]
    for p in sorted(points, key=lambda p: -p.bytes):
        lines.append(f"| {p.label} | {p.bytes:,} ({p.bytes / 2**20:.2f}) | {p.wikitext2:.2f} | "
                     f"{p.wikitext2 / DENSE[1]:.2f} | {p.webtext:.2f} | {p.webtext / DENSE[2]:.2f} | {p.source} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for frontier.png and frontier.md")
    parser.add_argument("--run", nargs=3, action="append", default=[], metavar=("SERIES", "LABEL", "RUN"))
    parser.add_argument("--row", nargs=6, action="append", default=[],
                        metavar=("SERIES", "LABEL", "BYTES", "WIKITEXT2", "WEBTEXT", "SOURCE"))
    parser.add_argument("--peer", nargs=2, action="append", default=[], metavar=("SERIES", "JSON"))
    parser.add_argument("--png", type=Path, help="where the plot goes (default: OUT/frontier.png)")
    args = parser.parse_args()
    points = ([from_run(series, label, Path(run)) for series, label, run in args.run]
              + [from_row(row) for row in args.row] + [from_peer(series, path) for series, path in args.peer])
    args.out.mkdir(parents=True, exist_ok=True)
    plot(points, args.png or args.out / "frontier.png")
    text = table(points)
    (args.out / "frontier.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
