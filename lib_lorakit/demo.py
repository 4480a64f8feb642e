"""``python -m lib_lorakit demo``: a small workspace with the real key layout, baked end to end.

Builds a tiny-width SDXL (or SD1.5) checkpoint and LoRAs of several algorithms in
kohya naming, bakes a recipe, checks one baked tensor against a direct float32
recomputation, and shows that a LoRA for the other architecture is refused.
"""

from __future__ import annotations

import os

import torch

from .bake import LoraSpec, bake, summary
from .errors import LorakitError
from .formats.safetensors_io import SafetensorsFile
from .formats.sources import open_source
from .synth import make_lora, write_checkpoint, write_lora

RECIPE = [  # file, algorithm, strength, te strength
    ("style-locon", "lora", 0.8, 0.5),
    ("detail-loha", "loha", 0.5, None),
    ("concept-lokr", "lokr", 0.6, 0.3),
    ("light-dora", "dora", 0.4, None),
]


def _build(root: str, arch: str, keep: bool) -> tuple[str, dict[str, str]]:
    ckpt_dir = os.path.join(root, "models", "Stable-diffusion")
    lora_dir = os.path.join(root, "models", "Lora")
    os.makedirs(ckpt_dir, exist_ok=True)
    os.makedirs(lora_dir, exist_ok=True)
    base = os.path.join(ckpt_dir, f"demo-{arch}-base.safetensors")
    if not (keep and os.path.exists(base)):
        write_checkpoint(
            base,
            arch,
            tiny=True,
            seed=1,
            overwrite=True,
            metadata={
                "modelspec.title": f"lorakit demo {arch} base",
                "modelspec.architecture": "stable-diffusion-xl-v1-base" if arch == "sdxl" else "stable-diffusion-v1",
            },
        )
    files = {}
    for i, (name, algo, _, _) in enumerate(RECIPE):
        path = os.path.join(lora_dir, f"{name}.safetensors")
        files[name] = path
        if not (keep and os.path.exists(path)):
            with open_source(base) as src:
                sd = make_lora(
                    arch,
                    algo,
                    rank=4,
                    alpha=2,
                    seed=10 + i,
                    te=algo in ("lora", "lokr"),
                    conv=algo in ("lora", "loha"),
                    base=src,
                )
            write_lora(
                path,
                sd,
                {"ss_network_module": "lycoris.kohya" if algo != "lora" else "networks.lora", "ss_output_name": name},
                overwrite=True,
            )
    other = "sd15" if arch == "sdxl" else "sdxl"
    wrong = os.path.join(lora_dir, f"{other}-style.safetensors")
    if not (keep and os.path.exists(wrong)):
        write_lora(wrong, make_lora(other, "lora", rank=4, seed=99, conv=False), overwrite=True)
    files["wrong"] = wrong
    return base, files


def _check_one(base: str, out: str, lora: str, strength: float) -> float:
    """Recompute one attention weight directly from the files; return the max abs difference."""
    with SafetensorsFile(base) as b, SafetensorsFile(lora) as lf, SafetensorsFile(out) as o:
        key = next(k for k in b.keys() if k.endswith("attn2.to_k.weight"))
        rel = key[len("model.diffusion_model.") : -len(".weight")]
        candidates = [k for k in lf.keys() if k.endswith(".lora_down.weight")]
        from .networks.resolve import unet_ldm_to_diffusers

        names = {
            "lora_unet_" + rel.replace(".", "_"),
            "lora_unet_" + (unet_ldm_to_diffusers(rel) or "").replace(".", "_"),
        }
        mod = next(k[: -len(".lora_down.weight")] for k in candidates if k[: -len(".lora_down.weight")] in names)
        down = lf.read(mod + ".lora_down.weight").double()
        up = lf.read(mod + ".lora_up.weight").double()
        alpha = float(lf.read(mod + ".alpha"))
        expected = b.read(key).double() + strength * alpha / down.shape[0] * (up @ down)
        return float((o.read(key).double() - expected).abs().max())


def run_demo(root: str, *, arch: str = "sdxl", keep: bool = False) -> int:
    root = os.path.abspath(root)
    print(f"Building a demo workspace in {root} ({arch}, real key layout, widths / 64) ...")
    base, files = _build(root, arch, keep)
    out = os.path.join(root, "models", "Stable-diffusion", f"demo-{arch}-baked.safetensors")
    specs = [LoraSpec(files[n], strength=s, te_strength=t) for n, _, s, t in RECIPE]
    recipe = " ".join(f"<lora:{n}:{s}>" for n, _, s, _ in RECIPE)
    print(f"Recipe: {recipe}\n")
    report = bake(base, specs, out, save_dtype="fp16", overwrite=True)
    print(summary(report))

    # exactness, shown on a single-LoRA bake where the expected value is a one-line formula
    diff = None
    try:
        single = os.path.join(root, f"demo-{arch}-single.safetensors")
        bake(base, [specs[0]], single, overwrite=True)
        diff = _check_one(base, single, files["style-locon"], specs[0].strength)
        os.unlink(single)
    except LorakitError as e:  # pragma: no cover - the demo inputs are built to match
        print(f"check skipped: {e}")
    if diff is not None:
        print(
            f"\nCheck: a baked attention weight matches a direct fp64 recomputation to {diff:.2e} "
            f"(fp16 rounding is ~{torch.finfo(torch.float16).eps:.1e} relative)."
        )

    print(f"\nNow the same checkpoint with a LoRA for the other architecture ({os.path.basename(files['wrong'])}):")
    try:
        bake(base, [LoraSpec(files["wrong"])], os.path.join(root, "never-written.safetensors"))
        print("unexpected: it was accepted")
        return 1
    except LorakitError as e:
        print(f"refused, as it should be:\n  {str(e).replace(chr(10), chr(10) + '  ')}")
    print(f"\nBaked checkpoint: {out}")
    return 0
