"""Model files: validated safetensors IO, weights-only pickles, layouts and families."""

from .arch import ARCHS, SD15, SDXL, Arch, Family, block_of, component_of, detect_checkpoint, detect_lora, load_layout
from .safetensors_io import OutEntry, SafetensorsFile, StreamingWriter, TensorInfo, read_header, save_file
from .sources import DictSource, SafetensorsSource, TensorSource, open_source, sha256_file

__all__ = [
    "ARCHS",
    "SD15",
    "SDXL",
    "Arch",
    "Family",
    "block_of",
    "component_of",
    "detect_checkpoint",
    "detect_lora",
    "load_layout",
    "OutEntry",
    "SafetensorsFile",
    "StreamingWriter",
    "TensorInfo",
    "read_header",
    "save_file",
    "DictSource",
    "SafetensorsSource",
    "TensorSource",
    "open_source",
    "sha256_file",
]
