"""/lorakit/v1/inspect on the standalone app: one, several, all; user metadata; the strength table; refusals."""

import json

import pytest
from factories import write

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lib_lorakit.synth import kohya_metadata, make_lora, write_checkpoint  # noqa: E402
from lib_lorakit.ui.standalone import create_app  # noqa: E402


@pytest.fixture
def client(tmp_path):
    ckpt = tmp_path / "models" / "Stable-diffusion"
    loras = tmp_path / "models" / "Lora"
    ckpt.mkdir(parents=True)
    (loras / "chars").mkdir(parents=True)
    write_checkpoint(str(ckpt / "base15.safetensors"), "sd15", tiny=True, seed=1)
    meta = kohya_metadata(
        "sd15",
        output_name="zkwgirl",
        keep_tokens=1,
        dim=2,
        alpha=1.0,
        folders={"10_zkwgirl": (20, [("zkwgirl", 20), ("1girl", 20), ("solo", 20), ("red hair", 19)])},
    )
    write(loras / "chars", "zkwgirl.safetensors", make_lora("sd15", "lora", rank=2, alpha=1.0, tiny=False), meta)
    write(
        loras,
        "film_grain_lighting.safetensors",
        make_lora("sd15", "loha", rank=2, alpha=1.0, tiny=False, te=False, conv=False),
    )
    (loras / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write(outside, "secret.safetensors", make_lora("sd15", "lora", tiny=False, te=False, conv=False))
    app, service = create_app(str(ckpt), str(loras))
    with TestClient(app) as c:
        c.loras = loras
        c.outside = outside
        yield c


def test_inspect_one(client):
    r = client.get("/lorakit/v1/inspect", params={"lora": "chars/zkwgirl"})
    assert r.status_code == 200, r.text
    rep = r.json()
    assert rep["lora"] == "chars/zkwgirl" and rep["architecture"] == "sd15"
    assert rep["trigger"] == "zkwgirl" and rep["kind"] == "trigger-dependent"
    assert rep["trigger_candidates"][0]["tag"] == "zkwgirl" and rep["trigger_candidates"][0]["evidence"]
    assert rep["algorithms"] == ["LoRA", "LoCon"] and rep["rank"] == 2 and rep["components"] == ["unet", "te1"]


def test_inspect_several_and_all(client):
    r = client.post("/lorakit/v1/inspect", json={"loras": ["zkwgirl", "film_grain_lighting"]})
    assert r.status_code == 200, r.text
    reps = r.json()["reports"]
    assert [x["lora"] for x in reps] == ["zkwgirl", "film_grain_lighting"]
    assert reps[1]["algorithms"] == ["LoHa"] and reps[1]["category"] == "lighting"
    assert reps[1]["max_safe_strength"] == 0.6
    every = client.post("/lorakit/v1/inspect", json={"all": True}).json()["reports"]
    by = {x["lora"]: x for x in every}
    assert set(by) == {"broken", "chars/zkwgirl", "film_grain_lighting"}
    assert "not valid JSON" in by["broken"]["error"]


def test_inspect_refusals(client):
    r = client.get("/lorakit/v1/inspect", params={"lora": str(client.outside / "secret.safetensors")})
    assert r.status_code == 403 and "outside the model folders" in r.json()["message"]
    r = client.get("/lorakit/v1/inspect", params={"lora": "zkwgrl"})
    assert r.status_code == 404 and "zkwgirl" in r.json()["message"]  # the nearest name is suggested
    r = client.get("/lorakit/v1/inspect", params={"lora": "broken"})
    assert r.status_code == 400 and "broken.safetensors" in r.json()["message"]
    r = client.get("/lorakit/v1/inspect", params={"lora": "zkwgirl", "checkpoint": "../../etc/passwd"})
    assert r.status_code in (400, 403)


def test_user_metadata_route(client):
    r = client.post(
        "/lorakit/v1/inspect/user-metadata",
        json={"lora": "zkwgirl", "activation_text": "zkwgirl", "preferred_weight": 0.9},
    )
    assert r.status_code == 200, r.text
    data = json.loads((client.loras / "chars" / "zkwgirl.json").read_text())
    assert data == {"activation text": "zkwgirl", "preferred weight": 0.9, "sd version": "SD1"}
    r = client.post("/lorakit/v1/inspect/user-metadata", json={"lora": "zkwgirl", "preferred_weight": 99})
    assert r.status_code == 400 and "outside -4..4" in r.json()["message"]


def test_strength_table_round_trip(client):
    st = client.get("/lorakit/v1/inspect/strengths").json()
    assert st["max_safe_strength"]["slider"] == 1.5 and st["cross_lineage"]["Pony>Illustrious"] == 0.4
    r = client.put("/lorakit/v1/inspect/strengths", json={"max_safe_strength": {"lighting": 0.5}})
    assert r.status_code == 200 and r.json()["max_safe_strength"]["lighting"] == 0.5
    rep = client.get("/lorakit/v1/inspect", params={"lora": "film_grain_lighting"}).json()
    assert rep["max_safe_strength"] == 0.5
    r = client.put("/lorakit/v1/inspect/strengths", json={"cross_lineage": {"Pony": 0.3}})
    assert r.status_code == 400 and "LoRA lineage>checkpoint lineage" in r.json()["message"]
