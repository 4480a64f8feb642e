"""A review of the training settings a LoRA's metadata records: what explains a weak or overfit LoRA.

Each check looks at one thing kohya's trainers write (``ss_*``) against what the tensors
show, and speaks only when it finds something, in one line with the numbers. The rules
follow common trainer guidance: kohya sd-scripts' docs (network_dim/alpha, keep_tokens,
shuffle_caption), the Prodigy/D-Adaptation READMEs (adaptive optimizers take lr ≈ 1.0),
and the native resolutions of SD1.5 (512) and SDXL (1024).
"""

from __future__ import annotations

import re
from typing import Any

from .metadata import Training
from .structure import Structure

ADAPTIVE = re.compile(r"prodigy|dadapt|d-adapt|adafactor.*relative_step=true", re.I)
PASSES_HIGH = 300  # epochs × repeats: times each image was seen
PASSES_LOW = 10
IMBALANCE = 4.0  # steps of the largest folder / the smallest
ALPHA_HIGH = 1.0  # alpha/rank above this scales the update up
ALPHA_LOW = 1 / 32


def _f(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _resolution(v: Any) -> int | None:
    nums = [int(x) for x in re.findall(r"\d+", str(v or ""))]
    return max(nums) if nums else None


def review(tr: Training, st: Structure, trigger: str | None = None) -> list[dict[str, str]]:
    """Findings ``{check, text}`` about the recorded training settings; [] for a clean file.

    Args:
        tr: the parsed metadata.
        st: the structure read from the tensors (real rank and alpha).
        trigger: the trigger the inspector found (as counted), for the keep_tokens check.
    """
    out: list[dict[str, str]] = []

    def say(check: str, text: str) -> None:
        out.append({"check": check, "text": text})

    rank, alpha = st.main_rank(), st.main_alpha()
    dim = _f(tr.value("ss_network_dim"))
    if dim and rank and int(dim) != rank:
        say(
            "dim_vs_rank",
            f"ss_network_dim says {int(dim)} but the tensors have rank {rank}: the file was resized or "
            "its metadata is stale; the tensors are what counts.",
        )
    if alpha is not None and rank:
        r = alpha / rank
        if r > ALPHA_HIGH:
            say(
                "alpha_ratio",
                f"alpha {alpha:g} over rank {rank} scales every update ×{r:g}: strong and prone to "
                "overfitting at strength 1.",
            )
        elif r < ALPHA_LOW:
            say(
                "alpha_ratio",
                f"alpha {alpha:g} over rank {rank} scales every update ×{r:.3g}: without a much higher "
                "learning rate it learns little (a weak LoRA).",
            )
    opt = str(tr.value("ss_optimizer") or "")
    args = str(tr.value("ss_optimizer_args") or "")
    lr = _f(tr.value("ss_unet_lr")) or _f(tr.value("ss_learning_rate"))
    if opt and lr:
        if ADAPTIVE.search(opt + " " + args):
            if lr < 0.1:
                say(
                    "learning_rate",
                    f"{opt.split('.')[-1]} adapts its own step size and expects a learning rate near "
                    f"1.0; {lr:g} makes it train almost nothing.",
                )
        elif re.search(r"lion", opt, re.I) and lr > 3e-4:
            say(
                "learning_rate",
                f"Lion with learning rate {lr:g}: Lion wants 3-10× less than AdamW (about 1e-4 or "
                "lower); this overcooks.",
            )
        elif re.search(r"adam", opt, re.I) and lr > 1e-3:
            say(
                "learning_rate",
                f"{opt.split('.')[-1]} with learning rate {lr:g}: above 1e-3 a LoRA overcooks (1e-4 to 5e-4 is usual).",
            )
    folders = [f for f in tr.folders if not f.is_reg]
    epochs = tr.value("ss_num_epochs")
    if isinstance(epochs, int) and epochs > 0 and folders:
        reps = [f.repeats or 1 for f in folders]
        passes = epochs * max(reps)
        if passes > PASSES_HIGH:
            say(
                "epochs_repeats",
                f"{epochs} epochs × {max(reps)} repeats: each image was seen {passes} times, "
                "enough to memorise it (overfit likely; compare earlier epochs).",
            )
        elif passes < PASSES_LOW:
            say(
                "epochs_repeats",
                f"{epochs} epochs × {max(reps)} repeats: each image was seen only {passes} times "
                "(an undertrained, weak LoRA is likely).",
            )
    weighted = [(f.name, (f.images or 0) * (f.repeats or 1)) for f in folders if f.images]
    if len(weighted) >= 2:
        big, small = max(weighted, key=lambda x: x[1]), min(weighted, key=lambda x: x[1])
        if small[1] and big[1] / small[1] > IMBALANCE:
            say(
                "folder_imbalance",
                f"folder {big[0]!r} gives {big[1]} image steps per epoch, {small[0]!r} only "
                f"{small[1]} ({big[1] / small[1]:.1f}×): the small concept is underlearned; "
                "balance them with repeats.",
            )
    shuffle = str(tr.value("ss_shuffle_caption") or "").lower() == "true"
    if trigger:
        first = [next(iter(f.tags), None) for f in folders if f.tags]
        if shuffle and tr.keep_tokens < 1:
            say(
                "keep_tokens",
                f"captions were shuffled with keep_tokens = 0, so the trigger {tr.written(trigger)!r} "
                "moved around every step; it binds weakly (set keep_tokens = 1 with the trigger first).",
            )
        elif tr.keep_tokens >= 1 and first and trigger not in first:
            say(
                "keep_tokens",
                f"keep_tokens = {tr.keep_tokens} pinned {tr.written(first[0])!r}, not the trigger "
                f"{tr.written(trigger)!r}: put the trigger first in the captions.",
            )
    if tr.emphasis:
        shown = ", ".join(t for t, _ in tr.emphasis[:3])
        n = sum(c for _, c in tr.emphasis)
        say(
            "caption_emphasis",
            f"captions contain prompt emphasis ({shown}; {n} time(s)): the trainer reads the "
            "brackets and weights as text, so the LoRA learned those characters as tokens.",
        )
    res = _resolution(tr.value("ss_resolution"))
    if res and st.arch == "sdxl" and res < 768:
        say(
            "resolution",
            f"trained at {res} px for SDXL, whose native size is 1024: expect soft, low-detail images at SDXL sizes.",
        )
    elif res and st.arch == "sd15" and res > 768:
        say(
            "resolution",
            f"trained at {res} px for SD1.5, whose native size is 512: slow and often worse composition at 512.",
        )
    return out
