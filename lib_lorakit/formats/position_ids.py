"""CLIP ``position_ids``: detect and repair the broken float copies some merges leave behind.

A healthy ``position_ids`` is the integer arange ``[[0, 1, …, 76]]``. Old merge scripts
averaged it as a float tensor, leaving entries such as 2.9999 that the text encoder
truncates to the wrong position. Merge, bake and the checkpoint clean-up all repair it the
same way: back to the integer arange, and they say so.
"""

from __future__ import annotations

import torch

POSITION_IDS_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
)


def is_position_ids_key(key: str) -> bool:
    """Return True for a CLIP text encoder's ``position_ids`` key (any prefix)."""
    return key.endswith("text_model.embeddings.position_ids")


def check_position_ids(t: torch.Tensor) -> str | None:
    """Return why ``t`` is not a clean integer arange, or None when it is.

    Args:
        t: the stored tensor, shape (1, n) or (n,).
    """
    flat = t.reshape(-1)
    expected = torch.arange(flat.numel(), dtype=torch.float64)
    if t.dtype.is_floating_point:
        values = flat.to(torch.float64)
        if not torch.isfinite(values).all():
            return "holds non-finite values"
        bad = (values - expected).abs()
        if bool((bad != 0).any()):
            i = int(bad.argmax())
            return f"is a float tensor with position {i} stored as {float(values[i])!r} (expected {i})"
        return f"is stored as {str(t.dtype).replace('torch.', '')} instead of int64"
    if not torch.equal(flat.to(torch.int64), expected.to(torch.int64)):
        i = int((flat.to(torch.int64) != expected.to(torch.int64)).nonzero()[0])
        return f"is out of order (position {i} holds {int(flat[i])})"
    if t.dtype != torch.int64:
        return f"is stored as {str(t.dtype).replace('torch.', '')} instead of int64"
    return None


def repaired_position_ids(t: torch.Tensor) -> torch.Tensor:
    """Return the integer arange with the shape of ``t`` (int64), the value every CLIP expects."""
    return torch.arange(t.numel(), dtype=torch.int64).reshape(t.shape)
