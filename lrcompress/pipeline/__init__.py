"""The layer-wise calibration pipeline."""
from .capture import LayerInputs, capture_layer_inputs
from .engine import LayerwisePipeline, PipelineSettings, Stage
from .observer import LoggingObserver, PipelineObserver
from .records import ModuleRecord
from .targets import select_targets

__all__ = ["LayerInputs", "LayerwisePipeline", "LoggingObserver", "ModuleRecord", "PipelineObserver",
           "PipelineSettings", "Stage", "capture_layer_inputs", "select_targets"]
