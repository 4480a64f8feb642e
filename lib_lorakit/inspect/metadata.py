"""Training facts from a LoRA's metadata: kohya ``ss_*`` fields, modelspec, and sidecar files.

kohya's trainers write every value as a string, some of them JSON (``ss_tag_frequency``,
``ss_dataset_dirs``, ``ss_datasets``, ``ss_network_args``, ``ss_bucket_info``). Values
that do not parse become warnings naming the field; they never stop the inspection.

Tag counts: kohya counts, per image folder (its base name, e.g. ``10_mychar``), how many
captions carry each comma-separated tag, lower-cased, in the order first met — so a
folder's first tags are the first caption's first tags. Image counts per folder come
from ``ss_dataset_dirs`` (``{"10_mychar": {"n_repeats": 10, "img_count": 25}}``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .tags import emphasis_in, normalise_tag

# (field, label, kind) in the order the report shows them
TRAINING_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("ss_output_name", "output name", "str"),
    ("ss_sd_model_name", "base model", "str"),
    ("ss_base_model_version", "base model version", "str"),
    ("ss_network_module", "network module", "str"),
    ("ss_network_dim", "network dim (rank)", "str"),
    ("ss_network_alpha", "network alpha", "str"),
    ("ss_network_args", "network args", "json"),
    ("ss_num_epochs", "epochs", "int"),
    ("ss_epoch", "saved at epoch", "int"),
    ("ss_steps", "steps", "int"),
    ("ss_max_train_steps", "max train steps", "int"),
    ("ss_num_train_images", "training images (with repeats)", "int"),
    ("ss_num_reg_images", "regularisation images", "int"),
    ("ss_batch_size_per_device", "batch size", "int"),
    ("ss_total_batch_size", "total batch size", "int"),
    ("ss_learning_rate", "learning rate", "float"),
    ("ss_unet_lr", "UNet learning rate", "float"),
    ("ss_text_encoder_lr", "text encoder learning rate", "float"),
    ("ss_optimizer", "optimizer", "str"),
    ("ss_lr_scheduler", "LR scheduler", "str"),
    ("ss_resolution", "resolution", "str"),
    ("ss_mixed_precision", "precision", "str"),
    ("ss_clip_skip", "clip skip", "str"),
    ("ss_keep_tokens", "keep_tokens", "int"),
    ("ss_shuffle_caption", "shuffle captions", "str"),
    ("ss_caption_dropout_rate", "caption dropout", "float"),
    ("ss_caption_tag_dropout_rate", "caption tag dropout", "float"),
    ("ss_caption_dropout_every_n_epochs", "caption dropout every n epochs", "int"),
    ("ss_noise_offset", "noise offset", "float"),
    ("ss_min_snr_gamma", "min SNR gamma", "float"),
    ("ss_v2", "SD2", "str"),
    ("ss_v_parameterization", "v-parameterization", "str"),
    ("ss_seed", "seed", "int"),
    ("ss_training_started_at", "started", "time"),
    ("ss_training_finished_at", "finished", "time"),
    ("ss_training_comment", "comment", "str"),
    ("ss_sd_scripts_commit_hash", "sd-scripts commit", "str"),
)
MODELSPEC_FIELDS = (
    "title",
    "author",
    "description",
    "architecture",
    "implementation",
    "date",
    "resolution",
    "prediction_type",
    "trigger_phrase",
    "usage_hint",
    "tags",
    "license",
    "merged_from",
)


@dataclass
class Folder:
    """One training image folder as kohya recorded it."""

    name: str
    images: int | None = None
    repeats: int | None = None
    tags: dict[str, int] = field(default_factory=dict)  # in kohya's order (first caption first)
    class_tokens: str | None = None  # DreamBooth-style: from the folder name or the dataset config
    keep_tokens: int | None = None
    is_reg: bool = False

    def as_dict(self) -> dict[str, Any]:
        top = sorted(self.tags.items(), key=lambda kv: -kv[1])
        n = self.images
        return {
            "name": self.name,
            "images": n,
            "repeats": self.repeats,
            "class_tokens": self.class_tokens,
            "keep_tokens": self.keep_tokens,
            "is_reg": self.is_reg,
            "distinct_tags": len(self.tags),
            "tags": [{"tag": t, "count": c, "share": round(c / n, 3) if n else None} for t, c in top],
        }


@dataclass
class Training:
    """What the metadata says about how a LoRA was made."""

    trainer: str  # "kohya sd-scripts", "LyCORIS", "diffusers/PEFT", "unknown"
    fields: list[tuple[str, str, Any]] = field(default_factory=list)  # (field, label, value) present in the file
    modelspec: dict[str, str] = field(default_factory=dict)
    network_args: dict[str, Any] = field(default_factory=dict)
    folders: list[Folder] = field(default_factory=list)
    keep_tokens: int = 0
    declared_triggers: list[tuple[str, str]] = field(default_factory=list)  # (trigger, where it was declared)
    warnings: list[str] = field(default_factory=list)
    spellings: dict[str, str] = field(default_factory=dict)  # counted form -> the most frequent form as written
    emphasis: list[tuple[str, int]] = field(default_factory=list)  # caption tags written with (emphasis:1.2), count

    def written(self, tag: str | None) -> str | None:
        """A counted tag as the captions wrote it (what a prompt must repeat to hit the trained token)."""
        return self.spellings.get(tag, tag) if tag else tag

    @property
    def images(self) -> int | None:
        counts = [f.images for f in self.folders if not f.is_reg]
        return sum(counts) if counts and all(c is not None for c in counts) else None

    def value(self, name: str) -> Any:
        for f, _, v in self.fields:
            if f == name:
                return v
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "trainer": self.trainer,
            "fields": {f: v for f, _, v in self.fields},
            "modelspec": self.modelspec,
            "network_args": self.network_args,
            "keep_tokens": self.keep_tokens,
            "images": self.images,
            "folders": [f.as_dict() for f in self.folders],
            "declared_triggers": [{"trigger": t, "source": s} for t, s in self.declared_triggers],
        }


_FOLDER = re.compile(r"^(\d+)_(.+)$")


def _json(meta: Mapping[str, str], key: str, warnings: list[str], want: type) -> Any:
    raw = meta.get(key)
    if raw is None or raw == "" or raw == "None":
        return None
    try:
        v = json.loads(raw)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        warnings.append(
            f"metadata field {key} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); its contents were ignored."
        )
        return None
    if not isinstance(v, want):
        warnings.append(f"metadata field {key} holds a {type(v).__name__}, expected a {want.__name__}; ignored.")
        return None
    return v


def _number(raw: str, kind: str) -> Any:
    try:
        if kind == "int":
            return int(float(raw))
        if kind == "float":
            v = float(raw)
            return v if math.isfinite(v) else raw
        if kind == "time":
            return datetime.fromtimestamp(float(raw), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (ValueError, OverflowError, OSError):
        return raw
    return raw


@functools.lru_cache(maxsize=1 << 16)
def _tag_forms(tag: str) -> tuple[str, bool, str]:
    """A caption tag stripped, whether it carries emphasis, and the form counted (tags repeat across files)."""
    t = tag.strip()
    return (t, emphasis_in(t), normalise_tag(t)) if t else ("", False, "")


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None and not isinstance(v, bool) else None
    except (TypeError, ValueError):
        return None


def read_training(meta: Mapping[str, str], path: str = "") -> Training:
    """Parse the training metadata of a LoRA file (never raises on bad values)."""
    warnings: list[str] = []
    has_ss = any(k.startswith("ss_") for k in meta)
    module = meta.get("ss_network_module", "")
    trainer = (
        ("LyCORIS (kohya sd-scripts)" if "lycoris" in module else "kohya sd-scripts")
        if has_ss
        else ("LyCORIS" if any(k.startswith("lycoris") for k in meta) else "unknown")
    )
    tr = Training(trainer=trainer, warnings=warnings)
    for key, label, kind in TRAINING_FIELDS:
        raw = meta.get(key)
        if raw is None or raw in ("", "None"):
            continue
        if kind == "json":
            continue
        tr.fields.append((key, label, _number(raw, kind) if kind != "str" else raw))
    tr.modelspec = {k: meta[f"modelspec.{k}"] for k in MODELSPEC_FIELDS if meta.get(f"modelspec.{k}")}
    if meta.get("modelspec.sai_model_spec") and tr.trainer == "unknown":
        tr.trainer = "modelspec-aware trainer"

    args = _json(meta, "ss_network_args", warnings, dict)
    tr.network_args = args or {}

    dirs = _json(meta, "ss_dataset_dirs", warnings, dict) or {}
    reg_dirs = _json(meta, "ss_reg_dataset_dirs", warnings, dict) or {}
    freq = _json(meta, "ss_tag_frequency", warnings, dict) or {}
    datasets = _json(meta, "ss_datasets", warnings, list) or []

    keep = _int(meta.get("ss_keep_tokens")) if meta.get("ss_keep_tokens") not in (None, "", "None") else None
    if keep is None and meta.get("ss_keep_tokens") not in (None, "", "None"):
        warnings.append(f"metadata field ss_keep_tokens = {meta['ss_keep_tokens']!r} is not a number; ignored.")
    subsets: dict[str, dict] = {}
    for ds in datasets:
        if not isinstance(ds, dict):
            continue
        for sub in ds.get("subsets") or []:
            if isinstance(sub, dict) and isinstance(sub.get("image_dir"), str):
                subsets.setdefault(sub["image_dir"], sub)
                k = _int(sub.get("keep_tokens"))
                if k is not None:
                    keep = max(keep or 0, k)

    names = list(dict.fromkeys([*dirs, *freq]))
    spelled: dict[tuple[str, str], int] = {}
    for name in names:
        info = dirs.get(name) if isinstance(dirs.get(name), dict) else {}
        tags = freq.get(name)
        if tags is not None and not isinstance(tags, dict):
            warnings.append(f"ss_tag_frequency[{name!r}] is a {type(tags).__name__}, expected tag counts; ignored.")
            tags = None
        clean: dict[str, int] = {}
        for t, c in (tags or {}).items():
            n = _int(c)
            if n is None or n < 0 or not isinstance(t, str):
                warnings.append(f"ss_tag_frequency[{name!r}][{t!r}] = {c!r} is not a count; ignored.")
                continue
            t, emphasis, key = _tag_forms(t)  # blue_hair, blue hair and (blue hair:1.2) count as one tag
            if not t:
                continue
            if emphasis:
                tr.emphasis.append((t, n))
            if not key:
                continue
            clean[key] = clean.get(key, 0) + n
            spelled[(key, t)] = spelled.get((key, t), 0) + n
        f = Folder(name=name, images=_int(info.get("img_count")), repeats=_int(info.get("n_repeats")), tags=clean)
        sub = subsets.get(name) or subsets.get(re.sub(r" \(\d+\)$", "", name))
        if sub is not None:
            ct = sub.get("class_tokens")
            f.class_tokens = ct.strip() if isinstance(ct, str) and ct.strip() else None
            f.keep_tokens = _int(sub.get("keep_tokens"))
            f.is_reg = bool(sub.get("is_reg"))
        m = _FOLDER.match(name)
        if m:
            f.repeats = f.repeats if f.repeats is not None else int(m.group(1))
            if f.class_tokens is None and sub is None:
                f.class_tokens = m.group(2).strip()
        tr.folders.append(f)
    for name, info in reg_dirs.items():
        if isinstance(info, dict):
            tr.folders.append(
                Folder(name=name, images=_int(info.get("img_count")), repeats=_int(info.get("n_repeats")), is_reg=True)
            )
    tr.keep_tokens = keep or 0
    for (key, raw), n in sorted(spelled.items(), key=lambda kv: -kv[1]):
        tr.spellings.setdefault(key, raw.strip())

    declared = []
    if tr.modelspec.get("trigger_phrase"):
        declared.append((tr.modelspec["trigger_phrase"].strip(), "modelspec.trigger_phrase"))
    declared.extend(_sidecar_triggers(path))
    tr.declared_triggers = [(t, s) for t, s in declared if t]
    return tr


def _sidecar_triggers(path: str) -> list[tuple[str, str]]:
    """Triggers written beside the LoRA: the WebUI's ``<name>.json`` and Civitai's ``<name>.civitai.info``."""
    if not path:
        return []
    stem = os.path.splitext(path)[0]
    out: list[tuple[str, str]] = []
    for side, fieldname in ((stem + ".json", "activation text"), (stem + ".civitai.info", "trainedWords")):
        try:
            if os.path.getsize(side) > 4 << 20:
                continue
            with open(side, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        v = data.get(fieldname) if isinstance(data, dict) else None
        if isinstance(v, str) and v.strip():
            out.append((v.strip(), f"{os.path.basename(side)} ({fieldname})"))
        elif isinstance(v, list):
            words = [w.strip() for w in v if isinstance(w, str) and w.strip()]
            if words:
                out.append((", ".join(words), f"{os.path.basename(side)} ({fieldname})"))
    return out
