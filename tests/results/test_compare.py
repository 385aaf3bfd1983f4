"""Run labels of `lrcompress compare`: a budget allocation and output matching make a different recipe."""
import yaml

from lrcompress.results import RunMetrics
from lrcompress.results.compare import method_label


def _run(tmp_path, name, stages, runtime=None):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "recipe.yaml").write_text(yaml.safe_dump({"stages": stages, "runtime": runtime or {}}))
    return directory


def test_labels_name_the_allocation_and_the_target(tmp_path):
    uniform = _run(tmp_path, "a", [{"method": "whiten", "allocation": {"strategy": "uniform"}}], {"target": "layer"})
    budget = _run(tmp_path, "b", [{"method": "whiten", "allocation": {"strategy": "global"}}], {"target": "original"})
    chained = _run(tmp_path, "c", [{"method": "gptq"}, {"method": "eora", "allocation": "spectrum"}])
    assert method_label(RunMetrics(), uniform) == "whiten"
    assert method_label(RunMetrics(), budget) == "whiten[global] (target original)"
    assert method_label(RunMetrics(), chained) == "gptq+eora[spectrum]"
