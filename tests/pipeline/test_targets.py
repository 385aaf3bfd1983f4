from lrcompress.modules import LowRankLinear
from lrcompress.modules.surgery import replace_submodule
from lrcompress.pipeline.targets import select_targets
from helpers import tiny_model


def test_globs_regexes_and_ignore():
    layer = tiny_model("llama").model.layers[0]
    prefix = "model.layers.0"
    all_linears = select_targets(layer, prefix, ["*"], [])
    assert len(all_linears) == 7
    assert select_targets(layer, prefix, ["*.mlp.*"], ["*.down_proj"]) == ["mlp.gate_proj", "mlp.up_proj"]
    assert select_targets(layer, prefix, [r"re:.*\.(q|k)_proj"], []) == ["self_attn.q_proj", "self_attn.k_proj"]
    assert select_targets(layer, prefix, ["model.layers.1.*"], []) == []


def test_factors_of_a_compressed_module_are_not_targets():
    layer = tiny_model("llama").model.layers[0]
    replace_submodule(layer, "mlp.up_proj", LowRankLinear(64, 160, 4))
    names = select_targets(layer, "model.layers.0", ["*"], [])
    assert "mlp.up_proj" in names
    assert not any(n.startswith("mlp.up_proj.") for n in names)
