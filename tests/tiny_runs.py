"""Build recipes for end-to-end runs on the tiny models (shared by runner, checkpoint and CLI tests)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lrcompress.recipe import Recipe, parse_recipe


def tiny_recipe_dict(model_dir: Path, text: Path, out: Path, method: str = "whiten", ratio: float = 0.2,
                     **extra: Any) -> dict[str, Any]:
    recipe = {
        "model": {"path": str(model_dir)},
        "calibration": {"dataset": str(text), "num_samples": 6, "seq_len": 48, "seed": 0},
        "stages": [{"method": method, "ratio": ratio}],
        "runtime": {"device": "cpu", "batch_size": 3},
        "output": {"dir": str(out)},
        # The tiny runs evaluate on their calibration text (one small file, no shared data needed).
        "eval": {"perplexity": [{"dataset": str(text), "seq_len": 48, "max_windows": 3}],
                 "allow_calibration_split": True},
    }
    recipe.update(extra)
    return recipe


def tiny_recipe(model_dir: Path, text: Path, out: Path, **kwargs: Any) -> Recipe:
    return parse_recipe(tiny_recipe_dict(model_dir, text, out, **kwargs))
