"""Write and read compressed checkpoints."""
from .export import densify, export_dense
from .peft import export_peft
from .layout import bytes_on_disk, check_output_dir, staged_directory
from .reader import load_compressed, read_metadata
from .writer import write_checkpoint

__all__ = ["bytes_on_disk", "check_output_dir", "densify", "export_dense", "export_peft", "load_compressed",
           "read_metadata", "staged_directory", "write_checkpoint"]
