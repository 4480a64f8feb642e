"""Checks on what an operation wrote: tensors copied as they are (the VAE) are not computed, so not checked by the
engines; a NaN/inf among them is reported as a warning.

Decision: a warning, not an error. lorakit does not change the VAE — it copies the base's (or the chosen
model's) bytes — so the output is exactly as broken as its source, and a user who swaps the VAE at generation
time loses nothing. Refusing would block every bake into such a checkpoint for a problem lorakit did not cause.
"""

from __future__ import annotations

from typing import Any

VAE_PREFIXES = ("first_stage_model.", "vae.")


def nonfinite_vae(path: str) -> list[str]:
    """The VAE tensors of ``path`` holding NaN/inf values, as ``"key (n of m values)"``."""
    from ..formats.sources import open_source
    from ..streaming import nonfinite_count

    bad = []
    src = open_source(path)
    try:
        for key in src.keys():
            if not key.startswith(VAE_PREFIXES):
                continue
            t = src.read(key)
            n = nonfinite_count(t)
            if n:
                bad.append(f"{key} ({n} of {t.numel()} values)")
    finally:
        src.close()
    return bad


def nonfinite_vae_later(path: str):
    """:func:`nonfinite_vae` on a side thread, started now: returns a function that waits for the list.

    The bake copies its base's VAE unchanged (a converted VAE with NaN/inf stops the bake), so checking
    the base beside the bake tells the same as reading the VAE back from the output after it."""
    import concurrent.futures

    ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lorakit-vae-check")
    fut = ex.submit(nonfinite_vae, path)
    ex.shutdown(wait=False)
    return fut.result


def warn_nonfinite_vae(report: dict[str, Any], source: str, bad: list[str]) -> None:
    """Add a warning to ``report`` when the VAE copied from ``source`` holds NaN/inf values (``bad``:
    what :func:`nonfinite_vae` found)."""
    if bad:
        report.setdefault("warnings", []).append(
            f"the VAE copied from {source} holds NaN/inf values in {len(bad)} tensor(s) ({'; '.join(bad[:3])}): "
            "images decoded with it will be black or broken. lorakit copies the VAE unchanged; use another VAE "
            "(the WebUI's VAE setting) or a checkpoint with a working one."
        )
