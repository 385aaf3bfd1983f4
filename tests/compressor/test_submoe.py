"""submoe, expert_average and expert_prune: algorithms against closed forms, the compressor on synthetic
MoEs with known structure, and the pipeline end to end on tiny MoEs of every family."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from lrcompress.checkpoint import write_checkpoint
from lrcompress.compressor import get_compressor
from lrcompress.compressor.block import INPUT_SAMPLE, InputSample
from lrcompress.compressor.expert_merge import (average_merge, kmeans, merge_weights, most_frequent,
                                                union_svd_factors, union_svd_merge)
from lrcompress.compressor.expert_stats import EXPERT_GRAMS, EXPERT_STATS, ExpertGramStatistic, ExpertStatistic
from lrcompress.compressor.linalg import rank_for_ratio, whitening
from lrcompress.compressor.submoe import _reached
from lrcompress.errors import LrcompressError
from lrcompress.models import adapter_for
from lrcompress.models.moe import expert_count_key, expert_weights, moe_blocks, route
from lrcompress.modules import LowRankExperts, storage_bytes, stored_params
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

def _observed_in_two_parts(statistic, family, tokens, seed):
    """(block, inputs 2 × tokens × hidden, statistic): two windows observed separately with different
    chunk sizes, then merged, so that chunking and ``merge`` are both exercised."""
    model = tiny_moe(family)
    block = model.model.layers[0].mlp
    x = torch.randn(2, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    stat = statistic(block, chunk_tokens=4)
    stat.observe(x[:1], None)
    other = statistic(block, chunk_tokens=7)
    other.observe(x[1:], None)
    stat.merge(other)
    return block, x, stat


def test_expert_statistic_against_a_token_by_token_computation():
    block, x, stat = _observed_in_two_parts(ExpertStatistic, "qwen2_moe", tokens=9, seed=3)
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


# --- Sub-MoE† (intra-expert low-rank compression) ------------------------------------------------------

def _spd_gram(n, tokens, seed, scales=None):
    """XᵀX of ``tokens`` anisotropic rows (column scales ``scales``), and X itself."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    x = x * (scales if scales is not None else torch.logspace(0, -2, n, dtype=torch.float64))
    return x.T @ x, x


def test_whitened_union_svd_at_full_rank_is_the_untruncated_merge():
    g = torch.Generator().manual_seed(5)
    w3 = torch.randn(3, 6, 4, dtype=torch.float64, generator=g)
    w = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    whites = [whitening(_spd_gram(4, 20, seed)[0], 1e-4) for seed in range(3)]
    u, s, vt = union_svd_factors(w3, w, rank=min(6, 3 * 4), whitenings=whites)
    torch.testing.assert_close((u * s) @ vt, union_svd_merge(w3, w))


def _member_errors(weights, xs, rank, whitenings):
    """Σ_i ‖X_i (W_i − U_r Σ_r V_iᵀ)ᵀ‖² with member i's own reconstruction (merge weight e_i)."""
    total = 0.0
    for i, x in enumerate(xs):
        one_hot = torch.zeros(len(xs), dtype=torch.float64)
        one_hot[i] = 1.0
        u, s, vt = union_svd_factors(weights, one_hot, rank, whitenings)
        total += float((x @ (weights[i] - (u * s) @ vt).T).pow(2).sum())
    return total


def test_whitened_truncation_has_lower_routed_token_error_than_unwhitened():
    """The whitened union SVD minimizes the members' routed-token output error; the plain one does not."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(12, 16, dtype=torch.float64, generator=g)
    weights = torch.stack([base + 0.1 * torch.randn(12, 16, dtype=torch.float64, generator=g) for _ in range(2)])
    grams, xs = zip(*[_spd_gram(16, 200, seed) for seed in (7, 8)])
    whites = [whitening(gram, 0.0) for gram in grams]
    w = torch.tensor([0.6, 0.4], dtype=torch.float64)
    for rank in (2, 4, 8):
        assert _member_errors(weights, xs, rank, whites) < 0.8 * _member_errors(weights, xs, rank, None)
        merged = {}
        for label, white in (("whitened", whites), ("plain", None)):
            u, s, vt = union_svd_factors(weights, w, rank, white)
            merged[label] = sum(wi * float((x @ (wi_w - (u * s) @ vt).T).pow(2).sum())
                                for wi, x, wi_w in zip(w.tolist(), xs, weights))
        assert merged["whitened"] < merged["plain"]


def test_expert_gram_statistic_against_a_token_by_token_computation():
    block, x, stat = _observed_in_two_parts(ExpertGramStatistic, "olmoe", tokens=11, seed=4)
    tokens = x.reshape(-1, x.shape[-1])
    weights = expert_weights(block)
    with torch.no_grad():
        chosen = block.gate(tokens)[2]
    for e in range(4):
        routed = tokens[(chosen == e).any(dim=1)].double()
        hidden = torch.nn.functional.silu(routed @ weights.gate[e].double().T) * (routed @ weights.up[e].double().T)
        grams = stat.grams("b", e)
        assert int(stat.counts[e]) == len(routed)
        torch.testing.assert_close(grams["gate"], routed.T @ routed, rtol=1e-5, atol=1e-6)
        assert grams["up"] is grams["gate"]
        torch.testing.assert_close(grams["down"], hidden.T @ hidden, rtol=1e-4, atol=1e-6)


def _dagger_stats(block, tokens=64, seed=0):
    stats, x = _stats_for(block, tokens, seed)
    stats[EXPERT_GRAMS] = ExpertGramStatistic(block)
    with torch.no_grad():
        stats[EXPERT_GRAMS].observe(x, None)
    return stats


def test_dagger_config_and_needs():
    cls = get_compressor("submoe")
    with pytest.raises(ValueError, match="at most one of 'rank' or 'ratio'"):
        cls.Config(num_experts=2, rank=4, ratio=0.5)
    with pytest.raises(ValueError, match="give one"):
        cls.Config(num_experts=2, rank=4, subspace_rank=4)
    with pytest.raises(ValueError):
        cls.Config(num_experts=2, ratio=1.0)
    assert EXPERT_GRAMS in _compressor("submoe", num_experts=2, ratio=0.5).needs
    assert EXPERT_GRAMS not in _compressor("submoe", num_experts=2).needs
    assert cls.Config(num_experts=2, rank=1000).rank_for(32, 64) == 32
    assert cls.Config(num_experts=2, ratio=0.5).rank_for(32, 64) == rank_for_ratio(32, 64, 0.5)


def test_dagger_compress_gives_low_rank_experts_with_the_planned_size():
    model = tiny_moe("mixtral", num_local_experts=6, num_hidden_layers=1)
    block = model.model.layers[0].mlp
    stats = _dagger_stats(block, tokens=96)
    compressor = _compressor("submoe", num_experts=3, ratio=0.5)
    result = compressor.compress("b", block, stats)
    experts = result.module.experts
    rank = rank_for_ratio(32, 64, 0.5)
    assert isinstance(experts, LowRankExperts) and experts.num_experts == 3 and result.rank == rank == experts.rank
    assert compressor.plan(block).params_after == stored_params(result.module)
    assert compressor.plan(block).rank == rank
    assert "cholesky" in result.numerical_path
    dense = _compressor("expert_average", num_experts=3).compress("b", block, stats)
    assert result.details["groups"] == dense.details["groups"]
    torch.testing.assert_close(result.module.gate.weight, dense.module.gate.weight)
    # rank I = 32 is full for gate/up (I × hidden, out ≤ n·in): they equal the frequency-weighted average
    full = _compressor("submoe", num_experts=3, rank=32).compress("b", block, stats).module.experts.dense_weights()
    fused = dense.module.experts.gate_up_proj
    torch.testing.assert_close(torch.cat([full["gate"], full["up"]], dim=1), fused, rtol=1e-4, atol=1e-5)


def test_dagger_with_unreached_experts_gives_finite_factors(caplog):
    """Experts no token reached have empty Grams: left out of their cluster's SVD, or (a cluster nobody
    reached) whitened with the identity; the factors stay finite either way."""
    model = tiny_moe("mixtral", num_local_experts=4, num_hidden_layers=1)
    block = model.model.layers[0].mlp
    stats = _dagger_stats(block, tokens=5)       # 5 tokens: every reached expert's Gram is rank-deficient
    grams = stats[EXPERT_GRAMS]
    for e in (1, 3):
        grams.inputs[e].zero_()
        grams.intermediate[e].zero_()
        grams.counts[e] = 0
        stats[EXPERT_STATS].counts[e] = 0
    result = _compressor("submoe", num_experts=2, rank=8).compress("b", block, stats)
    assert all(torch.isfinite(p).all() for p in result.module.experts.parameters())
    members, w = _reached([0, 1, 3], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), grams.counts)
    assert members == [0] and w.tolist() == [1.0]
    for e in range(4):
        grams.inputs[e].zero_()
        grams.intermediate[e].zero_()
        grams.counts[e] = 0
    with caplog.at_level("WARNING"):
        empty = _compressor("submoe", num_experts=2, rank=8).compress("b", block, stats)
    assert "identity" in empty.numerical_path and "empty or degenerate Gram" in caplog.text
    assert all(torch.isfinite(p).all() for p in empty.module.experts.parameters())


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_dagger_pipeline_checkpoint_reloads_with_lrcompress_load(family, tmp_path):
    import lrcompress

    model = tiny_moe(family)
    stage = _stage("submoe", num_experts=2, ratio=0.3)
    records = LayerwisePipeline(model, adapter_for(model), [stage], PipelineSettings(batch_size=2)).run(WINDOWS)
    assert getattr(model.config, expert_count_key(model.config)) == 2
    blocks = [layer.mlp for layer in model.model.layers if isinstance(getattr(layer.mlp, "experts", None),
                                                                       LowRankExperts)]
    assert len(blocks) == len(records) > 0
    assert all(r.bytes_after == storage_bytes(b) and r.params_after == stored_params(b)
               for r, b in zip(records, blocks))
    with torch.no_grad():
        logits = model(input_ids=WINDOWS, use_cache=False).logits
    write_checkpoint(model, None, tmp_path, provenance={})
    reloaded = lrcompress.load(tmp_path)
    assert isinstance(reloaded.model.layers[-1].mlp.experts, LowRankExperts)
    assert getattr(reloaded.config, expert_count_key(reloaded.config)) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=WINDOWS, use_cache=False).logits, logits, rtol=0, atol=1e-4)


def test_dagger_checkpoint_exports_dense_and_loads_with_from_pretrained(tmp_path):
    import lrcompress
    from lrcompress.checkpoint import export_dense

    model = tiny_moe("qwen3_moe")
    LayerwisePipeline(model, adapter_for(model), [_stage("submoe", num_experts=2, rank=6)],
                      PipelineSettings(batch_size=2)).run(WINDOWS)
    (tmp_path / "c").mkdir()
    write_checkpoint(model, None, tmp_path / "c", provenance={})
    with torch.no_grad():
        logits = model(input_ids=WINDOWS, use_cache=False).logits
    export_dense(lrcompress.load(tmp_path / "c"), None, tmp_path / "d")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=WINDOWS, use_cache=False).logits, logits, rtol=0, atol=1e-4)
