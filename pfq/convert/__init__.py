"""ProFound PyTorch checkpoints <-> pfq model directories, without torch (docs/checkpoints.md)."""

from pfq.convert.errors import ConvertError, UnsafeCheckpointError
from pfq.convert.pipeline import Converted, convert_checkpoint, convert_file, export_torch, torch_state_dict
from pfq.convert.store import load_model_dir, save_model_dir

__all__ = [
    "ConvertError",
    "Converted",
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "convert_file",
    "export_torch",
    "load_model_dir",
    "save_model_dir",
    "torch_state_dict",
]
