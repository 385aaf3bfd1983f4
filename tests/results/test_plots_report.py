"""report.md's per-module table and its PNG plots; the rate–distortion plot."""
import struct
from dataclasses import replace


from lrcompress.results.metrics import RunMetrics
from lrcompress.results.plots import module_kind, plot_kept_params, plot_module_errors, plot_rate_distortion
from lrcompress.results.report import render_report, write_report
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
    path = plot_rate_distortion({"svd": [(4e8, 50.0), (4.5e8, 30.0)], "rtn": [(0.7e8, 25.0)]},
                                tmp_path / "rd.png", "perplexity wikitext2/test", dense=(5.1e8, 20.0))
    assert png_size(path)[0] > 200 and non_blank(path)


def _axes_of(plot, rows, tmp_path, monkeypatch):
    """Run ``plot`` and keep its figure's axes (closing is what _save does; intercept it)."""
    import lrcompress.results.plots as plots

    kept = {}
    real_save = plots._save

    def save(fig, path):
        kept["ax"] = fig.axes[0]
        kept["legend"] = fig.axes[0].get_legend()
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    plot(rows, tmp_path / "p.png")
    return kept


def test_a_flat_kept_size_is_drawn_flat_on_a_0_to_1_axis(tmp_path, monkeypatch):
    rows = [replace(m, params_after=3278, bytes_before=4096 * 4, bytes_after=3278 * 4) for m in modules(4)]
    ax = _axes_of(plot_kept_params, rows, tmp_path, monkeypatch)["ax"]
    low, high = ax.get_ylim()
    assert low == 0.0 and high >= 1.0                     # not zoomed to 0.7986–0.7996
    assert all(float(t).is_integer() for t in ax.get_xticks())   # integer layer ticks


def test_each_module_kind_has_its_own_colour_and_the_legend_sits_outside(tmp_path, monkeypatch):
    kinds = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    rows = [ModuleRecord(name=f"model.layers.{layer}.{kind}", layer=layer, stage=0, method=method, in_features=4,
                         out_features=4, params_before=10, params_after=5, rank=None, relative_error=0.1 + layer,
                         numerical_path="x", seconds=0.1)
            for layer in range(3) for kind in kinds for method in ("gptq", "eora")]
    kept = _axes_of(plot_module_errors, rows, tmp_path, monkeypatch)
    lines = kept["ax"].get_lines()
    assert len(lines) == 14
    colours = {}
    for line in lines:
        colours.setdefault(line.get_label().split(" (")[0], set()).add(line.get_color())
    assert all(len(c) == 1 for c in colours.values()) and len({c.pop() for c in colours.values()}) == 7
    styles = {line.get_label().split(" (")[1]: line.get_linestyle() for line in lines}
    assert styles["gptq)"] != styles["eora)"]              # the two stages differ in style, not colour
    assert kept["legend"].get_bbox_to_anchor().x0 > kept["ax"].get_window_extent().x1 - 1   # right of the data


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
    assert "| model.layers.1.self_attn.q_proj | lord | 64×64 | – | 4,096 → 1,024 | rank 8 | 0.0200 | eigh | 0.10 |" in report
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


def test_a_quantized_run_reports_bytes_removed_never_negative_parameters():
    """GPTQ 3-bit + EoRA keeps every weight as a code and adds factors: more stored values, far fewer bytes."""
    from lrcompress.results.metrics import compression_summary
    from lrcompress.pipeline.records import ModuleRecord

    records = [ModuleRecord(name="m", layer=0, stage=0, method="gptq", in_features=64, out_features=64,
                            params_before=4096, params_after=4096, rank=None, relative_error=0.1,
                            numerical_path="x", seconds=0.1, details={}, bytes_before=16384, bytes_after=1792),
               ModuleRecord(name="m", layer=0, stage=1, method="eora", in_features=64, out_features=64,
                            params_before=4096, params_after=4096 + 8 * 128, rank=8, relative_error=0.05,
                            numerical_path="x", seconds=0.1, details={}, bytes_before=1792, bytes_after=1792 + 4096)]
    c = compression_summary(records, 10000, 10000 + 1024, None, 4)
    assert c.targeted_bytes_ratio > 0.6 and c.model_bytes_after == 40000 - 16384 + 5888
    report = render_report(RunMetrics(compression=c), "")
    assert "| targeted size | 16.0 KiB → 5.8 KiB (64.1% removed) |" in report
    assert "| targeted parameters | 4,096 → 5,120 (+25.0%) |" in report and "% removed) |" in report
    assert "−" not in report and "(-" not in report
