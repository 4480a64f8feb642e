"""What the workshop operations share: callbacks, devices, dtypes, outputs, block filters, metadata."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable

import torch

from .. import __version__
from ..errors import Cancelled, RecipeError
from ..formats.arch import ARCHS
from ..formats.safetensors_io import check_output_path

Progress = Callable[[int, int, str], None]  # (done, total, text)
Cancel = Callable[[], bool]  # True once the caller wants the job stopped

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def no_progress(done: int, total: int, text: str) -> None:
    """The default progress callback: say nothing."""


def check_cancel(cancel: Cancel | None, what: str) -> None:
    if cancel is not None and cancel():
        raise Cancelled(f"{what} cancelled; nothing was written.")


def save_dtype(name: str) -> torch.dtype:
    if name not in SAVE_DTYPES:
        raise RecipeError(f"Unknown save dtype {name!r}.", fix=f"Use one of {', '.join(SAVE_DTYPES)}.")
    return SAVE_DTYPES[name]


def resolve_device(device: str | None) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` as given."""
    d = (device or "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError(
                f"Device {device!r} asked for, but this torch has no CUDA device.", fix="Use the cpu device (or auto)."
            )
        return torch.device(d)
    if d != "cpu":
        raise RecipeError(f"Unknown device {device!r}.", fix="Use auto, cpu or cuda.")
    return torch.device("cpu")


def check_output(output: str | None, inputs: Iterable[str], overwrite: bool) -> str:
    """Refuse a missing, non-.safetensors, existing (unless ``overwrite``) or input output path."""
    if not output:
        raise RecipeError("No output file given.", fix="Name the output .safetensors file.")
    if not str(output).lower().endswith(".safetensors"):
        raise RecipeError(
            f"The output {output} must end in .safetensors (lorakit always writes safetensors).",
            fix="Change the output file name's extension to .safetensors.",
        )
    check_output_path(output, overwrite=overwrite, inputs=list(inputs))
    return os.fspath(output)


def check_rank(rank: int | None, what: str = "rank", *, allow_zero: bool = False) -> None:
    if rank is None:
        return
    if not isinstance(rank, int) or rank < (0 if allow_zero else 1) or rank > 4096:
        raise RecipeError(
            f"The {what} {rank!r} is out of range.", fix=f"Give a whole number from {0 if allow_zero else 1} to 4096."
        )


def block_filter(spec: str | Iterable[str] | None, arch: str) -> set[str] | None:
    """Blocks/components to keep, or None for all.

    ``spec``: comma-separated component names (unet, te, te1, te2) and block ids (BASE, IN04, M00,
    OUT05, …; BASE = the text encoders).
    """
    if spec is None or spec == "" or spec == []:
        return None
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    blocks = set(ARCHS[arch].blocks)
    out: set[str] = set()
    for it in items:
        low, up = it.lower(), it.upper()
        if low in ("unet", "te1", "te2"):
            out.add(low)
        elif low == "te":
            out.update({"te1", "te2"})
        elif up in blocks or up == "MID":
            out.add("M00" if up == "MID" else up)
        else:
            from ..errors import did_you_mean

            raise RecipeError(
                f"Unknown block or component {it!r} for {ARCHS[arch].label}.{did_you_mean(up, sorted(blocks))}",
                fix=f"Use unet, te, te1, te2 or block ids: {', '.join(ARCHS[arch].blocks)}.",
            )
    return out


def keep_module(sel: set[str] | None, component: str, block: str | None) -> bool:
    if sel is None:
        return True
    return component in sel or (block is not None and block in sel)


def lora_modelspec(arch: str, title: str) -> dict[str, str]:
    """The modelspec fields kohya's ``sai_model_spec.build_metadata`` writes for a LoRA."""
    sdxl = arch == "sdxl"
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": "1024x1024" if sdxl else "512x512",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_network_module": "networks.lora",
        "lorakit.version": __version__,
    }
