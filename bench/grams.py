"""Shared by the bench scripts that compress every module from the *uncompressed* model's statistics."""
from __future__ import annotations

import torch
from torch import nn

from lrcompress.compressor import GramStatistic


@torch.no_grad()
def collect_grams(model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int, start: int = 0
                  ) -> dict[str, GramStatistic]:
    """One hooked forward pass over ``windows``: the Gram XᵀX of every named Linear's input, over the
    positions from ``start`` on (1 leaves out each window's first token and its massive activations)."""
    stats = {n: GramStatistic(model.get_submodule(n).in_features) for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
                   lambda _m, args, out, n=n: stats[n].observe(args[0][:, start:], out[:, start:]))
               for n in names]
    try:
        for batch in windows.split(batch_size):
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats
