"""Every statistic kind moves between processes as tensors and merges in rank order.

The cases below must cover every registered kind: a new statistic without a case here fails
``test_every_statistic_kind_has_a_case``.
"""
from __future__ import annotations

import inspect
from typing import Callable

import pytest
import torch

from lrcompress.compressor import GramStatistic, OriginalWeight
from lrcompress.compressor.block import InputSample
from lrcompress.compressor.expert_stats import (ExpertGramStatistic, ExpertSpectraStatistic, ExpertStatistic,
                                               WeightedExpertGramStatistic)
from lrcompress.compressor.fisher import FisherStatistic, OutputGradientStatistic
from lrcompress.compressor.stats import SNAPSHOTS, STATISTICS, CrossGramStatistic, Statistic
from lrcompress.pipeline import PREPASSES
from lrcompress.pipeline.distributed import merge_in_rank_order
from lrcompress.pipeline.transfer import decode_state, encode_state
from moe_helpers import tiny_moe


def _data(part: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(100 + part))


def _gram(part: int | None) -> Statistic:
    stat = GramStatistic(5)
    if part is not None:
        stat.observe(_data(part, 2, 3 + part, 5), None)
    return stat


def _cross(part: int | None) -> Statistic:
    stat = CrossGramStatistic(5)
    if part is not None:
        stat.observe_pair(_data(part, 2, 3 + part, 5), _data(part + 20, 2, 3 + part, 5))
    return stat


def _original(part: int | None) -> Statistic:
    return OriginalWeight(_data(0, 4, 5))


def _fisher(part: int | None) -> Statistic:
    stat = FisherStatistic(4, 5)
    if part is not None:
        stat.observe_gradient(_data(part, 2, 3, 5), _data(part + 50, 2, 3, 4))
    return stat


def _output_gradient(part: int | None) -> Statistic:
    stat = OutputGradientStatistic(4)
    if part is not None:
        stat.observe_gradient(_data(part, 2, 3, 5), _data(part + 50, 2, 3, 4))
    return stat


def _sample(part: int | None) -> Statistic:
    stat = InputSample(capacity=4)
    if part is not None:
        stat.observe(_data(part, 3 + part, 5), None)
    return stat


_BLOCK = None


def _block() -> torch.nn.Module:
    global _BLOCK
    if _BLOCK is None:
        _BLOCK = tiny_moe("mixtral").model.layers[0].mlp
    return _BLOCK


def _experts(part: int | None, kind: type = ExpertStatistic) -> Statistic:
    stat = kind(_block(), chunk_tokens=4)
    if part is not None:
        with torch.no_grad():
            stat.observe(_data(part, 1, 5 + part, 64), None)
    return stat


def _spectra(part: int | None) -> Statistic:
    """Weights only: every part (process) holds the same values, and merging keeps them."""
    return ExpertSpectraStatistic.of_block("model.layers.0.mlp", _block(), {})


CASES: dict[str, Callable[[int | None], Statistic]] = {
    "gram": _gram, "cross_gram": _cross, "original_weight": _original, "fisher": _fisher,
    "output_gradient": _output_gradient, "block_input_sample": _sample,
    "expert_outputs": _experts, "expert_grams": lambda part: _experts(part, ExpertGramStatistic),
    "expert_grams_weighted": lambda part: _experts(part, WeightedExpertGramStatistic),
    "expert_spectra": _spectra,
}


def _assert_same_state(a: Statistic, b: Statistic) -> None:
    sa, sb = a.state(), b.state()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _subclasses(cls: type) -> set[type]:
    """Every concrete subclass (abstract bases such as the MoE block statistics' base are skipped)."""
    found = {sub for direct in cls.__subclasses__() for sub in {direct} | _subclasses(direct)}
    return {sub for sub in found if not inspect.isabstract(sub)}


def test_every_statistic_kind_has_a_case():
    assert set(CASES) == set(STATISTICS) | set(SNAPSHOTS) | set(PREPASSES)
    assert {type(make(None)) for make in CASES.values()} == _subclasses(Statistic)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_state_round_trips_through_bytes(kind):
    observed = CASES[kind](0)
    received = CASES[kind](None)
    received.load_state(decode_state("m/" + kind, encode_state("m/" + kind, observed.state())))
    _assert_same_state(received, observed)
    assert all(not t.is_floating_point() or t.dtype in (torch.float32, torch.float64)
               for t in observed.state().values())


@pytest.mark.parametrize("kind", sorted(CASES))
def test_rank_order_merge_equals_merging_the_parts_in_order(kind):
    expected = CASES[kind](0)
    for part in (1, 2):
        expected.merge(CASES[kind](part))
    template = CASES[kind](None)
    untouched = CASES[kind](None)
    merged = merge_in_rank_order(template, [CASES[kind](part).state() for part in range(3)])
    _assert_same_state(merged, expected)
    _assert_same_state(template, untouched)   # the template only lends its shape and device


def test_counts_travel_as_tensors():
    state = _gram(1).state()
    assert state["count"].dtype == torch.int64 and int(state["count"]) == 2 * 4
    merged = merge_in_rank_order(_gram(None), [_gram(0).state(), _gram(1).state()])
    assert merged.count == 2 * 3 + 2 * 4


def test_a_statistic_out_of_step_is_refused():
    blob = encode_state("model.layers.0.mlp.up_proj/gram", _gram(0).state())
    with pytest.raises(RuntimeError, match="out of step"):
        decode_state("model.layers.0.mlp.down_proj/gram", blob)
