"""The layer-wise calibration pipeline."""
from ..models.capture import LayerInputs, capture_layer_inputs
from .engine import LayerwisePipeline
from .settings import PipelineSettings, Stage
from . import fisher  # noqa: F401  (registers the "fisher" pre-pass)
from . import expert_spectra  # noqa: F401  (registers the "expert_spectra" pre-pass)
from .observer import LoggingObserver, PipelineObserver
from .prepass import PREPASSES, PrePassOutput, PrePassResult, register_prepass, run_prepasses
from .records import ModuleRecord
from .targets import select_targets
from .walk import LayerWalk

__all__ = ["LayerInputs", "LayerWalk", "LayerwisePipeline", "LoggingObserver", "ModuleRecord", "PipelineObserver",
           "PipelineSettings", "PREPASSES", "PrePassOutput", "PrePassResult", "Stage", "capture_layer_inputs",
           "register_prepass", "run_prepasses", "select_targets"]
