"""The LoRA inspector on files built like real kohya / LyCORIS / diffusers outputs (full-size layouts,
rank 2, metadata as the trainers write it)."""

import json
import math
import os

import pytest
import torch
from factories import write

from lib_lorakit.cli import main
from lib_lorakit.formats import safetensors_io
from lib_lorakit.formats.arch import ARCHS, block_of, load_layout
from lib_lorakit.formats.safetensors_io import OutEntry, build_header
from lib_lorakit.inspect import inspect_file, inspect_paths, render, usermeta
from lib_lorakit.inspect.tokens import ClipBPE, clip_bpe, rarity
from lib_lorakit.settings import load as load_settings
from lib_lorakit.settings import update as update_settings
from lib_lorakit.synth import kohya_metadata, kohya_modules, make_lora, write_checkpoint

REQUIRED = {
    "file",
    "architecture",
    "algorithms",
    "rank",
    "alpha",
    "components",
    "trigger",
    "trigger_candidates",
    "kind",
    "category",
    "max_safe_strength",
    "warnings",
}


def lora(tmp_path, name, arch="sd15", algo="lora", *, meta=None, te=True, conv=False, rank=2, alpha=1.0, seed=0):
    sd = make_lora(arch, algo, rank=rank, alpha=alpha, tiny=False, te=te, conv=conv, seed=seed)
    return write(tmp_path, name, sd, meta)


def character_meta(name="zkwgirl_v2", arch="sd15", keep=1, **kw):
    return kohya_metadata(
        arch,
        output_name=name,
        keep_tokens=keep,
        dim=2,
        alpha=1.0,
        folders={
            "10_zkwgirl woman": (
                25,
                [
                    ("zkwgirl", 25),
                    ("1girl", 25),
                    ("solo", 24),
                    ("long hair", 22),
                    ("blue eyes", 23),
                    ("smile", 10),
                    ("white dress", 6),
                ],
            )
        },
        **kw,
    )


def style_meta(name="inkwash", arch="sd15"):
    tags = [
        ("1girl", 14),
        ("solo", 11),
        ("scenery", 12),
        ("outdoors", 15),
        ("tree", 9),
        ("mountain", 7),
        ("1boy", 6),
        ("water", 8),
        ("sky", 10),
        ("traditional media", 30),
        ("monochrome", 26),
        ("building", 5),
        ("flower", 4),
        ("animal", 3),
        ("cup", 2),
        ("bird", 4),
        ("river", 6),
    ]
    return kohya_metadata(arch, output_name=name, dim=2, alpha=1.0, folders={"5_ink": (40, tags)})


# --- the trigger and the kind ------------------------------------------------------------------------


def test_trigger_dependent_character(tmp_path):
    p = lora(tmp_path, "zkwgirl_v2.safetensors", meta=character_meta())
    rep = inspect_file(p)
    assert REQUIRED <= set(rep)
    assert rep["architecture"] == "sd15"
    assert rep["trigger"] == "zkwgirl"
    assert rep["kind"] == "trigger-dependent"
    assert rep["components"] == ["unet", "te1"]
    assert rep["rank"] == 2 and rep["alpha"] == 1.0
    assert rep["category"] == "character"
    assert rep["max_safe_strength"] == pytest.approx(0.9)
    top = rep["trigger_candidates"][0]
    assert top["tag"] == "zkwgirl" and top["share"] == 1.0
    assert any("class token" in e for e in top["evidence"]) and any("first tag" in e for e in top["evidence"])
    # the raw most frequent tags are never presented as the trigger
    assert all(c["tag"] not in ("1girl", "solo") or c["score"] < 0 for c in rep["trigger_candidates"])
    assert any("keep_tokens" in e for e in rep["kind_evidence"])


def test_most_frequent_tags_are_not_the_trigger(tmp_path):
    # 1girl and solo are in every caption; the trigger is rarer as text and pinned first by keep_tokens
    meta = kohya_metadata(
        "sd15",
        output_name="mcx",
        keep_tokens=1,
        dim=2,
        alpha=1.0,
        folders={"img": (30, [("mcxchar", 29), ("1girl", 30), ("solo", 30), ("looking at viewer", 30), ("smile", 20)])},
    )
    rep = inspect_file(lora(tmp_path, "mcx.safetensors", meta=meta))
    assert rep["most_frequent_tags"][:2] == ["1girl", "solo"]
    assert rep["trigger"] == "mcxchar"
    assert any("not the trigger" in w for w in rep["warnings"])


def test_passive_style_has_no_trigger(tmp_path):
    p = lora(tmp_path, "inkwash_style.safetensors", meta=style_meta(), te=False)
    rep = inspect_file(p)
    assert rep["trigger"] is None
    assert rep["trigger_reason"].startswith("no trigger")
    assert rep["kind"] == "passive"
    assert rep["components"] == ["unet"]
    assert rep["category"] == "style"
    assert "bakes cleanly" in rep["baking"]
    assert any("UNet only" in e for e in rep["kind_evidence"])


def test_declared_trigger_from_sidecar(tmp_path):
    p = lora(tmp_path, "glowfx.safetensors", te=False)
    with open(tmp_path / "glowfx.civitai.info", "w") as f:
        json.dump({"trainedWords": ["glowfx", "neon"]}, f)
    rep = inspect_file(p)
    assert rep["trigger"] == "glowfx, neon"
    assert "civitai.info" in rep["trigger_reason"]


@pytest.mark.parametrize(
    "name,category,strength",
    [
        ("age_slider_v1", "slider", 1.5),
        ("cinematic_lighting", "lighting", 0.6),
        ("add_detail", "detail", 1.0),
        ("school_uniform_outfit", "clothing", 0.8),
        ("jojo_pose", "pose", 0.8),
        ("watercolor_style", "style", 0.8),
    ],
)
def test_category_from_the_name(tmp_path, name, category, strength):
    rep = inspect_file(lora(tmp_path, name + ".safetensors", te=False))
    assert rep["category"] == category
    assert rep["max_safe_strength"] == pytest.approx(strength)


def test_category_from_the_captions(tmp_path):
    meta = kohya_metadata(
        "sd15",
        output_name="thing",
        dim=2,
        alpha=1.0,
        folders={"3_a": (20, [("sitting", 19), ("crossed legs", 18), ("1girl", 20), ("chair", 10)])},
    )
    rep = inspect_file(lora(tmp_path, "thing.safetensors", meta=meta, te=False))
    assert rep["category"] == "pose"
    assert "sitting" in " ".join(rep["category_detail"]["evidence"])


# --- algorithms and key formats ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algo,label,rank",
    [
        ("lora", "LoRA", 2),
        ("loha", "LoHa", 2),
        ("lokr", "LoKr", None),
        ("dora", "DoRA", 2),
        ("full", "full (diff)", None),
        ("ia3", "(IA)³", None),
    ],
)
def test_algorithms(tmp_path, algo, label, rank):
    rep = inspect_file(lora(tmp_path, f"{algo}.safetensors", algo=algo, te=False))
    assert rep["algorithms"] == [label]
    assert rep["structure"]["unmatched_count"] == 0
    if rank is not None:
        assert rep["rank"] == rank


def test_locon_conv_layers_and_sdxl_te2(tmp_path):
    meta = kohya_metadata(
        "sdxl", output_name="x", folders={}, dim=2, alpha=1.0, network_args={"conv_dim": 2, "conv_alpha": 0.5}
    )
    rep = inspect_file(lora(tmp_path, "x.safetensors", arch="sdxl", conv=True, meta=meta))
    assert rep["architecture"] == "sdxl"
    assert rep["components"] == ["unet", "te1", "te2"]
    assert set(rep["algorithms"]) == {"LoRA", "LoCon"}
    st = rep["structure"]
    assert st["conv_modules"] > 0 and st["conv_rank"] == 2
    assert st["alpha_source"] == "metadata"
    assert st["alpha_spread"]["distinct"] == [0.5, 1.0]  # conv_alpha for 3x3 kernels, network_alpha elsewhere
    assert "IN04" in st["blocks"] and "BASE" in st["blocks"]


def test_peft_diffusers_names(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {}
    for path, (o, i) in {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320),
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k": (320, 768),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1": (3072, 768),
    }.items():
        t[path + ".lora_A.weight"] = torch.randn(4, i, generator=g)
        t[path + ".lora_B.weight"] = torch.randn(o, 4, generator=g)
    rep = inspect_file(write(tmp_path, "peft.safetensors", t))
    assert rep["architecture"] == "sd15"
    assert rep["algorithms"] == ["LoRA"] and rep["rank"] == 4
    assert rep["alpha"] is None and rep["structure"]["alpha_source"] == "none in file (scale 1)"
    assert rep["components"] == ["unet", "te1"]
    assert rep["structure"]["blocks"] == {"IN01": 1, "OUT11": 1, "BASE": 1}


# --- reading: headers only, alphas, bad input -------------------------------------------------------------


def test_reads_headers_only_when_metadata_states_alpha(tmp_path, monkeypatch):
    p = lora(tmp_path, "zkwgirl_v2.safetensors", meta=character_meta())

    def no_reads(self, *a, **k):
        raise AssertionError("the inspector read tensor data")

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", no_reads)
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read_rows", no_reads)
    rep = inspect_file(p)
    assert rep["alpha"] == 1.0 and rep["structure"]["alpha_source"] == "metadata"


def test_alphas_from_tensors_when_metadata_disagrees(tmp_path):
    sd = make_lora("sd15", "lora", rank=2, alpha=1.0, tiny=False, te=False, conv=False)
    keys = sorted(k for k in sd if k.endswith(".alpha"))
    sd[keys[0]] = torch.tensor(2.0, dtype=torch.float16)  # one module trained (or resized) differently
    meta = kohya_metadata("sd15", output_name="m", dim=8, alpha=4.0, folders={})  # stale: dim 8 is not the shape
    rep = inspect_file(write(tmp_path, "m.safetensors", sd, meta))
    st = rep["structure"]
    assert st["alpha_source"] == "tensors"
    assert rep["alpha"] == 1.0 and st["alpha_spread"]["distinct"] == [1.0, 2.0]


def test_malformed_metadata_warns_and_goes_on(tmp_path):
    meta = character_meta()
    meta["ss_tag_frequency"] = '{"10_zkwgirl woman": {"zkwgirl": 25, '  # cut off
    meta["ss_dataset_dirs"] = "[1, 2]"
    meta["ss_keep_tokens"] = "one"
    rep = inspect_file(lora(tmp_path, "broken.safetensors", meta=meta))
    joined = " ".join(rep["warnings"])
    assert "ss_tag_frequency is not valid JSON" in joined
    assert "ss_dataset_dirs holds a list" in joined
    assert "ss_keep_tokens = 'one'" in joined
    assert rep["architecture"] == "sd15" and rep["rank"] == 2


def test_no_metadata(tmp_path):
    rep = inspect_file(lora(tmp_path, "plain.safetensors"))
    assert rep["trigger"] is None
    assert "no caption statistics" in rep["trigger_reason"]
    assert any("no training metadata" in w for w in rep["warnings"])
    assert rep["training"]["trainer"] == "unknown"


def test_a_damaged_file_in_a_folder_scan(tmp_path, capsys):
    lora(tmp_path, "good.safetensors", te=False)
    p = tmp_path / "cut.safetensors"
    data = open(lora(tmp_path, "cut_src.safetensors", te=False), "rb").read()
    p.write_bytes(data[: len(data) // 2])
    os.remove(tmp_path / "cut_src.safetensors")
    code = main(["inspect", str(tmp_path), "--json", "-q"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 2
    assert [os.path.basename(r["file"]) for r in out] == ["cut.safetensors", "good.safetensors"]
    assert "truncated" in out[0]["error"] and out[1]["rank"] == 2


def test_worker_processes_agree_with_threads(tmp_path):
    for i in range(64):
        meta = character_meta(name=f"char{i}") if i % 2 else style_meta(name=f"style{i}")
        make = make_lora("sd15", "lora", rank=2, alpha=1.0, tiny=True, te=bool(i % 2), seed=i)
        write(tmp_path, f"l{i:02d}.safetensors", make, meta)
    (tmp_path / "zz_bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    threads = inspect_paths([str(tmp_path)], processes=0)
    procs = inspect_paths([str(tmp_path)], processes=2)
    assert len(procs) == 65 and procs[-1]["file"].endswith("zz_bad.safetensors") and "error" in procs[-1]
    assert json.dumps(procs, sort_keys=True, default=str) == json.dumps(threads, sort_keys=True, default=str)
    assert {r.get("kind") for r in procs[:-1]} == {"passive", "trigger-dependent"}


# --- family and strengths --------------------------------------------------------------------------------


def test_pony_lora_on_an_illustrious_checkpoint(tmp_path):
    meta = character_meta(arch="sdxl", base_model="ponyDiffusionV6XL_v6StartWithThisOne.safetensors")
    p = lora(tmp_path, "zkwgirl_v2.safetensors", arch="sdxl", meta=meta, te=False)
    ck = str(tmp_path / "illustriousXL_v01.safetensors")
    # a full-size SDXL header over a sparse data area: the inspector reads only the checkpoint's header
    layout = load_layout(ARCHS["sdxl"].layout)
    entries = [OutEntry(k, "F16", tuple(shape)) for k, (shape, _) in layout.items()]
    hdr = build_header(entries, {"modelspec.title": "Illustrious XL v0.1"})
    with open(ck, "wb") as f:
        f.write(hdr)
        f.truncate(len(hdr) + sum(e.nbytes for e in entries))
    rep = inspect_file(p, checkpoint=ck)
    assert rep["max_safe_strength"] == pytest.approx(0.4)
    assert rep["max_safe_reason"] == "Pony LoRA on an Illustrious checkpoint: cross-lineage ceiling 0.4"
    assert any("keep it at or below 0.4" in w for w in rep["warnings"])


def test_sd15_lora_against_an_sdxl_checkpoint(tmp_path):
    p = lora(tmp_path, "a.safetensors", te=False)
    ck = write_checkpoint(str(tmp_path / "xl.safetensors"), "sdxl", tiny=True, seed=1)
    rep = inspect_file(p, checkpoint=ck)
    assert rep["max_safe_strength"] == 0
    assert any("cannot be used there" in w for w in rep["warnings"])


def test_edited_strength_table(tmp_path):
    data = tmp_path / "data"
    update_settings(str(data), {"max_safe_strength": {"lighting": 0.45}})
    rep = inspect_file(lora(tmp_path, "cinematic_lighting.safetensors", te=False), settings=load_settings(str(data)))
    assert rep["max_safe_strength"] == pytest.approx(0.45)
    with pytest.raises(Exception, match="unknown category 'lightning'"):
        update_settings(str(data), {"max_safe_strength": {"lightning": 0.5}})
    with pytest.raises(Exception, match="outside 0 < strength <= 4"):
        update_settings(str(data), {"max_safe_strength": {"style": -1}})


def test_collection_penalises_tags_shared_by_many_loras(tmp_path):
    for i in range(6):
        meta = kohya_metadata(
            "sd15",
            output_name=f"c{i}",
            dim=2,
            alpha=1.0,
            folders={"img": (10, [("glossy skin", 10), (f"tok{i}qz", 9), ("1girl", 10)])},
        )
        lora(tmp_path, f"c{i}.safetensors", meta=meta, te=False, seed=i)
    reps = inspect_paths([str(tmp_path)])
    cand = {c["tag"]: c for c in reps[0]["trigger_candidates"]}
    assert any("also a top tag of 6 of the 6" in e for e in cand["glossy skin"]["evidence"])
    assert reps[0]["trigger"] == "tok0qz"


# --- weight statistics against an independent computation ------------------------------------------------


def test_block_norms_match_the_baked_difference(tmp_path):
    from safetensors.torch import load_file

    from lib_lorakit.bake import LoraSpec, bake

    # attention layers at full size (fp32) plus the key that marks the text encoder: enough to bake into
    modules = [m for m in kohya_modules("sd15", conv=False, te=False, tiny=False) if "_attn" in m[0]]
    layout = load_layout(ARCHS["sd15"].layout)
    keep = {key for _, _, key, _ in modules} | {
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    }
    keep |= {k[: -len("weight")] + "bias" for k in keep if k[: -len("weight")] + "bias" in layout}
    g = torch.Generator().manual_seed(3)
    ck = write(tmp_path, "base.safetensors", {k: torch.randn(layout[k][0], generator=g) * 0.05 for k in sorted(keep)})
    names = {m[0] for m in modules}
    sd = make_lora("sd15", "lora", rank=4, alpha=2.0, tiny=False, te=False, conv=False, seed=5)
    p = write(tmp_path, "l.safetensors", {k: v for k, v in sd.items() if k.split(".")[0] in names})
    rep = inspect_file(p, checkpoint=ck, weights=True)
    ws = {b["block"]: b for b in rep["weight_stats"]["blocks"]}
    out = str(tmp_path / "baked.safetensors")
    bake(ck, [LoraSpec(p, 1.0)], out, save_dtype="fp32")
    a, b = load_file(ck), load_file(out)
    dsq, wsq = {}, {}
    for k in a:
        d = b[k].double() - a[k].double()
        if d.abs().max() == 0:
            continue
        blk = block_of(k, ARCHS["sd15"]) or "BASE"
        dsq[blk] = dsq.get(blk, 0.0) + float(d.pow(2).sum())
        wsq[blk] = wsq.get(blk, 0.0) + float(a[k].double().pow(2).sum())
    assert set(dsq) == set(ws)
    for blk in dsq:
        assert ws[blk]["delta_norm"] == pytest.approx(math.sqrt(dsq[blk]), rel=1e-4)
        assert ws[blk]["relative"] == pytest.approx(math.sqrt(dsq[blk] / wsq[blk]), rel=1e-4)


def test_block_norms_without_checkpoint(tmp_path):
    sd = make_lora("sd15", "lora", rank=2, alpha=1.0, tiny=False, te=False, conv=False, seed=4)
    p = write(tmp_path, "n.safetensors", sd)
    rep = inspect_paths([p], weights=True)[0]
    expect: dict[str, float] = {}

    for name, _, key, _ in kohya_modules("sd15", conv=False, te=False, tiny=False):
        up, down = sd[name + ".lora_up.weight"].double(), sd[name + ".lora_down.weight"].double()
        scale = float(sd[name + ".alpha"]) / down.shape[0]
        dw = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * scale
        blk = block_of(key, ARCHS["sd15"])
        expect[blk] = expect.get(blk, 0.0) + float(dw.pow(2).sum())
    got = {b["block"]: b["delta_norm"] for b in rep["weight_stats"]["blocks"]}
    assert set(got) == set(expect)
    for blk, v in expect.items():
        assert got[blk] == pytest.approx(math.sqrt(v), rel=1e-5)
    assert rep["weight_stats"]["relative"] is False


# --- user metadata ----------------------------------------------------------------------------------------


def test_user_metadata_is_updated_in_place_atomically(tmp_path):
    p = lora(tmp_path, "zkwgirl_v2.safetensors", meta=character_meta())
    side = tmp_path / "zkwgirl_v2.json"
    side.write_text(json.dumps({"description": "mine", "notes": "keep", "preferred weight": 0.0}))
    res = usermeta.write(p, activation_text="zkwgirl", preferred_weight=0.9, arch="sd15")
    data = json.loads(side.read_text())
    assert data == {
        "description": "mine",
        "notes": "keep",
        "preferred weight": 0.9,
        "activation text": "zkwgirl",
        "sd version": "SD1",
    }
    assert res["before"]["preferred weight"] == 0.0
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    side.write_text("{not json")
    with pytest.raises(Exception, match="not readable JSON"):
        usermeta.write(p, activation_text="x")
    assert side.read_text() == "{not json"


def test_cli_writes_user_metadata(tmp_path, capsys):
    p = lora(tmp_path, "zkwgirl_v2.safetensors", meta=character_meta())
    assert main(["inspect", p, "--write-user-metadata", "-q"]) == 0
    data = json.loads((tmp_path / "zkwgirl_v2.json").read_text())
    assert data["activation text"] == "zkwgirl" and data["preferred weight"] == 0.9
    assert "trigger    'zkwgirl'" in capsys.readouterr().out


def test_render_names_everything(tmp_path):
    rep = inspect_file(lora(tmp_path, "zkwgirl_v2.safetensors", meta=character_meta()))
    text = render(rep)
    for part in (
        "SD1.5",
        "LoRA",
        "rank 2",
        "10_zkwgirl woman: 25 images × 10 repeats",
        "zkwgirl 100%",
        "trigger    'zkwgirl'",
        "trigger-dependent",
        "character",
        "max safe   0.9",
    ):
        assert part in text, part


# --- the CLIP tokenizer --------------------------------------------------------------------------------------


def tiny_vocab(tmp_path):
    """A small CLIP-style BPE table written in Hugging Face's vocab.json/merges.txt format."""
    from lib_lorakit.inspect.tokens import _byte_map

    merges = [
        ("o", "h"),
        ("w", "x</w>"),
        ("g", "i"),
        ("gi", "r"),
        ("gir", "l</w>"),
        ("s", "k"),
        ("sk", "s</w>"),
        ("d", "o"),
        ("do", "g</w>"),
        ("oh", "wx</w>"),
        ("l", "o"),
        ("lo", "n"),
        ("lon", "g</w>"),
    ]
    base = list(_byte_map().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def test_bpe_agrees_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab, merges = tiny_vocab(tmp_path)
    theirs = transformers.CLIPTokenizer(vocab, merges)
    ours = ClipBPE.from_file(merges)
    for text in ["ohwx girl", "sks dog, long hair", "zq_ohwx (girl:1.2)", "Émilie 3d", "GIRL  long"]:
        assert ours.tokenize(text) == theirs.tokenize(text), text


def test_bpe_with_the_real_vocabulary_when_installed():
    bpe = clip_bpe()
    if bpe is None:
        pytest.skip("no CLIP vocabulary on this machine (the WebUI installs one)")
    assert bpe.tokenize("a photo of a girl") == ["a</w>", "photo</w>", "of</w>", "a</w>", "girl</w>"]
    assert len(bpe.word("zkwgirl")) >= 2
    assert rarity("zkwgirl", bpe)[0] > rarity("blue eyes", bpe)[0]


def test_rarity_without_vocabulary():
    assert rarity("1girl", None)[0] == 0
    assert rarity("long hair", None)[0] == 0
    assert rarity("zkwgirl", None)[0] > 0.5
    assert "estimate" in rarity("zkwgirl", None)[1]
