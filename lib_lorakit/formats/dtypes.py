"""Save dtypes and the metadata rules every writer of a checkpoint (bake, merge) shares."""

from __future__ import annotations

from ..errors import RecipeError

SAVE_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}  # user name -> safetensors code
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
FP16_MAX = 65504.0
# hashes of the input that no longer describe the output
DROP_METADATA = ("modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash")
HASH_PLACEHOLDER = "0" * 64  # written first, patched once the input hashes are known


def save_code(save_dtype: str) -> str:
    """The safetensors code for a save dtype name (``fp16`` -> ``F16``), or the user's error."""
    try:
        return SAVE_DTYPES[save_dtype]
    except (KeyError, TypeError):
        raise RecipeError(f"Unknown save dtype {save_dtype!r}.", fix=f"Use one of {', '.join(SAVE_DTYPES)}.") from None


def out_code(src_code: str, save: str) -> str:
    """The dtype a tensor is written in: floats take the save dtype, the rest stay as stored."""
    return save if src_code in FLOAT_CODES else src_code
