"""Why whiten's compression does not transfer across text domains (issue 26 item 3): per module, the
whitened-SVD relative output error on held-out activations of each domain, for several dampings and
calibration sources.

    .venv/bin/python bench/domain_gap.py --model models/smollm2-135m \
        --modules 10.self_attn.q_proj,10.mlp.down_proj --dampings 1e-4,1e-2,1e-1,1 --json runs/domain_gap.json

Every Gram comes from the *dense* model (inputs captured by hooks, no compression upstream), so the
numbers isolate the truncation itself from error propagation. Windows: calibration from WikiText-2
validation and from the web-text calibration file (``--calibration`` seeded random windows each, as the
recipe draws them), held out from WikiText-2 test and the web-text test file (the first ``--heldout``
consecutive windows, as the perplexity evaluation cuts them). The two web-text files are disjoint by document.

For each module, calibration source (``wiki``, ``web``, ``mix``: the two Grams averaged per token) and
damping λ, Ŵ is the whiten truncation (SVD-LLM: Ŵ = U_r Σ_r V_rᵀ S⁻¹ with S·Sᵀ = G + λ·mean(diag G)·I,
the same code as ``lrcompress.compressor.whiten``) at ``--ratio``; the script prints
‖X(W−Ŵ)ᵀ‖_F / ‖XWᵀ‖_F on the calibration windows and on each held-out domain, plus two references: the
plain SVD of W (no activations; the λ → ∞ limit) and the "oracle" whitened truncation fitted on the
held-out Gram itself (the smallest error any rank-r Ŵ can reach on that text). Columns marked * leave out
the first token of every held-out window, whose massive activations dominate the Frobenius norms. Beside them it prints the
*coverage* of each held-out domain by the calibration statistics, tr(Ĝ_cal⁻¹ Ĝ_eval)/n with Ĝ the Gram per
token (damped as the fit is): 1 when the held-out activations have the calibration covariance, large when
they put energy in directions the calibration hardly saw, which is where the whitened truncation is free
to throw weight away.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from grams import collect_grams
from matching_drift import truncated
from lrcompress.compressor.linalg import rank_for_ratio, relative_output_error, truncated_svd, whitening
from lrcompress.data.sources import data_dir, load_text
from lrcompress.data.windows import calibration_windows, evaluation_windows, tokenize
from lrcompress.models.loading import load_model

WEB_CALIBRATION = "webtext/webtext.calibration.jsonl"
WEB_TEST = "webtext/webtext.test.jsonl"


def whitened_truncation(weight: torch.Tensor, gram: torch.Tensor, damping: float, rank: int) -> torch.Tensor:
    """The rank-``rank`` whiten approximation of ``weight`` from ``gram`` (as lrcompress.compressor.whiten)."""
    white = whitening(gram, damping)
    u, s, vh = truncated_svd(weight.to(torch.float64) @ white.factor, rank)
    return (u * s) @ vh @ white.inverse


def plain_truncation(weight: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = truncated_svd(weight.to(torch.float64), rank)
    return (u * s) @ vh


def coverage(calibration: torch.Tensor, evaluation: torch.Tensor, damping: float) -> float:
    """tr(Ĝ_cal⁻¹ Ĝ_eval)/n, both Grams per token, Ĝ_cal damped by λ·mean(diag Ĝ_cal)."""
    n = calibration.shape[0]
    damped = calibration + damping * torch.diagonal(calibration).mean() * torch.eye(n, dtype=calibration.dtype)
    return float(torch.trace(torch.linalg.solve(damped, evaluation))) / n


def per_token(stat) -> torch.Tensor:
    return stat.sum_xx.to(torch.float64) / stat.count


def module_rows(weight: torch.Tensor, grams: dict[str, torch.Tensor], dampings: list[float], ratio: float
                ) -> list[dict]:
    """One row per (fit, damping): the relative output error on every Gram, and the coverage numbers."""
    rank = rank_for_ratio(weight.shape[0], weight.shape[1], ratio)
    calibrations = {"wiki": grams["wiki-cal"], "web": grams["web-cal"],
                    "mix": (grams["wiki-cal"] + grams["web-cal"]) / 2}
    fits: list[tuple[str, float | None, torch.Tensor]] = [("svd", None, plain_truncation(weight, rank))]
    for source, gram in calibrations.items():
        fits += [(source, damping, whitened_truncation(weight, gram, damping, rank)) for damping in dampings]
    fits += [(f"oracle-{which}", dampings[0], whitened_truncation(weight, grams[f"{which}-test"], dampings[0], rank))
             for which in ("wiki", "web")]
    rows = []
    for fit, damping, approx in fits:
        row = {"fit": fit, "damping": damping, "rank": rank,
               **{f"err_{key}": relative_output_error(weight, approx, gram) for key, gram in grams.items()}}
        if fit in calibrations:
            for which in ("wiki", "web"):
                row[f"coverage_{which}"] = coverage(calibrations[fit], grams[f"{which}-test"], damping)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--modules", default="10.self_attn.q_proj,10.mlp.down_proj",
                        help="comma-separated LAYER.path inside model.layers")
    parser.add_argument("--dampings", default="1e-4,1e-2,1e-1,1")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows per source")
    parser.add_argument("--heldout", type=int, default=16, help="held-out windows per domain")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("runs/domain_gap.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dampings = [float(d) for d in args.dampings.split(",")]
    names = [f"model.layers.{m}" for m in args.modules.split(",")]
    started = time.perf_counter()
    loaded = load_model(args.model)
    deepest = max(int(m.split(".")[0]) for m in args.modules.split(","))
    model = truncated(loaded.model, deepest + 1)  # the modules measured sit in these layers
    directory = data_dir()
    if directory is None:
        raise SystemExit("set LRCOMPRESS_DATA (the directory holding wikitext-2-raw/ and webtext/)")

    def ids(dataset: str, split: str) -> torch.Tensor:
        return tokenize(loaded.tokenizer, load_text(dataset, split, directory).text)

    windows = {
        "wiki-cal": calibration_windows(ids("wikitext2", "validation"), args.calibration, args.seq_len, 0),
        "web-cal": calibration_windows(ids(str(directory / WEB_CALIBRATION), "train"), args.calibration,
                                       args.seq_len, 0),
        "wiki-test": evaluation_windows(ids("wikitext2", "test"), args.seq_len, args.heldout),
        "web-test": evaluation_windows(ids(str(directory / WEB_TEST), "test"), args.seq_len, args.heldout),
    }
    stats = {key: collect_grams(model, names, w, batch_size=4) for key, w in windows.items()}
    stats |= {f"{key}-rest": collect_grams(model, names, windows[key], batch_size=4, start=1)
              for key in ("wiki-test", "web-test")}
    gathered = time.perf_counter() - started
    results = {"model": args.model, "ratio": args.ratio, "calibration_windows": args.calibration,
               "heldout_windows": args.heldout, "seq_len": args.seq_len, "threads": args.threads,
               "platform": platform.platform(), "modules": {}}
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        grams = {key: per_token(stats[key][name]) for key in stats}
        rows = module_rows(weight, grams, dampings, args.ratio)
        diagonal = torch.diagonal(grams["wiki-cal"])
        spread = float(diagonal.mean() / diagonal.median())   # how far λ·mean(diag G) sits above a typical channel
        results["modules"][name] = {"rows": rows, "mean_over_median_diag": spread}
        print(f"\n{name}  {tuple(weight.shape)}  rank {rows[0]['rank']}  mean/median diag G {spread:.1f}"
              "  (relative output error; coverage tr(G_cal⁻¹G)/n)")
        print(f"{'fit':>12} {'λ':>7} {'wiki-cal':>9} {'web-cal':>9} {'wiki-test':>9} {'web-test':>9}"
              f" {'web/wiki':>8} {'wiki-t*':>9} {'web-t*':>9} {'web/wiki*':>9} {'cov wiki':>9} {'cov web':>9}")
        for row in rows:
            damping = "-" if row["damping"] is None else f"{row['damping']:.0e}"
            cov = (f" {row['coverage_wiki']:9.2f} {row['coverage_web']:9.2f}" if "coverage_wiki" in row else "")
            print(f"{row['fit']:>12} {damping:>7} {row['err_wiki-cal']:9.4f} {row['err_web-cal']:9.4f}"
                  f" {row['err_wiki-test']:9.4f} {row['err_web-test']:9.4f}"
                  f" {row['err_web-test'] / row['err_wiki-test']:8.2f}"
                  f" {row['err_wiki-test-rest']:9.4f} {row['err_web-test-rest']:9.4f}"
                  f" {row['err_web-test-rest'] / row['err_wiki-test-rest']:9.2f}{cov}")
    results["seconds"] = {"grams": gathered, "total": time.perf_counter() - started}
    print(f"\ngrams {gathered:.0f} s, total {results['seconds']['total']:.0f} s ({args.threads} thread(s))")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
