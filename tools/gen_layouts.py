"""Regenerate lib_lorakit/formats/layouts/*.json from the architectures' definitions.

The key layouts ship as data. This script derives them from the model definitions
(ldm/sgm UNet, HF CLIP ViT-L, OpenCLIP ViT-bigG, ldm AutoencoderKL) so the tables
have an independent origin; tests then compare them with real checkpoints' headers.

    python tools/gen_layouts.py
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "lib_lorakit", "formats", "layouts")


class Keys:
    def __init__(self, dtype: str):
        self.dtype = dtype
        self.d: dict[str, list] = {}

    def add(self, key: str, shape: list[int], dtype: str | None = None) -> None:
        assert key not in self.d, key
        self.d[key] = [shape, dtype or self.dtype]

    def linear(self, p: str, out: int, inp: int, bias: bool = True) -> None:
        self.add(f"{p}.weight", [out, inp])
        if bias:
            self.add(f"{p}.bias", [out])

    def conv(self, p: str, out: int, inp: int, k: int) -> None:
        self.add(f"{p}.weight", [out, inp, k, k])
        self.add(f"{p}.bias", [out])

    def norm(self, p: str, ch: int) -> None:
        self.add(f"{p}.weight", [ch])
        self.add(f"{p}.bias", [ch])


# --- UNet (ldm openaimodel / sgm) ------------------------------------------------------


def unet(
    k: Keys,
    p: str,
    *,
    ctx: int,
    mult: list[int],
    attn_levels: set[int],
    depth: list[int],
    depth_mid: int,
    linear_proj: bool,
    adm: int | None,
) -> None:
    mc, emb = 320, 1280

    def res(q: str, cin: int, cout: int) -> None:
        k.norm(f"{q}.in_layers.0", cin)
        k.conv(f"{q}.in_layers.2", cout, cin, 3)
        k.linear(f"{q}.emb_layers.1", cout, emb)
        k.norm(f"{q}.out_layers.0", cout)
        k.conv(f"{q}.out_layers.3", cout, cout, 3)
        if cin != cout:
            k.conv(f"{q}.skip_connection", cout, cin, 1)

    def st(q: str, ch: int, n: int) -> None:
        k.norm(f"{q}.norm", ch)
        proj = (lambda r: k.linear(r, ch, ch)) if linear_proj else (lambda r: k.conv(r, ch, ch, 1))
        proj(f"{q}.proj_in")
        for i in range(n):
            b = f"{q}.transformer_blocks.{i}"
            for a, kv in (("attn1", ch), ("attn2", ctx)):
                k.linear(f"{b}.{a}.to_q", ch, ch, bias=False)
                k.linear(f"{b}.{a}.to_k", ch, kv, bias=False)
                k.linear(f"{b}.{a}.to_v", ch, kv, bias=False)
                k.linear(f"{b}.{a}.to_out.0", ch, ch)
            k.linear(f"{b}.ff.net.0.proj", ch * 8, ch)
            k.linear(f"{b}.ff.net.2", ch, ch * 4)
            for nn in ("norm1", "norm2", "norm3"):
                k.norm(f"{b}.{nn}", ch)
        proj(f"{q}.proj_out")

    k.linear(f"{p}.time_embed.0", emb, mc)
    k.linear(f"{p}.time_embed.2", emb, emb)
    if adm:
        k.linear(f"{p}.label_emb.0.0", emb, adm)
        k.linear(f"{p}.label_emb.0.2", emb, emb)
    k.conv(f"{p}.input_blocks.0.0", mc, 4, 3)
    chans = [mc]
    ch = mc
    n = 1
    for level, m in enumerate(mult):
        for _ in range(2):
            res(f"{p}.input_blocks.{n}.0", ch, m * mc)
            ch = m * mc
            if level in attn_levels:
                st(f"{p}.input_blocks.{n}.1", ch, depth[level])
            chans.append(ch)
            n += 1
        if level != len(mult) - 1:
            k.conv(f"{p}.input_blocks.{n}.0.op", ch, ch, 3)
            chans.append(ch)
            n += 1
    res(f"{p}.middle_block.0", ch, ch)
    st(f"{p}.middle_block.1", ch, depth_mid)
    res(f"{p}.middle_block.2", ch, ch)
    n = 0
    for level in reversed(range(len(mult))):
        m = mult[level]
        for i in range(3):
            res(f"{p}.output_blocks.{n}.0", ch + chans.pop(), m * mc)
            ch = m * mc
            j = 1
            if level in attn_levels:
                st(f"{p}.output_blocks.{n}.1", ch, depth[level])
                j = 2
            if level and i == 2:
                k.conv(f"{p}.output_blocks.{n}.{j}.conv", ch, ch, 3)
            n += 1
    k.norm(f"{p}.out.0", mc)
    k.conv(f"{p}.out.2", 4, mc, 3)


# --- text encoders ---------------------------------------------------------------------


def clip_l(k: Keys, p: str) -> None:
    """HF CLIPTextModel (ViT-L/14), under ``p`` = '...transformer.text_model'."""
    d = 768
    k.add(f"{p}.embeddings.position_embedding.weight", [77, d])
    k.add(f"{p}.embeddings.position_ids", [1, 77], "int64")
    k.add(f"{p}.embeddings.token_embedding.weight", [49408, d])
    for i in range(12):
        q = f"{p}.encoder.layers.{i}"
        k.norm(f"{q}.layer_norm1", d)
        k.norm(f"{q}.layer_norm2", d)
        k.linear(f"{q}.mlp.fc1", 4 * d, d)
        k.linear(f"{q}.mlp.fc2", d, 4 * d)
        for a in ("k", "out", "q", "v"):
            k.linear(f"{q}.self_attn.{a}_proj", d, d)
    k.norm(f"{p}.final_layer_norm", d)


def clip_g(k: Keys, p: str) -> None:
    """OpenCLIP ViT-bigG/14 text tower, under ``p`` = 'conditioner.embedders.1.model'."""
    d = 1280
    k.add(f"{p}.ln_final.weight", [d])
    k.add(f"{p}.ln_final.bias", [d])
    k.add(f"{p}.logit_scale", [])
    k.add(f"{p}.positional_embedding", [77, d])
    k.add(f"{p}.text_projection", [d, d])
    k.add(f"{p}.token_embedding.weight", [49408, d])
    for i in range(32):
        q = f"{p}.transformer.resblocks.{i}"
        k.add(f"{q}.attn.in_proj_bias", [3 * d])
        k.add(f"{q}.attn.in_proj_weight", [3 * d, d])
        k.linear(f"{q}.attn.out_proj", d, d)
        k.norm(f"{q}.ln_1", d)
        k.norm(f"{q}.ln_2", d)
        k.linear(f"{q}.mlp.c_fc", 4 * d, d)
        k.linear(f"{q}.mlp.c_proj", d, 4 * d)


# --- VAE (ldm AutoencoderKL) -----------------------------------------------------------


def vae(k: Keys, p: str) -> None:
    ch, mult = 128, [1, 2, 4, 4]

    def resblock(q: str, cin: int, cout: int) -> None:
        k.norm(f"{q}.norm1", cin)
        k.conv(f"{q}.conv1", cout, cin, 3)
        k.norm(f"{q}.norm2", cout)
        k.conv(f"{q}.conv2", cout, cout, 3)
        if cin != cout:
            k.conv(f"{q}.nin_shortcut", cout, cin, 1)

    def attn(q: str, c: int) -> None:
        k.norm(f"{q}.norm", c)
        for a in ("q", "k", "v", "proj_out"):
            k.conv(f"{q}.{a}", c, c, 1)

    e = f"{p}.encoder"
    k.conv(f"{e}.conv_in", ch, 3, 3)
    cin = ch
    for lvl, m in enumerate(mult):
        for b in range(2):
            resblock(f"{e}.down.{lvl}.block.{b}", cin, ch * m)
            cin = ch * m
        if lvl != len(mult) - 1:
            k.conv(f"{e}.down.{lvl}.downsample.conv", cin, cin, 3)
    resblock(f"{e}.mid.block_1", cin, cin)
    attn(f"{e}.mid.attn_1", cin)
    resblock(f"{e}.mid.block_2", cin, cin)
    k.norm(f"{e}.norm_out", cin)
    k.conv(f"{e}.conv_out", 8, cin, 3)

    d = f"{p}.decoder"
    cin = ch * mult[-1]
    k.conv(f"{d}.conv_in", cin, 4, 3)
    resblock(f"{d}.mid.block_1", cin, cin)
    attn(f"{d}.mid.attn_1", cin)
    resblock(f"{d}.mid.block_2", cin, cin)
    for lvl in reversed(range(len(mult))):
        for b in range(3):
            resblock(f"{d}.up.{lvl}.block.{b}", cin, ch * mult[lvl])
            cin = ch * mult[lvl]
        if lvl != 0:
            k.conv(f"{d}.up.{lvl}.upsample.conv", cin, cin, 3)
    k.norm(f"{d}.norm_out", cin)
    k.conv(f"{d}.conv_out", 3, cin, 3)
    k.conv(f"{p}.quant_conv", 8, 8, 1)
    k.conv(f"{p}.post_quant_conv", 4, 4, 1)


SCHEDULE = [
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "betas",
    "log_one_minus_alphas_cumprod",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_variance",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
]


def add_vpred_flags(k: Keys) -> None:
    """sd-mecha's v-prediction markers: empty int64 flags and EDM sigma scalars."""
    k.add("v_pred", [0], "int64")
    k.add("ztsnr", [0], "int64")
    k.add("edm_vpred.sigma_min", [])
    k.add("edm_vpred.sigma_max", [])


def sd15() -> dict:
    k = Keys("float32")
    clip_l(k, "cond_stage_model.transformer.text_model")
    vae(k, "first_stage_model")
    unet(
        k,
        "model.diffusion_model",
        ctx=768,
        mult=[1, 2, 4, 4],
        attn_levels={0, 1, 2},
        depth=[1, 1, 1, 0],
        depth_mid=1,
        linear_proj=False,
        adm=None,
    )
    opt = Keys("float32")
    for s in SCHEDULE:
        opt.add(s, [1000])
    add_vpred_flags(opt)
    return {"name": "sd15-ldm", "tensors": dict(sorted(k.d.items())), "optional": dict(sorted(opt.d.items()))}


def sdxl() -> dict:
    k = Keys("float16")
    clip_l(k, "conditioner.embedders.0.transformer.text_model")
    clip_g(k, "conditioner.embedders.1.model")
    vae(k, "first_stage_model")
    unet(
        k,
        "model.diffusion_model",
        ctx=2048,
        mult=[1, 2, 4],
        attn_levels={1, 2},
        depth=[0, 2, 10],
        depth_mid=10,
        linear_proj=True,
        adm=2816,
    )
    opt = Keys("float32")
    for s in SCHEDULE:
        opt.add(s, [1000])
    add_vpred_flags(opt)
    return {"name": "sdxl-sgm", "tensors": dict(sorted(k.d.items())), "optional": dict(sorted(opt.d.items()))}


def dump(layout: dict) -> str:
    lines = ["{", f' "name": {json.dumps(layout["name"])},']
    for section in ("tensors", "optional"):
        items = list(layout[section].items())
        lines.append(f' "{section}": {{')
        for i, (key, v) in enumerate(items):
            comma = "," if i < len(items) - 1 else ""
            lines.append(f"  {json.dumps(key)}: {json.dumps(v)}{comma}")
        lines.append(" }," if section == "tensors" else " }")
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for layout in (sd15(), sdxl()):
        path = os.path.join(OUT, layout["name"] + ".json")
        with open(path, "w") as f:
            f.write(dump(layout))
        print(f"{path}: {len(layout['tensors'])} tensors")
