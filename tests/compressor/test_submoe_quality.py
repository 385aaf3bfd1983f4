"""Quality, not plumbing: on an MoE whose 8 experts are 3 prototypes plus noise (issue 32, item 4), the
default Sub-MoE clustering finds the prototype groups, and merging within them keeps the block's output on
held-out tokens far better than frequency pruning to the same expert count or merging wrong groups.

Experts of one prototype also get near-equal router rows (prototype row + noise): experts that compute the
same function are chosen for the same tokens, as in a trained MoE whose experts specialize. The output error
is measured on inputs the statistics never saw."""
import pytest
import torch

from lrcompress.compressor.submoe import SubMoE
from moe_helpers import moe_compressor, prototype_moe, stats_for

GROUPS = [0, 1, 2, 0, 1, 2, 0, 1]          # interleaved, so index-order grouping would be wrong
PROTOTYPE_CLUSTERS = [[0, 3, 6], [1, 4, 7], [2, 5]]


def _specialist_block(seed: int):
    model, _, _ = prototype_moe(GROUPS, noise=0.02, seed=seed)
    block = model.model.layers[0].mlp
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        rows = torch.randn(max(GROUPS) + 1, block.gate.weight.shape[1], generator=g) * 0.5
        block.gate.weight.copy_(rows[torch.tensor(GROUPS)] + 0.05 * torch.randn(block.gate.weight.shape, generator=g))
    return block


def _held_out_error(block, replacement, seed: int) -> float:
    _, x = stats_for(block, tokens=256, seed=seed + 100)        # fresh tokens, not the calibration ones
    with torch.no_grad():
        before, after = block(x), replacement(x)
    before, after = (t[0] if isinstance(t, tuple) else t for t in (before, after))
    return float((after - before).norm() / before.norm())


class _FixedGroups(SubMoE):
    """Sub-MoE's merge on a given partition (the control: what wrong clusters cost)."""

    def __init__(self, config, fixed):
        super().__init__(config)
        self.fixed = fixed

    def groups(self, statistic, similarity, kept):
        return self.fixed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merging_the_prototype_clusters_beats_pruning_and_wrong_clusters(seed):
    block = _specialist_block(seed)
    stats, _ = stats_for(block, tokens=256, seed=seed)
    merged = moe_compressor("submoe", num_experts=3, seed=seed).compress("b", block, stats)
    assert sorted(merged.details["groups"]) == PROTOTYPE_CLUSTERS
    pruned = moe_compressor("expert_prune", num_experts=3).compress("b", block, stats)
    wrong = _FixedGroups(SubMoE.Config(num_experts=3), [[0, 1, 2], [3, 4, 5], [6, 7]]).compress("b", block, stats)
    merge_error = _held_out_error(block, merged.module, seed)
    prune_error = _held_out_error(block, pruned.module, seed)
    wrong_error = _held_out_error(block, wrong.module, seed)
    # measured: merge 0.24-0.25, prune 0.76-0.84, wrong clusters 0.94-0.96 (seeds 0-2); the residual merge error is top-2 routing now
    # mixing two prototypes where it used to pick two members of one
    assert merge_error < 0.4 * prune_error, (merge_error, prune_error)
    assert merge_error < 0.4 * wrong_error, (merge_error, wrong_error)
