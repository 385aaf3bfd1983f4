"""The plan on a meta-device skeleton: sizes without weights, and which modules would not shrink."""
import torch

from helpers import tiny_model
from lrcompress.compressor import get_compressor
from lrcompress.pipeline import Stage
from lrcompress.pipeline.plan import could_shrink, plan_modules


def _stage(method: str, **options) -> Stage:
    cls = get_compressor(method)
    return Stage(0, cls(cls.Config(**options)), ["*"])


def test_a_rank_at_or_above_break_even_is_flagged_and_a_gate_vector_is_not():
    assert could_shrink(64, 64) and could_shrink(2, 3) and not could_shrink(1, 64) and not could_shrink(2, 2)
    with torch.device("meta"):
        model = tiny_model("llama")
    plan = plan_modules(model, [_stage("svd", rank=40)])
    flagged = {p.name.split(".", 3)[3] for p in plan if p.grows}
    assert flagged == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    assert all(p.params_after >= p.params_before for p in plan if p.grows)
    assert not any(p.grows for p in plan_modules(model, [_stage("svd", ratio=0.2)]))
    assert not any(p.grows for p in plan_modules(model, [_stage("eora", rank=40)]))   # adds a path by design
