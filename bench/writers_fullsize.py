"""Third-party writers at full size: bake each writer's file in fp32 and compare with the writer's float64 update.

The same writers and references as tests/test_writers.py (tests/writers.py), at real widths, with a
full-size random checkpoint in the real layout (fp16, as released). Memory stays well under 15 GB:

- the writers' models are built on the meta device and given uninitialised storage, in fp16, except
  where the update depends on the weight (DoRA), where the text encoder's checkpoint weights are loaded;
- the reference is computed module by module in float64 with the writer's own code (PEFT
  ``get_delta_weight``, LyCORIS ``get_weight`` / ``get_diff_weight`` / ``get_merged_weight``) and
  added to the checkpoint's weight, read one tensor at a time;
- diffusers' single-file converters map names on placeholders (:class:`Lazy`), so no checkpoint is
  held in memory; tensors are read from the files on demand.

Run: ``.venv/bin/python bench/writers_fullsize.py --arch sd15`` then ``--arch sdxl`` (one at a time).
Prints one table row per file: writer, version, algorithm, modules in file, matched, max rel. error.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from importlib.metadata import version

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import writers as W  # noqa: E402
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lib_lorakit.bake import LoraSpec, bake  # noqa: E402
from lib_lorakit.streaming import peak_rss_mb  # noqa: E402
from lib_lorakit.synth import write_checkpoint  # noqa: E402


class Lazy:
    """A checkpoint tensor by name (and row slice / transpose), for the converters to map without loading."""

    def __init__(self, key, shape, rows=None, t=False):
        self.key, self._shape, self.rows, self.t = key, tuple(shape), rows, t

    @property
    def shape(self):
        s = self._shape
        if self.rows:
            s = (self.rows[1] - self.rows[0],) + s[1:]
        return torch.Size(s[::-1] if self.t else s)

    @property
    def T(self):  # noqa: N802
        return Lazy(self.key, self._shape, self.rows, not self.t)

    def __getitem__(self, idx):
        sl = idx[0] if isinstance(idx, tuple) else idx
        start, stop, _ = sl.indices(self.shape[0])
        return Lazy(self.key, self._shape, (start, stop), self.t)

    def contiguous(self):
        return self

    clone = detach = contiguous

    def load(self, f) -> torch.Tensor:
        t = f.get_tensor(self.key)
        if self.rows:
            t = t[self.rows[0] : self.rows[1]]
        return t.T if self.t else t


def lazy_view(path: str, arch: str, parts) -> tuple[dict, object]:
    f = safe_open(path, "pt")
    ck = {k: Lazy(k, f.get_slice(k).get_shape()) for k in f.keys()}
    return W.diffusers_view(ck, arch, 1, parts), f


def empty(module: torch.nn.Module, dtype=torch.float16) -> torch.nn.Module:
    return module.to(dtype).to_empty(device="cpu")


def unet_shell(arch, only: list[str] | None = None):
    """The full-size UNet, storage uninitialised (fp16); with ``only``, just the modules whose name ends with
    one of those names get storage (the rest stay on the meta device: the writer's adapters never read them)."""
    with torch.device("meta"):
        m = W.unet_model(arch, 1)
    if only is None:
        return empty(m)
    for name, mod in m.named_modules():
        if any(name.endswith("." + o) for o in only):
            empty(mod)
    return m


def te_shell(which, flat=False, weights=None):
    cls = W.CLIPTextModelWithProjection if which == "te2" else W.CLIPTextModel
    with torch.device("meta"):
        m = cls(W.te_config(which, 1))
    m = empty(m, torch.float32 if weights is not None else torch.float16)
    if weights is not None:
        m.load_state_dict(weights, strict=False)
    return m.text_model if flat else m


def peft_deltas(model) -> dict:
    """name -> a function giving PEFT's own ``get_delta_weight`` of that layer, in float64 (computed when compared)."""

    def delta(mod):
        mod.lora_A.double()
        mod.lora_B.double()
        out = mod.get_delta_weight("default").double()
        mod.lora_A.float()
        mod.lora_B.float()
        return out

    return {
        name + ".weight": (lambda m=mod: delta(m))
        for name, mod in model.named_modules()
        if isinstance(mod, BaseTunerLayer)
    }


def lycoris_deltas(net) -> tuple[dict, dict]:
    """(name -> update, name -> merged weight for DoRA), each a function running LyCORIS's own module code in float64."""
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    def run(lora):
        org = lora.org_module[0]
        with torch.no_grad():
            lora.double()
            try:
                if lora.wd:
                    w0 = org.weight.data
                    org.weight.data = w0.double()
                    try:
                        return lora.get_merged_weight(1.0)[0].double()
                    finally:
                        org.weight.data = w0
                if isinstance(lora, (LohaModule, LokrModule)):  # their forward's weight (see tests/writers.py)
                    return lora.get_weight(org.weight.shape).double() * float(lora.scalar)
                return lora.get_diff_weight(1.0)[0].double().reshape(org.weight.shape)
            finally:
                lora.float()

    out, merged = {}, {}
    for lora in net.loras:
        (merged if lora.wd else out)[lora._lk_name] = lambda x=lora: run(x)
    return out, merged


def randomise_peft(model, seed):
    W.randomise(model, seed, lambda n: "lora_" in n)


def write_peft_file(
    tmp,
    arch,
    comps,
    *,
    flat=False,
    metadata=True,
    rslora=False,
    r=8,
    alpha=16.0,
    unet_targets=None,
    name="peft.safetensors",
    rank_pattern=None,
    alpha_pattern=None,
):
    layers, configs, deltas, counts = {}, {}, {}, {}
    for i, comp in enumerate(comps):
        cfg = LoraConfig(
            r=r,
            lora_alpha=alpha,
            init_lora_weights=False,
            use_rslora=rslora,
            target_modules=(unet_targets or W.ATTN) if comp == "unet" else W.TE_TARGETS,
            rank_pattern=dict(rank_pattern or {}),
            alpha_pattern=dict(alpha_pattern or {}),
        )
        model = unet_shell(arch, unet_targets) if comp == "unet" else te_shell(comp, flat)
        model = inject_adapter_in_model(cfg, model)
        randomise_peft(model, 20 + i)
        counts[comp] = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
        sd = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        d = peft_deltas(model)
        d = {k.replace(".base_layer.", "."): v for k, v in d.items()}
        if flat:
            d = {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in d.items()}
        deltas[comp] = d
        prefix = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}[comp]
        layers[prefix] = convert_state_dict_to_diffusers(sd) if comp == "unet" else sd
        configs[prefix] = cfg
        del model
    loader = StableDiffusionXLLoraLoaderMixin if arch == "sdxl" else StableDiffusionLoraLoaderMixin
    kw = {"unet_lora_layers": layers.get("unet"), "text_encoder_lora_layers": layers.get("text_encoder")}
    if arch == "sdxl":
        kw["text_encoder_2_lora_layers"] = layers.get("text_encoder_2")
    loader.save_lora_weights(
        tmp,
        weight_name=name,
        safe_serialization=True,
        save_function=W.diffusers_metadata_saver(configs) if metadata else None,
        **kw,
    )
    return os.path.join(tmp, name), deltas, counts


def write_lycoris_file(tmp, arch, comp, algo, te_weights=None):
    from lycoris import create_lycoris

    model = unet_shell(arch) if comp == "unet" else te_shell(comp, weights=te_weights if algo == "dora" else None)
    if algo != "dora":
        model.float()
    net = create_lycoris(model, 1.0, linear_dim=8, linear_alpha=4.0, preset="full", **W.LYCORIS_ALGOS[algo])
    net.apply_to()
    names = {id(m): n for n, m in model.named_modules()}
    for lora in net.loras:
        lora._lk_name = names[id(lora.org_module[0])] + ".weight"
    W.randomise(net, 31, lambda n: "org_module" not in n and not n.endswith("alpha"))
    path = os.path.join(tmp, f"lycoris-{arch}-{comp}-{algo}.safetensors")
    net.save_weights(path, torch.float32, None)
    d, merged = lycoris_deltas(net)
    return path, {comp: d}, {comp: merged}, {comp: len(net.loras)}


def compare(baked_path, base_path, arch, deltas, merged) -> tuple[float, dict]:
    comps = sorted(set(deltas) | set(merged))
    bv, bf = lazy_view(baked_path, arch, comps)
    ov, of = lazy_view(base_path, arch, comps)
    worst, changed = 0.0, {}
    for comp in comps:
        items = [(k, "d", v) for k, v in deltas.get(comp, {}).items()] + [
            (k, "m", v) for k, v in merged.get(comp, {}).items()
        ]
        for k, kind, v in items:
            v = v() if callable(v) else v
            got = bv[comp][k].load(bf).double()
            ref = v if kind == "m" else ov[comp][k].load(of).double() + v.reshape(got.shape)
            worst = max(worst, float((got - ref.reshape(got.shape)).abs().max() / ref.abs().max()))
            changed[comp] = changed.get(comp, 0) + 1
    return worst, changed


def te_weights(base_path, arch, which):
    view, f = lazy_view(base_path, arch, (which,))
    return {k: v.load(f).float() for k, v in view[which].items() if "position_ids" not in k}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=("sd15", "sdxl"), required=True)
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", "_work_writers"))
    ap.add_argument(
        "--only",
        type=int,
        nargs="*",
        help="SDXL: run only these groups (0-3 LyCORIS lora/loha/lokr/dora, 4 PEFT text encoders, 5 diffusers UNet)",
    )
    args = ap.parse_args()
    arch = args.arch
    os.makedirs(args.work, exist_ok=True)
    base = os.path.join(args.work, f"{arch}-full.safetensors")
    if not os.path.exists(base):
        write_checkpoint(base, arch, tiny=False, dtype=torch.float16, seed=1)
    out = os.path.join(args.work, "baked.safetensors")
    v = {"diffusers": version("diffusers"), "peft": version("peft"), "LyCORIS": version("lycoris-lora")}
    t = args.work

    def want(i: int) -> bool:
        return not args.only or i in args.only

    def groups():
        """Yield each group of files baked together (disjoint targets), written just before its bake."""
        if arch == "sd15":
            p, d, c = write_peft_file(
                t,
                arch,
                ["unet", "te1"],
                name="diffusers-meta.safetensors",
                rank_pattern={"attn2.to_k": 4},
                alpha_pattern={"ff.net.2": 6.0},
            )
            yield [
                (
                    f"diffusers save_lora_weights + adapter metadata (peft {v['peft']})",
                    "lora (lora_alpha/r)",
                    p,
                    d,
                    {},
                    c,
                )
            ]
            p, d, c = write_peft_file(t, arch, ["unet", "te1"], name="tmp.safetensors", metadata=False, alpha=8.0)
            conv = convert_state_dict_to_kohya(W.read_all(p))
            p2 = os.path.join(t, "kohya-converted.safetensors")
            save_file({k: x.contiguous() for k, x in conv.items()}, p2)
            os.remove(p)
            yield [("diffusers convert_state_dict_to_kohya", "lora", p2, d, {}, c)]
            tw = te_weights(base, arch, "te1")
            for algo in ("lora", "loha", "lokr", "dora"):
                p, d, m, c = write_lycoris_file(t, arch, "te1", algo, tw)
                yield [("LyCORIS create_lycoris", f"{algo} (te1)", p, d, m, c)]
            ul = write_lycoris_file(t, arch, "unet", "lora")
            yield [("LyCORIS create_lycoris", "lora/LoCon (UNet)", *ul)]
        else:
            for i, algo in enumerate(("lora", "loha", "lokr", "dora")):
                if not want(i):
                    continue
                g = []
                for comp in ("te1", "te2"):
                    tw = te_weights(base, arch, comp) if algo == "dora" else None
                    p, d, m, c = write_lycoris_file(t, arch, comp, algo, tw)
                    g.append(("LyCORIS create_lycoris", f"{algo} ({comp})", p, d, m, c))
                    del tw
                yield g
                g = d = m = None  # the models behind the references go before the next group is built
                gc.collect()
            if want(4):
                p, d, c = write_peft_file(t, arch, ["te1", "te2"], flat=True, rslora=True, name="peft-t5.safetensors")
                yield [
                    (
                        f"PEFT {v['peft']} on transformers-5 CLIP tree + diffusers save_lora_weights",
                        "lora (rsLoRA)",
                        p,
                        d,
                        {},
                        c,
                    )
                ]
                d = None
                gc.collect()
            if not want(5):
                return
            p, d, c = write_peft_file(
                t, arch, ["unet"], metadata=True, name="diffusers-unet.safetensors", unet_targets=["to_k", "to_out.0"]
            )  # keeps the float64 reference under ~3 GB
            yield [
                (
                    f"diffusers save_lora_weights + adapter metadata (peft {v['peft']})",
                    "lora (lora_alpha/r)",
                    p,
                    d,
                    {},
                    c,
                )
            ]

    rows = []
    for g in groups():
        t0 = time.perf_counter()
        rep = bake(base, [LoraSpec(x[2]) for x in g], out, save_dtype="fp32", overwrite=True)
        wall = time.perf_counter() - t0
        for (label, algo, path, d, m, c), lo in zip(g, rep["loras"]):
            err, changed = compare(out, base, arch, d, m)
            matched = {k: n for k, n in lo["matched"].items() if n}
            ver = v["LyCORIS"] if label.startswith("LyCORIS") else v["diffusers"]
            rows.append(
                {
                    "writer": label,
                    "version": ver,
                    "algorithm": algo,
                    "modules": c,
                    "layers_in_file": lo["layers"],
                    "matched": matched,
                    "unmatched": len(lo["unmatched"]),
                    "compared": changed,
                    "max_rel_err": err,
                    "scale": lo["scale"]["sources"],
                    "naming": lo["naming_normalised"],
                    "bake_s": round(wall, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for x in g:
            os.remove(x[2])
        os.remove(out)  # a bake writes beside its target: two 14 GB files at once would not fit every disk
        del g, rep
        gc.collect()
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    print("| writer | version | algorithm | modules in file | matched | max rel. error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['writer']} | {r['version']} | {r['algorithm']} | {r['layers_in_file']} | "
            f"{sum(r['matched'].values())} ({', '.join(f'{k} {n}' for k, n in r['matched'].items())}) | {r['max_rel_err']:.2e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
