"""``runtime.distill`` in the cost model (pipeline/costs.py): its time is a phase, its memory two named host terms
(the teacher states, held through the walk; the training's working set beyond the walk's), a device term when
it runs on a GPU, and a run that would not fit is refused with a fix that does not suggest lazy mode."""
import pytest

from lrcompress.models.loading import model_skeleton
from lrcompress.pipeline.costs import GIB, distill_bytes, model_shape, refusals
from lrcompress.pipeline.plan import PlannedModule
from lrcompress.recipe import parse_recipe
from pipeline.test_costs import config_only, eight_b_recipe, predicted  # noqa: F401  (config_only: a fixture)

DISTILL = {"epochs": 2}


def test_distillation_is_a_phase_and_two_host_terms(config_only, calibration_file, tmp_path):  # noqa: F811
    plain = predicted(eight_b_recipe(config_only, calibration_file, tmp_path / "out", lazy=False))
    recipe = eight_b_recipe(config_only, calibration_file, tmp_path / "out", lazy=False, distill=DISTILL)
    costs = predicted(recipe)
    assert "distillation" not in plain.phases and costs.phases["distillation"] > 0
    teacher = 32 * 512 * 4096 * 4                                   # windows × seq × hidden × float32
    assert costs.host_parts["distillation teacher states"] == pytest.approx(teacher)
    training = costs.host_parts["distillation training (beyond the walk's working set)"]
    assert training > 8e9 * 2                                        # at least the float32 upcast of a bf16 8B
    assert costs.peak_host_bytes == pytest.approx(plain.peak_host_bytes + teacher + training)
    # 2.5 forwards per trained window (forward + backward), 2 epochs, 28 of 32 windows: over 2 · 28/32 · 2.5 propagations
    assert costs.phases["distillation"] > 2 * 28 / 32 * 2.5 * plain.phases["propagation"]
    longer = predicted(eight_b_recipe(config_only, calibration_file, tmp_path / "out", lazy=False,
                                      distill={"epochs": 4}))
    assert longer.phases["distillation"] > 1.8 * costs.phases["distillation"]


def test_a_distillation_that_does_not_fit_is_refused_without_suggesting_lazy_mode(config_only, calibration_file,  # noqa: F811
                                                                                 tmp_path):
    recipe = eight_b_recipe(config_only, calibration_file, tmp_path / "out", lazy=False, distill=DISTILL)
    said = refusals(predicted(recipe), parse_recipe(recipe), {"host": 24 * GIB, "device": None, "disk": 1e15})
    assert len(said) == 1 and "drop runtime.distill" in said[0] and "runtime.lazy" not in said[0]
    recipe = eight_b_recipe(config_only, calibration_file, tmp_path / "out", lazy=False, distill=DISTILL,
                            device="cuda")
    on_gpu = predicted(recipe, "cuda")
    term = on_gpu.device_parts["distillation (the whole model, beyond the walk's working set)"]
    assert term > 32 * GIB                                           # the 8B model in float32 on the device


def test_a_sparse_dictionary_counts_as_trained_factors(config_only, calibration_file, tmp_path):  # noqa: F811
    """The distillation trains CoSpaDi's dictionaries and values (pipeline.refine's "factors"): their gradient,
    AdamW's moments, best and initial copies (5 float32 copies of the planned values) are in the training term."""
    recipe = parse_recipe(eight_b_recipe(config_only, calibration_file, tmp_path / "out", lazy=False,
                                         distill=DISTILL))
    shape = model_shape(model_skeleton(recipe.model.path, recipe.model.dtype))
    dictionary = PlannedModule("model.layers.0.mlp.down_proj", 0, "cospadi", 4096, 14336, 58720256, 46976204, None)
    quantized = PlannedModule("model.layers.0.mlp.down_proj", 0, "gptq", 4096, 14336, 58720256, 58720256, None)
    assert distill_bytes(recipe, [dictionary], shape)[1] - distill_bytes(recipe, [quantized], shape)[1] == \
        pytest.approx(46976204 * 4 * 5)
