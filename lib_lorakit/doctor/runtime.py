"""The precision a WebUI applies LoRAs in at runtime, from its engine and command-line flags.

A runtime LoRA is added to the weights as the host stores them. Where the host keeps a part of the
model in fp16, the patched weights are rounded there just as an fp16 bake rounds them, so an fp32
bake cannot render closer to the runtime recipe, and the doctor's fp32 variant cannot show a
precision loss. Measured live (tests/integration/test_live_doctor.py): Forge on CPU keeps the text
encoder in fp16 unless started with ``--clip-in-fp32`` (its ``text_encoder_dtype``), and a LoRA
whose fp16 bake diverges on A1111 with ``--no-half`` rendered identical baked and at runtime there.
"""

from __future__ import annotations

from typing import Any

FP32 = "fp32"


def runtime_precision(engine: str, flags: dict[str, Any] | None) -> dict[str, str] | None:
    """{"engine", "text_encoder", "unet", "hint"} from the host's flags; None when they are unknown."""
    if not flags:
        return None
    f = {str(k): v for k, v in flags.items()}
    if engine == "forge":
        if f.get("all_in_fp32"):
            te = unet = FP32
        else:
            te = (
                FP32
                if f.get("clip_in_fp32")
                else "fp8"
                if f.get("clip_in_fp8_e4m3fn") or f.get("clip_in_fp8_e5m2")
                else "fp16"
            )
            if f.get("unet_in_bf16"):
                unet = "bf16"
            elif f.get("unet_in_fp16") or f.get("all_in_fp16"):
                unet = "fp16"
            elif f.get("unet_in_fp8_e4m3fn") or f.get("unet_in_fp8_e5m2"):
                unet = "fp8"
            else:
                unet = FP32 if f.get("always_cpu") else "fp16 or bf16 (GPU)"
        hint = "start Forge with --clip-in-fp32 (text encoder) or --all-in-fp32 to compare in fp32"
    else:
        full = bool(f.get("no_half")) or f.get("precision") == "full"
        te = unet = FP32 if full else "fp16"
        hint = "start the WebUI with --no-half to compare in fp32"
    return {"engine": engine, "text_encoder": te, "unet": unet, "hint": hint}


def precision_warning(prec: dict[str, str] | None, fp32_variant: bool) -> str | None:
    """A line for the report when the host's runtime itself rounds below fp32 and the fp32 variant runs."""
    if not prec or not fp32_variant:
        return None
    low = [
        f"the {part} in {prec[key]}"
        for part, key in (("text encoder", "text_encoder"), ("UNet", "unet"))
        if prec[key] != FP32
    ]
    if not low:
        return None
    host = {"forge": "Forge", "a1111": "A1111"}.get(prec["engine"], prec["engine"] or "WebUI")
    return (
        f"This {host} keeps {' and '.join(low)} at runtime: it rounds the LoRAs there as a reduced-"
        f"precision bake does, so the fp32 variant cannot restore parity for those parts ({prec['hint']})."
    )
