"""Clean a checkpoint before release: safe conversion, pruning, repairs, VAE swap, scan, hashes, metadata.

- ``.ckpt``/``.pt`` are read with ``torch.load(weights_only=True)`` only: a pickle that holds
  anything but tensors and plain containers is refused, and no code in it ever runs.
- Kept: the model's own weights (UNet, VAE, text encoders, the layout's schedule buffers).
  Dropped and listed: EMA copies (``model_ema.*``), optimizer/scheduler state and any other
  non-model entry (training step, callbacks, loss weights, stray keys).
- CLIP ``position_ids`` are repaired to the integer arange (see :mod:`lib_lorakit.formats.position_ids`).
- ``save``: fp16, bf16, fp32, or keep each tensor's dtype. Integer tensors are never converted.
- ``vae``: the VAE comes from a VAE file (``encoder.*``/``decoder.*``, with or without
  ``first_stage_model.``) or from another checkpoint, copied byte for byte (its own dtype).
- Every float tensor is scanned for NaN/Inf (and for values the save dtype turns into inf).
- The output's hashes (:func:`.hashes.file_hashes`) are in the report.
- Metadata: modelspec title/author/description, trigger words (``modelspec.trigger_phrase``), a
  preferred weight (``lorakit.preferred_weight``); training metadata (``ss_*``, ``sshs_*``) stripped on
  request.

Tensors that need no change are copied byte for byte; the output is written like every lorakit
file (temporary file, then rename; never over an input).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping

import torch

from ..errors import FormatError, RecipeError, ValueProblem
from ..formats.arch import ARCHS, detect_checkpoint, load_layout, load_optional
from ..formats.position_ids import check_position_ids, is_position_ids_key, repaired_position_ids
from ..formats.safetensors_io import TORCH_TO_CODE, OutEntry, StreamingWriter
from ..formats.sources import PICKLE_EXTS, DictSource, TensorSource, _load_pickle, open_source
from ..streaming import peak_rss_mb
from .common import Cancel, Progress, check_cancel, check_output, no_progress
from .hashes import file_hashes

MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
SAVE = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
META_FIELDS = {
    "title": "modelspec.title",
    "author": "modelspec.author",
    "description": "modelspec.description",
    "trigger_words": "modelspec.trigger_phrase",
    "preferred_weight": "lorakit.preferred_weight",
}
TRAINING_PREFIXES = ("ss_", "sshs_")
FLOAT_MAX = {torch.float16: 65504.0, torch.bfloat16: 3.3895e38, torch.float32: 3.4028e38}


def _open_checkpoint(path: str) -> tuple[TensorSource, list[dict]]:
    """Open ``path``; for pickles also list the top-level entries that are not model weights."""
    dropped: list[dict] = []
    if os.path.splitext(path)[1].lower() not in PICKLE_EXTS:
        return open_source(path), dropped
    if not os.path.isfile(path):
        raise FormatError(f"{path}: file not found.", fix="Check the path and the file name.")
    obj = _load_pickle(path)  # weights_only=True: refuses anything that is not tensors and containers
    if not isinstance(obj, Mapping):
        raise FormatError(
            f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors.",
            fix="Give a checkpoint saved as a state dict.",
        )
    sd = obj
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = obj["state_dict"]
        for k in obj:
            if k != "state_dict":
                dropped.append(
                    {
                        "key": str(k),
                        "reason": "training state beside the state dict"
                        if k
                        in (
                            "optimizer_states",
                            "lr_schedulers",
                            "callbacks",
                            "global_step",
                            "epoch",
                            "pytorch-lightning_version",
                            "loops",
                            "hparams_name",
                            "hyper_parameters",
                        )
                        else "not part of the state dict",
                    }
                )
    tensors = {}
    for k, v in sd.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            tensors[k] = v
        else:
            dropped.append({"key": str(k), "reason": f"not a tensor ({type(v).__name__})"})
    return DictSource(tensors, path=path), dropped


def _vae_source(path: str, wanted: Mapping[str, tuple[int, ...]]) -> tuple[TensorSource, dict[str, str]]:
    """Open a VAE file or checkpoint; map each checkpoint VAE key to the key in ``path``."""
    src, _ = _open_checkpoint(path)
    keys = src.keys()
    has_prefix = any(k.startswith(VAE_PREFIX) for k in keys)
    names = {}
    for k in keys:
        if has_prefix:
            if k.startswith(VAE_PREFIX):
                names[k] = k
        elif not k.startswith(("loss.", "model_ema.")):
            names[VAE_PREFIX + k] = k
    missing = [k for k in wanted if k not in names]
    if missing:
        src.close()
        raise FormatError(
            f"{path}: has no VAE tensor for {len(missing)} of the checkpoint's {len(wanted)} VAE keys "
            f"(first: {missing[0]!r}).",
            fix="Give a VAE of the checkpoint's family (an SD1.5 or SDXL "
            "VAE file, or a checkpoint whose VAE you want).",
        )
    for k in wanted:
        if tuple(src.shape(names[k])) != tuple(wanted[k]):
            src.close()
            raise FormatError(
                f"{path}: VAE tensor {names[k]!r} has shape {list(src.shape(names[k]))}, the checkpoint "
                f"needs {list(wanted[k])}.",
                fix="Give a VAE of the checkpoint's family.",
            )
    return src, names


def _scan(t: torch.Tensor) -> tuple[int, int]:
    if not t.is_floating_point():
        return 0, 0
    f = t if t.dtype in (torch.float32, torch.float64) else t.float()
    nan = int(torch.isnan(f).sum())
    inf = int(torch.isinf(f).sum())
    return nan, inf


def clean(
    checkpoint: str,
    output: str | None,
    *,
    drop_ema: bool = True,
    drop_other: bool = True,
    repair_position_ids: bool = True,
    save: str = "keep",
    vae: str | None = None,
    title: str | None = None,
    author: str | None = None,
    description: str | None = None,
    trigger_words: str | None = None,
    preferred_weight: float | None = None,
    strip_training: bool = False,
    scan: bool = True,
    hashes: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> dict:
    """Write a cleaned copy of ``checkpoint`` to ``output`` (safetensors) and report what changed.

    Args:
        drop_ema: drop ``model_ema.*`` copies.
        drop_other: drop keys that are not model weights (optimizer, loss, stray keys).
        repair_position_ids: write CLIP ``position_ids`` as the int64 arange.
        save: fp16, bf16, fp32 or keep.
        vae: a VAE file or another checkpoint whose VAE replaces this one's.
        title, author, description, trigger_words, preferred_weight: metadata to set.
        strip_training: drop kohya training metadata (``ss_*``, ``sshs_*``).
        output: None reports without writing.

    Returns:
        The report: kept/dropped keys (with reasons), repairs, NaN/Inf per tensor, dtype, hashes.
    """
    t0 = time.perf_counter()
    say = progress or no_progress
    if save not in SAVE:
        raise RecipeError(f"Unknown save dtype {save!r}.", fix=f"Use one of {', '.join(SAVE)}.")
    if preferred_weight is not None and not (
        isinstance(preferred_weight, (int, float)) and math.isfinite(preferred_weight) and -4 <= preferred_weight <= 4
    ):
        raise RecipeError(
            f"Preferred weight {preferred_weight!r} is not a number from -4 to 4.", fix="Give a weight such as 0.8."
        )
    if output is not None:
        output = check_output(output, [checkpoint] + ([vae] if vae else []), overwrite)
    src, dropped = _open_checkpoint(checkpoint)
    vsrc = None
    try:
        keys = src.keys()
        model_keys = [k for k in keys if not k.startswith(EMA_PREFIX)]
        fam = detect_checkpoint({k: src.shape(k) for k in model_keys}, src.metadata, checkpoint)
        arch = fam.arch if fam.arch in ARCHS else None
        known = set(load_layout(ARCHS[arch].layout)) | set(load_optional(ARCHS[arch].layout)) if arch else set()
        keep: list[str] = []
        for k in keys:
            if k.startswith(EMA_PREFIX):
                if drop_ema:
                    dropped.append({"key": k, "reason": "EMA copy"})
                    continue
            elif not (k.startswith(MODEL_PREFIXES) or k in known):
                if drop_other:
                    dropped.append({"key": k, "reason": "not a model weight"})
                    continue
            keep.append(k)
        vae_keys = {k: src.shape(k) for k in keep if k.startswith(VAE_PREFIX)}
        vae_names: dict[str, str] = {}
        if vae:
            if not vae_keys:
                raise FormatError(
                    f"{checkpoint}: has no VAE (first_stage_model.*) to replace.", fix="Give a full checkpoint."
                )
            vsrc, vae_names = _vae_source(vae, vae_keys)
        target = SAVE[save]
        entries: list[OutEntry] = []
        plan: list[tuple[str, str]] = []  # (key, how): raw / vae / convert / repair
        repairs: list[dict] = []
        for k in keep:
            code = src.dtype(k)
            if k in vae_names:
                entries.append(OutEntry(k, vsrc.dtype(vae_names[k]), tuple(vsrc.shape(vae_names[k]))))
                plan.append((k, "vae"))
                continue
            if repair_position_ids and is_position_ids_key(k):
                t = src.read(k)
                why = check_position_ids(t)
                if why:
                    repairs.append({"key": k, "problem": why})
                    entries.append(OutEntry(k, "I64", tuple(t.shape)))
                    plan.append((k, "repair"))
                    continue
            is_float = code in ("F64", "F32", "F16", "BF16")
            if target is not None and is_float and code != TORCH_TO_CODE[target]:
                entries.append(OutEntry(k, TORCH_TO_CODE[target], tuple(src.shape(k))))
                plan.append((k, "convert"))
            else:
                entries.append(OutEntry(k, code, tuple(src.shape(k))))
                plan.append((k, "raw"))
        meta = {k: v for k, v in src.metadata.items() if not (strip_training and k.startswith(TRAINING_PREFIXES))}
        stripped = sorted(set(src.metadata) - set(meta))
        for name, value in (
            ("title", title),
            ("author", author),
            ("description", description),
            ("trigger_words", trigger_words),
            ("preferred_weight", preferred_weight),
        ):
            if value is not None:
                meta[META_FIELDS[name]] = f"{value:g}" if isinstance(value, float) else str(value)
        meta.pop("modelspec.hash_sha256", None)  # stale once anything changes
        nonfinite: list[dict] = []
        overflow: list[dict] = []
        total = len(plan)
        say(0, total, "cleaning")
        writer = StreamingWriter(output, entries, meta, overwrite=overwrite) if output is not None else None
        try:
            for i, (k, how) in enumerate(plan):
                check_cancel(cancel, "Clean-up")
                if how == "vae":
                    if writer is not None:
                        span = vsrc.raw_span(vae_names[k]) if hasattr(vsrc, "raw_span") else None
                        t = vsrc.read(vae_names[k])
                        if scan:
                            nan, inf = _scan(t)
                            if nan or inf:
                                nonfinite.append({"key": k, "nan": nan, "inf": inf, "source": vae})
                        if span is not None:
                            writer.copy_range(k, span[0], span[1], span[2])
                        else:
                            writer.write(k, t.contiguous())
                    continue
                if how == "raw" and not scan:
                    if writer is not None and src.raw_span(k) is not None:
                        writer.copy_range(k, *src.raw_span(k))
                        continue
                t = src.read(k)
                if scan:
                    nan, inf = _scan(t)
                    if nan or inf:
                        nonfinite.append({"key": k, "nan": nan, "inf": inf})
                if how == "repair":
                    t = repaired_position_ids(t)
                elif how == "convert":
                    before = t
                    t = t.to(target)
                    if scan and target in FLOAT_MAX and t.dtype != before.dtype:
                        n_over = int((torch.isinf(t) & torch.isfinite(before)).sum())
                        if n_over:
                            overflow.append({"key": k, "values": n_over, "dtype": save})
                if writer is not None:
                    span = src.raw_span(k) if how == "raw" else None
                    if span is not None:
                        writer.copy_range(k, span[0], span[1], span[2])
                    else:
                        writer.write(k, t.contiguous())
                say(i + 1, total, k)
            if writer is not None:
                writer.commit()
        finally:
            if writer is not None:
                writer.abort()
        report = {
            "checkpoint": os.fspath(checkpoint),
            "output": output,
            "arch": arch,
            "kept": len(plan),
            "dropped": dropped,
            "position_ids": repairs,
            "nonfinite": nonfinite,
            "overflow": overflow,
            "save": save,
            "vae": vae,
            "vae_tensors": len(vae_names),
            "metadata": meta,
            "metadata_stripped": stripped,
        }
        if output is not None and hashes:
            say(total, total, "hashing")
            report["hashes"] = file_hashes(output)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report["peak_rss_mb"] = peak_rss_mb()
        say(total, total, "done")
        return report
    finally:
        src.close()
        if vsrc is not None:
            vsrc.close()


def check_finite(report: dict) -> None:
    """Raise ValueProblem when the clean-up report lists NaN/Inf tensors (for callers that refuse them)."""
    if report["nonfinite"]:
        first = report["nonfinite"][0]
        raise ValueProblem(
            f"{len(report['nonfinite'])} tensors hold NaN/Inf values (first: {first['key']}: "
            f"{first['nan']} NaN, {first['inf']} Inf).",
            fix="Use an earlier, healthy save of the model; NaN weights give black images.",
        )


def summary(report: dict) -> str:
    lines = [
        f"kept {report['kept']} tensors, dropped {len(report['dropped'])}"
        + (f" (e.g. {report['dropped'][0]['key']}: {report['dropped'][0]['reason']})" if report["dropped"] else "")
    ]
    for r in report["position_ids"]:
        lines.append(f"repaired {r['key']}: it {r['problem']}")
    if report["vae"]:
        lines.append(f"VAE replaced from {report['vae']} ({report['vae_tensors']} tensors, copied byte for byte)")
    for n in report["nonfinite"][:10]:
        lines.append(f"NaN/Inf in {n['key']}: {n['nan']} NaN, {n['inf']} Inf")
    for o in report["overflow"][:10]:
        lines.append(f"{o['key']}: {o['values']} values overflow {o['dtype']} (become inf)")
    if not report["nonfinite"]:
        lines.append("no NaN/Inf values")
    h = report.get("hashes")
    if h:
        lines.append(
            f"sha256 {h['sha256']}  short {h['shorthash']}  legacy {h['legacy']}"
            + (f"  addnet {h['addnet_short']}" if "addnet" in h else "")
        )
    if report.get("output"):
        lines.append(f"-> {report['output']} in {report['seconds']} s")
    return "\n".join(lines)
