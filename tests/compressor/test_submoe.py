"""submoe, expert_average and expert_prune: algorithms against closed forms, the compressor on synthetic
MoEs with known structure, and the pipeline end to end on tiny MoEs of every family."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from lrcompress.checkpoint import write_checkpoint
from lrcompress.compressor import get_compressor
from lrcompress.compressor.block import INPUT_SAMPLE, InputSample
from lrcompress.compressor.expert_merge import (average_merge, kmeans, merge_weights, most_frequent,
                                                union_svd_merge)
from lrcompress.compressor.expert_stats import EXPERT_STATS, ExpertStatistic
from lrcompress.errors import LrcompressError
from lrcompress.models import adapter_for
from lrcompress.models.moe import expert_count_key, moe_blocks, route
from lrcompress.pipeline import LayerwisePipeline, PipelineSettings, Stage
from helpers import tiny_model
from moe_helpers import MOE_FAMILIES, tiny_moe

WINDOWS = torch.randint(3, 259, (4, 24), generator=torch.Generator().manual_seed(0))


def _stage(method, targets=("*",), ignore=(), **options):
    cls = get_compressor(method)
    return Stage(0, cls(cls.Config(**options)), list(targets), list(ignore))


def _compressor(method, **options):
    cls = get_compressor(method)
    return cls(cls.Config(**options))


# --- tensor algorithms ---------------------------------------------------------------------------

def test_kmeans_recovers_separated_groups_whatever_the_seed():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g, dtype=torch.float64) * 10
    truth = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0, 1, 1])
    points = centers[truth] + 0.01 * torch.randn(10, 5, generator=g, dtype=torch.float64)
    for seed in range(5):
        labels = kmeans(points, 3, seed)
        assert torch.equal(labels, torch.tensor([0, 1, 2, 0, 1, 2, 2, 0, 1, 1]))


def test_kmeans_never_leaves_a_cluster_empty():
    points = torch.zeros(6, 2, dtype=torch.float64)      # all identical: k-means++ has no spread
    labels = kmeans(points, 3, seed=0)
    assert sorted(torch.bincount(labels, minlength=3).tolist()) == [1, 1, 4]


def test_union_svd_merge_full_rank_is_the_frequency_weighted_average():
    """U Σ V_iᵀ = W_i and the V merge is linear, so the untruncated subspace merge is Σ w_i W_i."""
    w3 = torch.randn(3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    torch.testing.assert_close(union_svd_merge(w3, w), (w[:, None, None] * w3).sum(0))
    torch.testing.assert_close(average_merge(w3, w), (w[:, None, None] * w3).sum(0))


def test_union_svd_merge_truncated_projects_the_average_on_the_shared_subspace():
    w3 = torch.randn(3, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    u = torch.linalg.svd(torch.cat(list(w3), dim=1)).U[:, :2]       # top-2 left vectors of [W_1 W_2 W_3]
    expected = u @ u.T @ (w[:, None, None] * w3).sum(0)
    torch.testing.assert_close(union_svd_merge(w3, w, rank=2), expected)


def test_merging_identical_experts_is_exact():
    one = torch.randn(5, 3, dtype=torch.float64)
    for w in (torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])):
        torch.testing.assert_close(union_svd_merge(torch.stack([one, one]), w.double()), one)


def test_merge_weights_and_most_frequent():
    f = torch.tensor([0.1, 0.0, 0.3, 0.3, 0.0], dtype=torch.float64)
    torch.testing.assert_close(merge_weights(f, [0, 2]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(merge_weights(f, [1, 4]), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert most_frequent(f, 3) == [0, 2, 3]


# --- statistics ----------------------------------------------------------------------------------

def test_expert_statistic_against_a_token_by_token_computation():
    model = tiny_moe("qwen2_moe")
    block = model.model.layers[0].mlp
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    stat = ExpertStatistic(block, chunk_tokens=4)
    stat.observe(x[:1], None)
    other = ExpertStatistic(block, chunk_tokens=5)
    other.observe(x[1:], None)
    stat.merge(other)
    tokens = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        chosen = block.gate(tokens)[2]
        outs = [block.experts(tokens, torch.full((len(tokens), 1), e), torch.ones(len(tokens), 1)) for e in range(4)]
    counts = torch.tensor([(chosen == e).any(dim=1).sum().item() for e in range(4)], dtype=torch.float64)
    torch.testing.assert_close(stat.frequencies(), counts / len(tokens))
    cos = torch.stack([torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() for b in outs])
                       for a in outs]).double()
    torch.testing.assert_close(stat.similarity("b"), cos, rtol=1e-5, atol=1e-6)


def test_input_sample_is_uniform_bounded_and_mergeable():
    a, b = InputSample(capacity=8, seed=0), InputSample(capacity=8, seed=1)
    a.observe(torch.arange(20.0)[:, None].expand(20, 3), None)
    b.observe(torch.arange(20.0, 30.0)[:, None].expand(10, 3), None)
    a.merge(b)
    rows = a.sample()
    assert rows.shape == (8, 3) and len(set(rows[:, 0].tolist())) == 8


# --- the compressors on synthetic MoEs -------------------------------------------------------------

def _prototype_moe(groups, noise=1e-3, seed=0):
    """A Mixtral whose experts are a few prototypes (expert e copies prototype groups[e]) plus noise."""
    experts = len(groups)
    model = tiny_moe("mixtral", seed=seed, num_local_experts=experts, num_experts_per_tok=2, num_hidden_layers=1)
    g = torch.Generator().manual_seed(seed + 7)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        protos_gu = torch.randn(max(groups) + 1, *block.experts.gate_up_proj.shape[1:], generator=g) * 0.3
        protos_d = torch.randn(max(groups) + 1, *block.experts.down_proj.shape[1:], generator=g) * 0.3
        index = torch.tensor(groups)
        block.experts.gate_up_proj.copy_(protos_gu[index] + noise * torch.randn(block.experts.gate_up_proj.shape,
                                                                                 generator=g))
        block.experts.down_proj.copy_(protos_d[index] + noise * torch.randn(block.experts.down_proj.shape, generator=g))
    return model, protos_gu, protos_d


def _stats_for(block, tokens=64, seed=0):
    x = torch.randn(1, tokens, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    stats = {EXPERT_STATS: ExpertStatistic(block), INPUT_SAMPLE: InputSample()}
    with torch.no_grad():
        for s in stats.values():
            s.observe(x, None)
    return stats, x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_recovers_the_prototype_groups(seed):
    groups = [0, 1, 2, 0, 1, 2]
    model, _, _ = _prototype_moe(groups, seed=seed)
    block = model.model.layers[0].mlp
    stats, _ = _stats_for(block, seed=seed)
    result = _compressor("submoe", num_experts=3, seed=seed).compress("b", block, stats)
    assert sorted(result.details["groups"]) == [[0, 3], [1, 4], [2, 5]]


def test_merging_exact_copies_reproduces_the_prototypes_and_singletons_are_unchanged():
    groups = [0, 1, 0, 2, 3]                      # experts 0 and 2 are the same; 1, 3, 4 are unique
    model, protos_gu, protos_d = _prototype_moe(groups, noise=0.0)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight[2] = block.gate.weight[0]
    stats, _ = _stats_for(block, tokens=128)
    result = _compressor("submoe", num_experts=4).compress("b", block, stats)
    assert sorted(result.details["groups"]) == [[0, 2], [1], [3], [4]]
    new = result.module
    for slot, members in enumerate(result.details["groups"]):
        proto = groups[members[0]]
        torch.testing.assert_close(new.experts.gate_up_proj[slot], protos_gu[proto], rtol=0, atol=1e-6)
        torch.testing.assert_close(new.experts.down_proj[slot], protos_d[proto], rtol=0, atol=1e-6)
        if len(members) == 1:     # exactly the original expert and router row
            assert torch.equal(new.experts.gate_up_proj[slot], block.experts.gate_up_proj[members[0]])
        torch.testing.assert_close(new.gate.weight[slot], block.gate.weight[members[0]])


def test_average_equals_submoe_at_full_rank_and_prune_keeps_the_most_used():
    model = tiny_moe("mixtral", num_local_experts=6, num_hidden_layers=1)
    block = model.model.layers[0].mlp
    stats, x = _stats_for(block, tokens=96)
    sub = _compressor("submoe", num_experts=3).compress("b", block, stats)
    avg = _compressor("expert_average", num_experts=3).compress("b", block, stats)
    assert sub.details["groups"] == avg.details["groups"]
    torch.testing.assert_close(sub.module.experts.gate_up_proj, avg.module.experts.gate_up_proj)
    truncated = _compressor("submoe", num_experts=3, subspace_rank=4).compress("b", block, stats)
    assert not torch.allclose(truncated.module.experts.down_proj, avg.module.experts.down_proj)
    pruned = _compressor("expert_prune", num_experts=3).compress("b", block, stats)
    with torch.no_grad():
        chosen = block.gate(x[0])[2]
    counts = torch.stack([(chosen == e).any(1).sum() for e in range(6)]).tolist()
    expected = sorted(sorted(range(6), key=lambda e: (-counts[e], e))[:3])
    assert pruned.details["groups"] == [[e] for e in expected]
    assert torch.equal(pruned.module.gate.weight, block.gate.weight[expected])
    assert torch.equal(pruned.module.experts.down_proj, block.experts.down_proj[expected])


def test_config_sizes():
    cls = get_compressor("submoe")
    assert cls.Config(expert_ratio=0.5).kept(8) == 4 and cls.Config(expert_ratio=0.25).kept(8) == 6
    with pytest.raises(ValueError, match="exactly one"):
        cls.Config(num_experts=2, expert_ratio=0.5)
    with pytest.raises(LrcompressError, match="no reduction"):
        cls.Config(num_experts=8).kept(8)


# --- the pipeline end to end -----------------------------------------------------------------------

@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_pipeline_merges_every_block_and_the_checkpoint_reloads(family, tmp_path):
    model = tiny_moe(family)
    stage = _stage("submoe", num_experts=2)
    plan_after = {f"model.layers.{i}.mlp": stage.compressor.plan(layer.mlp).params_after
                  for i, layer in enumerate(model.model.layers) if moe_blocks(layer)}
    records = LayerwisePipeline(model, adapter_for(model), [stage], PipelineSettings(batch_size=2)).run(WINDOWS)
    assert {r.name: r.params_after for r in records} == plan_after
    assert all(0.0 <= r.relative_error < 10 for r in records)
    assert getattr(model.config, expert_count_key(model.config)) == 2
    hidden = torch.randn(30, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in model.model.layers:
        if moe_blocks(layer):
            indices = route(layer.mlp, hidden)
            assert indices.min() >= 0 and indices.max() < 2
    with torch.no_grad():
        logits = model(input_ids=WINDOWS, use_cache=False).logits
    assert torch.isfinite(logits).all()
    write_checkpoint(model, None, tmp_path, provenance={})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=WINDOWS, use_cache=False).logits, logits)


def test_block_error_record_matches_a_direct_computation():
    model = tiny_moe("olmoe", num_hidden_layers=1)
    original = tiny_moe("olmoe", num_hidden_layers=1)
    records = LayerwisePipeline(model, adapter_for(model), [_stage("expert_prune", num_experts=2)],
                                PipelineSettings(batch_size=4)).run(WINDOWS)
    captured = []
    handle = original.model.layers[0].mlp.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        original(input_ids=WINDOWS, use_cache=False)
        handle.remove()
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])[None]
        before = original.model.layers[0].mlp(x)
        after = model.model.layers[0].mlp(x)
    expected = float((after - before).norm() / before.norm())
    assert records[0].relative_error == pytest.approx(expected, rel=1e-4)   # 96 tokens < sample capacity


def test_a_stage_must_cover_every_moe_block():
    model = tiny_moe("mixtral")
    stage = _stage("submoe", ignore=["model.layers.1.*"], num_experts=2)
    with pytest.raises(LrcompressError, match="left out: model.layers.1.mlp"):
        LayerwisePipeline(model, adapter_for(model), [stage], PipelineSettings()).run(WINDOWS)
    dense = tiny_model("llama")
    with pytest.raises(LrcompressError, match="no moe blocks"):
        LayerwisePipeline(dense, adapter_for(dense), [_stage("submoe", num_experts=2)], PipelineSettings()).run(WINDOWS)


def test_recipe_run_writes_a_plain_checkpoint(tmp_path, calibration_file):
    from lrcompress.recipe import parse_recipe
    from lrcompress.runner import run_recipe
    from helpers import byte_tokenizer
    from tiny_runs import tiny_recipe_dict

    model_dir = tmp_path / "moe"
    tiny_moe("qwen2_moe").save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    recipe = tiny_recipe_dict(model_dir, calibration_file, tmp_path / "out", method="expert_average")
    recipe["stages"] = [{"method": "expert_average", "expert_ratio": 0.5}]
    dry = run_recipe(parse_recipe(recipe), dry_run=True)
    assert [p.name for p in dry.plan] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    result = run_recipe(parse_recipe(recipe))
    assert [m["params_after"] for m in result.metrics["modules"]] == [p.params_after for p in dry.plan]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_experts == 2
    assert reloaded.model.layers[0].mlp.experts.down_proj.shape[0] == 2
    bad = dict(recipe, stages=[{"method": "expert_average", "num_experts": 2, "ratio": 0.2}])
    with pytest.raises(Exception, match="stages.0.ratio"):
        parse_recipe(bad)
