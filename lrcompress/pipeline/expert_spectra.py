"""The ``expert_spectra`` pre-pass: the spectrum shares of every targeted MoE block, before any is compressed.

``submoe`` with ``rank_allocation: layers`` shares one budget of kept triplets among all MoE blocks (see
``compressor/submoe.py``), so compressing the first block needs every block's spectra. They come from the
weights alone (no forward pass): each layer is loaded through the layer store (lazy mode works), its
targeted blocks' expert weights are decomposed (``compressor.expert_merge.spectrum_shares``, float64), and
the layer is released. What is kept: min(out, in) float64 values per weight type and block.
"""
from __future__ import annotations

from ..compressor.expert_stats import EXPERT_SPECTRA, ExpertSpectraStatistic
from .prepass import PrePassResult, register_prepass
from .walk import LayerWalk


@register_prepass(EXPERT_SPECTRA)
def expert_spectra_pass(walk: LayerWalk, targets: list[str]) -> PrePassResult:
    """One ``ExpertSpectraStatistic`` per target block (full names), all sharing one table."""
    table: dict[str, ExpertSpectraStatistic] = {}
    prefixes = {index: walk.adapter.layer_prefix(index) + "." for index in range(len(walk.decoder_layers))}
    by_layer = {index: [t for t in targets if t.startswith(prefix)] for index, prefix in prefixes.items()}
    indices = [index for index, names in by_layer.items() if names]
    for index, layer in walk.layers(indices):
        for name in by_layer[index]:
            ExpertSpectraStatistic.of_block(name, layer.get_submodule(name[len(prefixes[index]):]), table)
    values = sum(len(s) for statistic in table.values() for s in statistic.spectra.values())
    return PrePassResult(dict(table), {"blocks": len(table), "values": values})
