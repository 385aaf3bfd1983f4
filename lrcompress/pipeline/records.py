"""What the pipeline records for every compressed module."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ModuleRecord:
    name: str
    layer: int
    stage: int
    method: str
    in_features: int
    out_features: int
    params_before: int
    params_after: int
    rank: int | None
    relative_error: float          # ‖X(W−Ŵ)ᵀ‖_F / ‖XWᵀ‖_F on the calibration inputs of this stage,
                                   # W the module's original weight (before the run's first stage)
    numerical_path: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    bytes_before: int | None = None  # exact checkpoint bytes of the module this stage received
    bytes_after: int | None = None   # ... and of its replacement (codes, scales, masks, indices included)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
