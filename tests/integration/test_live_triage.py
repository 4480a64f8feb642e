"""A 5-LoRA triage end to end through the API of a running WebUI (LORAKIT_WEBUI_URL; skipped
without it). Needs LORAKIT_WEBUI_LORA_DIR (the host's LoRA folder, on this machine)."""

import hashlib
import os
import urllib.request
import uuid

import pytest
from live import URL, call, wait

pytestmark = pytest.mark.skipif(not URL, reason="LORAKIT_WEBUI_URL is not set")


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_five_lora_triage_through_the_api():
    import torch

    from lib_lorakit.formats.safetensors_io import save_file
    from lib_lorakit.synth import kohya_metadata, make_lora

    root = os.environ.get("LORAKIT_WEBUI_LORA_DIR")
    if not root:
        pytest.skip("set LORAKIT_WEBUI_LORA_DIR")
    arch = os.environ.get("LORAKIT_WEBUI_ARCH", "sd15")
    other = "sdxl" if arch == "sd15" else "sd15"
    sub = f"lorakit-it-triage-{uuid.uuid4().hex[:6]}"
    folder = os.path.join(root, sub)
    os.makedirs(folder)
    paths = []
    for i in range(5):
        meta = kohya_metadata(
            arch,
            output_name=f"style{i}",
            dim=4,
            alpha=4.0,
            folders={"5_art": (20, [("scenery", 10), ("watercolor", 18)])},
        )
        p = os.path.join(folder, f"{sub}-style{i}.safetensors")
        save_file(
            make_lora(arch, "lora", rank=4, alpha=4, tiny=False, conv=False, seed=i, dtype=torch.float16, std=0.01),
            p,
            metadata=meta,
        )
        paths.append(p)
    wrong = os.path.join(folder, f"{sub}-wrongarch.safetensors")
    save_file(
        make_lora(other, "lora", rank=2, alpha=2, tiny=False, conv=False, te=False, seed=9, dtype=torch.float16), wrong
    )
    with open(paths[0][:-12] + ".json", "w") as f:  # a sidecar, archived and restored with its LoRA
        f.write('{"activation text": ""}')
    before = {p: _sha(p) for p in [*paths, paths[0][:-12] + ".json"]}

    status, r = call(
        "POST",
        "/lorakit/v1/triage",
        {"folder": sub, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5, "name": sub},
    )
    assert status == 200, r
    tid = r["triage_id"]
    job = wait(r["job_id"])
    assert job["state"] == "done", job
    status, st = call("GET", f"/lorakit/v1/triage/{tid}")
    assert st["items"] == 5 and st["skipped"] == 1 and st["state"] == "ready", st
    status, items = call("GET", f"/lorakit/v1/triage/{tid}/items")
    assert all(it["image"]["status"] in ("ok", "black", "blank", "blown-out") for it in items)
    assert all(it["strength"] == 0.8 and it["category"] == "style" for it in items)
    with urllib.request.urlopen(f"{URL}/lorakit/v1/triage/{tid}/image/{items[0]['idx']}/lora") as resp:
        assert resp.read(8) == b"\x89PNG\r\n\x1a\n"
    by_path = {it["path"]: it["idx"] for it in items}
    plan = ["no", "yes", "maybe", "no", "yes"]
    decisions = [
        {"idx": by_path[p], "decision": d, "client": "it", "seq": n} for n, (p, d) in enumerate(zip(paths, plan))
    ]
    status, r = call("POST", f"/lorakit/v1/triage/{tid}/decisions", {"decisions": decisions})
    assert status == 200 and r["state"]["counts"] == {"yes": 2, "maybe": 1, "no": 2}, r
    req = urllib.request.Request(f"{URL}/lorakit/v1/triage/{tid}/report")
    md = urllib.request.urlopen(req).read().decode()
    assert "| NO | 2 |" in md and "wrongarch" in md
    status, arch_res = call("POST", f"/lorakit/v1/triage/{tid}/archive", {})
    assert status == 200 and arch_res["loras"] == 2 and arch_res["files"] == 3, arch_res
    assert not os.path.exists(paths[0]) and not os.path.exists(paths[3])
    status, loras = call("GET", "/sdapi/v1/loras")
    assert not any(x["name"] == f"{sub}-style0" for x in loras)  # the host's list is refreshed
    status, back = call("POST", f"/lorakit/v1/triage/{tid}/restore", {"batch": os.path.basename(arch_res["batch"])})
    assert status == 200 and back["state"] == "restored", back
    assert {p: _sha(p) for p in before} == before
