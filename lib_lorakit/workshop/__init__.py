"""Model workshop: extract a LoRA from two checkpoints, resize a LoRA, merge LoRAs into one, clean a checkpoint.

Each operation is one function taking plain arguments plus optional ``progress(done, total, text)``
and ``cancel() -> bool`` callbacks, returning a JSON-serialisable report; outputs are written to a
temporary file and renamed into place, never over an input.
"""

from .clean import clean
from .extract import extract
from .hashes import file_hashes
from .lora_merge import lora_merge
from .resize import resize
from .svd import DYNAMIC_METHODS, parse_dynamic

__all__ = ["DYNAMIC_METHODS", "clean", "extract", "file_hashes", "lora_merge", "parse_dynamic", "resize"]
