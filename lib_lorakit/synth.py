"""Synthetic models with real key layouts and random values: demo, tests, benchmarks.

Checkpoints follow the shipped layouts exactly (key names, order, dtypes); ``tiny``
divides every width that is a multiple of 64 by 64 (320 -> 5, 768 -> 12, 1280 -> 20),
which keeps every relation between shapes (concatenations, fused q/k/v, GEGLU) intact.
``tiny`` may also be another divisor (8, 16, 32) for mid-sized inputs; False is full size.
LoRAs are built in kohya's naming for the modules kohya's ``networks/lora.py`` trains.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import torch

from .formats.arch import ARCHS, load_layout
from .formats.safetensors_io import TORCH_TO_CODE, OutEntry, StreamingWriter, save_file
from .networks.resolve import unet_ldm_to_diffusers

SHRINK = 64
_DT = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def tiny_shape(shape: tuple[int, ...], factor: int | bool = SHRINK) -> tuple[int, ...]:
    if factor is True:
        factor = SHRINK
    if not factor or factor == 1:
        return tuple(shape)
    return tuple(d // factor if d >= 64 and d % 64 == 0 else d for d in shape)


def checkpoint_entries(
    arch: str, *, tiny: bool | int = True, dtype: torch.dtype = torch.float16
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    out = []
    for key, (shape, dt) in load_layout(ARCHS[arch].layout).items():
        s = tiny_shape(shape, tiny)
        out.append((key, s, torch.int64 if dt == "int64" else dtype))
    return out


def _value(key: str, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.int64:
        return torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    if re.search(r"(norm|ln_\d|ln_final|layer_norm\d?|in_layers\.0|out_layers\.0|norm_out|out\.0)\.weight$", key):
        t = 1.0 + 0.1 * torch.randn(shape, generator=g)
    elif key.endswith("logit_scale"):
        t = torch.full(shape, 4.6052)
    else:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        t = torch.randn(shape, generator=g) * (1.0 / math.sqrt(max(fan_in, 1)) if len(shape) > 1 else 0.02)
    return t.to(dtype)


def iter_checkpoint(
    arch: str, *, tiny: bool | int = True, dtype: torch.dtype = torch.float16, seed: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    for key, shape, dt in checkpoint_entries(arch, tiny=tiny, dtype=dtype):
        yield key, _value(key, shape, dt, g)


def write_checkpoint(
    path: str,
    arch: str,
    *,
    tiny: bool | int = True,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    extra: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write a random checkpoint with the real layout, one tensor at a time (flat memory)."""
    entries = [OutEntry(k, TORCH_TO_CODE[dt], s) for k, s, dt in checkpoint_entries(arch, tiny=tiny, dtype=dtype)]
    extra = extra or {}
    entries += [OutEntry(k, TORCH_TO_CODE[v.dtype], tuple(v.shape)) for k, v in extra.items()]
    with StreamingWriter(path, entries, metadata, overwrite=overwrite) as w:
        for key, t in iter_checkpoint(arch, tiny=tiny, dtype=dtype, seed=seed):
            w.write(key, t)
        for key, t in extra.items():
            w.write(key, t)
        return w.commit()


# --- kohya LoRA module sets ----------------------------------------------------------------

_ATTN = re.compile(r"\.(attn[12]\.to_(?:q|k|v|out\.0)|ff\.net\.(?:0\.proj|2)|proj_in|proj_out)\.weight$")
_CONV = re.compile(r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)\.weight$")
_TE = re.compile(r"\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.weight$")


def kohya_modules(
    arch: str, *, conv: bool = True, te: bool = True, tiny: bool | int = True
) -> list[tuple[str, tuple[int, ...], str, tuple[int, int] | None]]:
    """(kohya module name, target shape, checkpoint key, row slice) for the modules kohya's LoRA trains.

    SD1.x UNet names are diffusers-style (``lora_unet_down_blocks_0_attentions_0_proj_in``),
    SDXL names ldm-style (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``),
    text encoders ``lora_te_`` (SD1) or ``lora_te1_``/``lora_te2_`` (SDXL, HF CLIP names).
    """
    a = ARCHS[arch]
    layout = load_layout(a.layout)
    out: list[tuple[str, tuple[int, ...], str, tuple[int, int] | None]] = []
    up = "model.diffusion_model."
    for key, (shape, _) in layout.items():
        s = tiny_shape(shape, tiny)
        if key.startswith(up):
            rel = key[len(up) : -len(".weight")]
            is_attn = bool(_ATTN.search(key))
            is_conv = (
                bool(_CONV.search(key))
                and ("input_blocks" in key or "middle_block" in key or "output_blocks" in key)
                and not key.startswith(up + "input_blocks.0.")
            )
            if not (is_attn or (conv and is_conv)):
                continue
            name = unet_ldm_to_diffusers(rel) if arch == "sd15" else rel
            out.append(("lora_unet_" + name.replace(".", "_"), s, key, None))
        elif te and key.startswith(a.prefixes["te1"]) and _TE.search(key):
            rel = key[len(a.prefixes["te1"]) : -len(".weight")]
            out.append((("lora_te_" if arch == "sd15" else "lora_te1_") + rel.replace(".", "_"), s, key, None))
    if te and "te2" in a.prefixes:
        g = a.prefixes["te2"]
        n = sum(1 for k in layout if k.startswith(g) and k.endswith("attn.in_proj_weight"))
        d = tiny_shape((1280,), tiny)[0]
        for i in range(n):
            p = f"lora_te2_text_model_encoder_layers_{i}_"
            blk = f"{g}transformer.resblocks.{i}."
            for j, q in enumerate("qkv"):
                out.append((f"{p}self_attn_{q}_proj", (d, d), blk + "attn.in_proj_weight", (j * d, (j + 1) * d)))
            out.append((f"{p}self_attn_out_proj", (d, d), blk + "attn.out_proj.weight", None))
            out.append((f"{p}mlp_fc1", (4 * d, d), blk + "mlp.c_fc.weight", None))
            out.append((f"{p}mlp_fc2", (d, 4 * d), blk + "mlp.c_proj.weight", None))
    return out


# --- LoRA tensors per algorithm --------------------------------------------------------------


def _factor(n: int) -> tuple[int, int]:
    """Split n = a * b with a <= b as balanced as possible (LyCORIS factorization, factor -1)."""
    best = (1, n)
    for a in range(1, int(math.isqrt(n)) + 1):
        if n % a == 0:
            best = (a, n // a)
    return best


def module_tensors(
    algo: str, shape: tuple[int, ...], *, rank: int, alpha: float, g: torch.Generator, std: float = 0.05
) -> dict[str, torch.Tensor]:
    """Random tensors of one module of ``algo`` for a target weight of ``shape``.

    algo: lora, locon (conv kernels in lora_down), tucker, loha, lokr, dora, full, ia3, oft, norm.
    """

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(s, generator=g) * std

    out_dim, in_dim = shape[0], (shape[1] if len(shape) > 1 else 1)
    k = tuple(shape[2:])
    r = max(1, min(rank, out_dim, in_dim))
    a = torch.tensor(float(alpha))
    if algo in ("lora", "locon", "dora"):
        if k and k != (1, 1):
            t = {"lora_down.weight": rnd(r, in_dim, *k), "lora_up.weight": rnd(out_dim, r, 1, 1)}
        elif k:
            t = {"lora_down.weight": rnd(r, in_dim, 1, 1), "lora_up.weight": rnd(out_dim, r, 1, 1)}
        else:
            t = {"lora_down.weight": rnd(r, in_dim), "lora_up.weight": rnd(out_dim, r)}
        t["alpha"] = a
        if algo == "dora":
            w_norm = torch.rand(out_dim, generator=g) + 0.5
            t["dora_scale"] = w_norm.reshape(out_dim, *([1] * (len(shape) - 1)))
        return t
    if algo == "tucker":
        assert k, "tucker needs a conv target"
        return {
            "lora_down.weight": rnd(r, in_dim, 1, 1),
            "lora_mid.weight": rnd(r, r, *k),
            "lora_up.weight": rnd(out_dim, r, 1, 1),
            "alpha": a,
        }
    if algo == "loha":
        flat = in_dim * math.prod(k)
        return {
            "hada_w1_a": rnd(out_dim, r),
            "hada_w1_b": rnd(r, flat),
            "hada_w2_a": rnd(out_dim, r),
            "hada_w2_b": rnd(r, flat),
            "alpha": a,
        }
    if algo == "lokr":
        o1, o2 = _factor(out_dim)
        i1, i2 = _factor(in_dim)
        t = {"lokr_w1": rnd(o1, i1), "alpha": a}
        r2 = max(1, min(r, o2, i2 * math.prod(k)))
        if r2 < max(o2, i2) / 2:
            t["lokr_w2_a"] = rnd(o2, r2)
            # LyCORIS stores a conv kernel flattened into lokr_w2_b: (rank, in * kh * kw).
            t["lokr_w2_b"] = rnd(r2, i2 * math.prod(k))
        else:
            t["lokr_w2"] = rnd(o2, i2, *k)
        return t
    if algo == "full":
        return {"diff": rnd(*shape), "diff_b": rnd(out_dim)}
    if algo == "norm":
        return {"w_norm": rnd(*shape), "b_norm": rnd(*shape)}
    if algo == "ia3":
        return {"weight": rnd(out_dim), "on_input": torch.tensor(False)}
    if algo == "oft":
        b = _factor(out_dim)[0] or 1
        return {"oft_blocks": rnd(out_dim // b, b, b), "alpha": torch.tensor(0.0)}
    raise ValueError(f"unknown synthetic algorithm {algo!r}")


def make_lora(
    arch: str,
    algo: str = "lora",
    *,
    rank: int = 4,
    alpha: float = 2.0,
    tiny: bool | int = True,
    conv: bool = True,
    te: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    std: float = 0.05,
    base=None,
) -> dict[str, torch.Tensor]:
    """A kohya-named LoRA state dict of one algorithm covering kohya's module set.

    For ``algo='lora'`` conv 3x3 layers get LoCon-style kernels in ``lora_down``. With
    ``base`` (a tensor source of the checkpoint), DoRA magnitudes start from the base
    weights' row norms, as training would leave them.
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    layout = load_layout(ARCHS[arch].layout)
    for name, shape, key, rows in kohya_modules(arch, conv=conv, te=te, tiny=tiny):
        tensors = module_tensors(algo, shape, rank=rank, alpha=alpha, g=g, std=std)
        if "diff_b" in tensors and (rows is not None or key[: -len("weight")] + "bias" not in layout):
            del tensors["diff_b"]  # LyCORIS stores a bias difference only where the layer has a bias
        if algo == "dora" and base is not None:
            w = base.read(key).float()
            w = w[rows[0] : rows[1]] if rows else w
            norms = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)
            tensors["dora_scale"] = (norms * (1 + 0.02 * torch.randn(norms.shape, generator=g))).reshape(
                tensors["dora_scale"].shape
            )
        for p, t in tensors.items():
            sd[f"{name}.{p}"] = t.to(dtype) if t.is_floating_point() else t
    return sd


def write_lora(
    path: str, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, overwrite: bool = False
) -> str:
    return save_file(sd, path, metadata, overwrite=overwrite)


def kohya_metadata(
    arch: str,
    *,
    output_name: str,
    folders: dict[str, tuple[int, list[tuple[str, int]]]],
    dim: int = 4,
    alpha: float = 2.0,
    network_module: str = "networks.lora",
    network_args: dict | None = None,
    keep_tokens: int = 0,
    base_model: str | None = None,
    epochs: int = 10,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Metadata as kohya's train_network.py writes it (every value a string, JSON where kohya uses JSON).

    Args:
        folders: image folder name (kohya style "10_name") -> (image count, [(tag, captions with it), ...]),
            tags in the order they first appear in the captions.
    """
    import json
    import time

    steps = (
        sum(
            n * int(name.split("_", 1)[0]) if name.split("_", 1)[0].isdigit() else n for name, (n, _) in folders.items()
        )
        * epochs
    )
    meta = {
        "ss_session_id": "1234567890",
        "ss_training_started_at": str(time.time() - 3600),
        "ss_output_name": output_name,
        "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_unet_lr": "0.0001",
        "ss_num_train_images": str(sum(n for n, _ in folders.values())),
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": str(steps // epochs),
        "ss_num_epochs": str(epochs),
        "ss_epoch": str(epochs),
        "ss_batch_size_per_device": "1",
        "ss_total_batch_size": "1",
        "ss_gradient_checkpointing": "True",
        "ss_gradient_accumulation_steps": "1",
        "ss_max_train_steps": str(steps),
        "ss_lr_warmup_steps": "0",
        "ss_lr_scheduler": "cosine",
        "ss_network_module": network_module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": f"{alpha:g}" if alpha != int(alpha) else f"{alpha:.1f}",
        "ss_mixed_precision": "bf16",
        "ss_full_fp16": "False",
        "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1",
        "ss_clip_skip": "None" if arch == "sdxl" else "2",
        "ss_max_token_length": "None",
        "ss_cache_latents": "True",
        "ss_seed": "42",
        "ss_lowram": "False",
        "ss_noise_offset": "None",
        "ss_min_snr_gamma": "5.0",
        "ss_sd_model_name": base_model
        or ("sd_xl_base_1.0.safetensors" if arch == "sdxl" else "v1-5-pruned-emaonly.safetensors"),
        "ss_resolution": "(1024, 1024)" if arch == "sdxl" else "(512, 512)",
        "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit",
        "ss_color_aug": "False",
        "ss_flip_aug": "False",
        "ss_random_crop": "False",
        "ss_shuffle_caption": "True",
        "ss_enable_bucket": "True",
        "ss_bucket_no_upscale": "True",
        "ss_min_bucket_reso": "256",
        "ss_max_bucket_reso": "2048",
        "ss_keep_tokens": str(keep_tokens),
        "ss_caption_dropout_rate": "0.0",
        "ss_caption_dropout_every_n_epochs": "0",
        "ss_caption_tag_dropout_rate": "0.0",
        "ss_dataset_dirs": json.dumps(
            {
                name: {
                    "n_repeats": int(name.split("_", 1)[0]) if name.split("_", 1)[0].isdigit() else 1,
                    "img_count": n,
                }
                for name, (n, _) in folders.items()
            }
        ),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_tag_frequency": json.dumps({name: dict(tags) for name, (_, tags) in folders.items()}),
        "ss_bucket_info": json.dumps({"buckets": {}, "mean_img_ar_error": 0.0}),
        "ss_training_finished_at": str(time.time()),
        "ss_steps": str(steps),
        "sshs_model_hash": "0" * 64,
        "sshs_legacy_hash": "00000000",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": (
            "stable-diffusion-xl-v1-base/lora" if arch == "sdxl" else "stable-diffusion-v1/lora"
        ),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if arch == "sdxl"
        else "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": "1024x1024" if arch == "sdxl" else "512x512",
        "modelspec.prediction_type": "epsilon",
    }
    if network_args:
        meta["ss_network_args"] = json.dumps({k: str(v) for k, v in network_args.items()})
    meta.update(extra or {})
    return meta
