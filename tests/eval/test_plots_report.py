"""report.md's per-module table and its PNG plots; the rate–distortion plot."""
import struct

import pytest

from lrcompress.eval.metrics import RunMetrics
from lrcompress.eval.plots import module_kind, plot_kept_params, plot_module_errors, plot_rate_distortion
from lrcompress.eval.report import render_report, write_report
from lrcompress.pipeline.records import ModuleRecord


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def non_blank(path) -> bool:
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    return float(pixels[..., :3].std()) > 0.01


def modules(layers: int = 3):
    rows = []
    for layer in range(layers):
        for kind, rank in (("self_attn.q_proj", 8), ("mlp.down_proj", None)):
            rows.append(ModuleRecord(name=f"model.layers.{layer}.{kind}", layer=layer, stage=0,
                                     method="lord" if rank else "prune", in_features=64, out_features=64,
                                     params_before=4096, params_after=1024 if rank else 2048 + layer, rank=rank,
                                     relative_error=0.01 * (layer + 1), numerical_path="eigh", seconds=0.1,
                                     details={} if rank else {"sparsity": 0.5}))
    return rows


def compression(**values) -> dict:
    """A compression section: the given values, the rest zero or absent."""
    return {"targeted_params_before": 0, "targeted_params_after": 0, "bytes": None, "dense_bytes": 0,
            "targeted_bytes_before": None, "targeted_bytes_after": None, "targeted_bytes_ratio": None,
            "accounting": "", **values}


def test_module_kind():
    assert module_kind("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"
    assert module_kind("lm_head") == "lm_head"


def test_plots_are_written_and_not_blank(tmp_path):
    for plot in (plot_module_errors, plot_kept_params):
        path = plot(modules(), tmp_path / f"{plot.__name__}.png")
        width, height = png_size(path)
        assert width > 200 and height > 100 and non_blank(path)
    path = plot_rate_distortion({"svd": [(0.2, 50.0), (0.1, 30.0)], "lord": [(0.1, 25.0)]},
                                tmp_path / "rd.png", "perplexity wikitext2/test", dense=20.0)
    assert png_size(path)[0] > 200 and non_blank(path)


def test_report_table_columns_and_plots(tmp_path):
    metrics = {"compression": compression(targeted_modules=6, targeted_ratio=0.6, model_ratio=0.3,
                                          model_params_before=100, model_params_after=70),
               "eval": {"perplexity": {"wikitext2/test": {"value": 12.5, "protocol": "token-level perplexity, x"}},
                        "lm_eval": {"piqa": {"acc": 0.6, "acc_stderr": 0.1, "samples": 20, "num_fewshot": 0,
                                             "source": "piqa/valid.jsonl", "protocols": {"acc": "lm-eval acc: p"}}},
                        "baseline_lm_eval": {"piqa": {"acc": 0.7, "acc_stderr": 0.1, "protocols": {"acc": "p"}}}},
               "modules": modules(2)}
    write_report(tmp_path, RunMetrics.model_validate(metrics), "model: {path: x}\n")
    report = (tmp_path / "report.md").read_text()
    assert "| rank / sparsity |" in report
    assert "| model.layers.1.self_attn.q_proj | lord | 64×64 | 4,096 → 1,024 | rank 8 | 0.0200 | eigh | 0.10 |" in report
    assert "| sparsity 0.50 |" in report
    assert "| piqa | acc | 0.6000 ± 0.1000 | 0.7000 ± 0.1000 | 20 (0-shot) | lm-eval acc: p |" in report
    assert "perplexity wikitext2/test | 12.500" in report
    for name in ("relative_error.png", "kept_params.png"):
        assert f"]({name})" in report and png_size(tmp_path / name)[0] > 0
    assert "```yaml\nmodel: {path: x}\n```" in report


def test_report_without_modules_has_no_plots():
    metrics = {"compression": compression(targeted_modules=0, targeted_ratio=0.0, model_ratio=0.0,
                                          model_params_before=1, model_params_after=1), "modules": []}
    assert "## Plots" not in render_report(RunMetrics.model_validate(metrics), "")
