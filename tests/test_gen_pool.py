"""A pool of WebUIs (lib_lorakit/gen/pool.py) against loopback fakes with a fixed per-image latency.

Every image's identity is read back from its pixels (the fake encodes seed and strength there,
see fake_gen), never from what the scheduler believes, so a mislabelled image is caught."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from fake_gen import FakeBackend, decode
from fake_sdapi import FakeWebUI

from lib_lorakit.cli import main
from lib_lorakit.errors import Cancelled
from lib_lorakit.gen.backend import GenError, HttpBackend, batchable
from lib_lorakit.gen.pool import Pool, http_pool, split_auth
from lib_lorakit.gen.run import Cell, Run, execute, infotext_seed

LAT = 0.05  # seconds per image in every fake


@pytest.fixture
def dirs(tmp_path):
    ck, lo = tmp_path / "Stable-diffusion", tmp_path / "Lora"
    ck.mkdir()
    lo.mkdir()
    for f in ("base.safetensors", "other.safetensors"):
        (ck / f).write_bytes(b"checkpoint " + f.encode())
    (lo / "styleA.safetensors").write_bytes(b"lora A")
    (lo / "styleB.safetensors").write_bytes(b"lora B")
    return tmp_path, str(ck), str(lo)


@pytest.fixture
def servers(dirs):
    made = []

    def start(n=3, lora_dirs=None, **kw):
        tmp, ck, lo = dirs
        for i in range(n):
            fake = FakeBackend(ck, (lora_dirs or {}).get(i, lo), {"styleA": "healthy", "styleB": "healthy"})
            made.append(FakeWebUI(fake, latency=kw.get("latency", LAT), kill_after=kw.get("kill_after", {}).get(i)))
        return made[-n:]

    yield start
    for s in made:
        s.close()


def cells_for(n_seeds, loras=("styleA",), strengths=(0.5, 1.0), checkpoint=None, first_seed=1):
    out = []
    for seed in range(first_seed, first_seed + n_seeds):
        out.append(Cell("base", "0", "a castle", seed=seed, checkpoint=checkpoint))
        for lo in loras:
            for s in strengths:
                out.append(
                    Cell(
                        lo, str(s), f"a castle, <lora:{lo}:{s}>", seed=seed, checkpoint=checkpoint, lora=lo, strength=s
                    )
                )
    return out


def verify(run):
    """Every cell has an image whose pixels carry its own seed and strength; returns member -> cells."""
    assert run.missing() == []
    by_member: dict[str, list] = {}
    cells = {c.key: c for c in run.cells}
    for key, ev in run.results().items():
        c = cells[key]
        assert ev["status"] == "ok", ev
        assert decode(run.load_image(ev)) == (c.seed, c.strength or 0.0), (c, ev["member"])
        assert infotext_seed(ev["infotext"]) == c.seed
        by_member.setdefault(ev["member"], []).append(c)
    return by_member


def test_throughput_scales_with_members(servers, tmp_path):
    # a long latency against lorakit's few milliseconds of work per image (one process holds the fakes
    # and lorakit, so a busy CPU slows both)
    lat = 0.2
    srv = servers(3, latency=lat)
    for s in srv:
        s.fake.size = 32
    # 24 cells share evenly among 1, 2 or 3 WebUIs (one image more on a member would cost 1/8 at 3)
    cells = [Cell("p", str(i), f"prompt {i}", seed=i) for i in range(24)]  # no two batchable

    def scales(rates):
        return rates[1] >= 0.8 / lat and all(0.9 * n <= rates[n] / rates[1] <= 1.1 * n for n in (2, 3))

    rates: dict[int, float] = {}
    for attempt in range(3):  # the best run of each size: other work on a busy machine only slows a run down
        for n in (1, 2, 3):
            run = Run.create(str(tmp_path / f"out{n}-{attempt}"), "grid", cells)
            rec = execute(run, Pool([HttpBackend(s.url) for s in srv[:n]]))
            assert rec["ok"] == 24 and rec["made_now"] == 24
            verify(run)
            assert min(m["made"] for m in rec["members"]) >= 24 // n - 1  # every member kept busy
            rates[n] = max(rates.get(n, 0.0), len(cells) / rec["seconds"])  # first request to last image written
        if scales(rates):
            break
    assert scales(rates), rates  # 1, 2, 3 WebUIs: within 10% of 1x, 2x, 3x


def test_member_killed_mid_run_loses_and_mislabels_nothing(servers, tmp_path):
    srv = servers(3, kill_after={1: 4})  # the second WebUI vanishes after 4 images, mid-batch
    cells = cells_for(8)  # 24 cells, batches of up to 3 consecutive seeds
    run = Run.create(str(tmp_path), "grid", cells)
    pool = Pool([HttpBackend(s.url) for s in srv], batch_size=3)
    rec = execute(run, pool)
    by = verify(run)
    assert rec["ok"] == 24 and rec["failed"] == 0 and rec["missing"] == 0
    members = {m["name"]: m for m in rec["members"]}
    dead = members[srv[1].url]
    assert dead["state"] == "down" and dead["requeued"] >= 1 and srv[1].dead
    assert len(by.get(srv[1].url, [])) == dead["made"] <= 4
    assert len(by[srv[0].url]) + len(by[srv[2].url]) == 24 - dead["made"]
    # batches were used: a txt2img of more than one image on some live member
    assert any(b.get("batch_size", 1) > 1 for s in srv for m, p, b in s.requests if p == "/sdapi/v1/txt2img")


def test_member_lacking_a_lora_gets_none_of_its_cells(servers, dirs, tmp_path):
    base, ck, lo = dirs
    other = base / "Lora-other"
    other.mkdir()
    (other / "styleA.safetensors").write_bytes(b"lora A, retrained")  # same name, other file
    (other / "styleB.safetensors").write_bytes(b"lora B")
    srv = servers(3, lora_dirs={2: str(other)})
    srv[1].fake.hidden = {"styleA.safetensors"}  # missing on the second WebUI
    cells = cells_for(4, loras=("styleA", "styleB"), strengths=(1.0,))
    run = Run.create(str(tmp_path / "o"), "grid", cells)
    rec = execute(run, Pool([HttpBackend(s.url) for s in srv]))
    by = verify(run)
    for url in (srv[1].url, srv[2].url):  # missing, and another file under the same name
        assert not [c for c in by.get(url, []) if c.lora == "styleA"]
        assert by.get(url), "it still makes the cells it can"
    notes = " ".join(rec["pool_notes"])
    assert f"{srv[1].url} gets no cells needing: LoRA styleA: not listed" in notes
    assert f"{srv[2].url} gets no cells needing: LoRA styleA: another file" in notes
    assert srv[0].url not in notes
    # none of styleA's prompts ever reached the two members
    for s in srv[1:]:
        assert not [b for m, p, b in s.requests if p == "/sdapi/v1/txt2img" and "styleA" in b["prompt"]]


def test_checkpoint_switches_counted_and_minimal(servers, tmp_path):
    srv = servers(3, latency=0.03)
    cells = [Cell("b", str(i), f"p{i}", seed=i, checkpoint="base.safetensors") for i in range(16)]
    cells += [Cell("o", str(i), f"p{i}", seed=i, checkpoint="other.safetensors") for i in range(8)]
    run = Run.create(str(tmp_path), "grid", cells)
    rec = execute(run, Pool([HttpBackend(s.url) for s in srv]))  # all three have base loaded
    by = verify(run)
    # the fakes count a switch whenever a request names another checkpoint than the one loaded
    assert sum(s.fake.switches for s in srv) == 1 == rec["model_switches"]
    assert sum(m["model_switches"] for m in rec["members"]) == 1
    on_other = [u for u, cs in by.items() if any(c.checkpoint == "other.safetensors" for c in cs)]
    assert len(on_other) == 1  # "other" loaded on one member only
    for ev in run.results().values():
        want = "other" if ev["checkpoint"].startswith("other") else "base"
        assert f"Model: {want}" in ev["infotext"]


def test_batches_consecutive_seeds_and_split_the_rest(servers, tmp_path):
    (srv,) = servers(1, latency=0.0)
    cells = [Cell("r", str(s), "a castle", seed=s) for s in (1, 2, 3, 4, 5, 6, 9, 10)]
    run = Run.create(str(tmp_path), "grid", cells)
    execute(run, Pool([HttpBackend(srv.url)], batch_size=4))
    verify(run)
    posted = [(b["seed"], b["batch_size"]) for m, p, b in srv.requests if p == "/sdapi/v1/txt2img"]
    assert sorted(posted) == [(1, 4), (5, 2), (9, 2)]
    assert batchable([{"seed": 3, "p": "x"}, {"seed": 4, "p": "x"}])
    assert not batchable([{"seed": 3, "p": "x"}, {"seed": 5, "p": "x"}])
    assert not batchable([{"seed": 3, "p": "x"}, {"seed": 4, "p": "y"}])
    # a batch gives the images of single requests, pixel for pixel
    be = HttpBackend(srv.url)
    batch = be.txt2img_batch([{"prompt": "a castle", "seed": s, "width": 64, "height": 64} for s in (7, 8, 9)])
    for s, out in zip((7, 8, 9), batch):
        one = be.txt2img({"prompt": "a castle", "seed": s, "width": 64, "height": 64})
        assert out.seed == s == infotext_seed(out.infotext) and out.image.tobytes() == one.image.tobytes()


def test_mislabelled_batch_image_is_refused(servers, tmp_path, monkeypatch):
    (srv,) = servers(1, latency=0.0)
    real = srv.fake.txt2img

    def shifted(req):  # a WebUI that numbers a batch's seeds wrongly from the second image on
        out = real(req)
        if req["seed"] == 2:
            return real({**req, "seed": 99})
        return out

    srv.fake.txt2img = shifted
    cells = [Cell("r", str(s), "a castle", seed=s) for s in (1, 2, 3)]
    run = Run.create(str(tmp_path), "grid", cells)
    rec = execute(run, Pool([HttpBackend(srv.url)], batch_size=3))
    assert rec["ok"] == 2 and rec["failed"] == 1
    bad = [ev for ev in run.results().values() if ev["status"] == "failed"]
    assert "seed 99 for seed 2" in bad[0]["error"]


def test_cancel_stops_every_member_and_rerun_fills_gaps(servers, tmp_path):
    srv = servers(2)
    cells = [Cell("p", str(i), f"prompt {i}", seed=i) for i in range(16)]
    run = Run.create(str(tmp_path), "grid", cells)
    cancel = threading.Event()
    seen = []

    def progress(frac, msg):
        seen.append(msg)
        if frac >= 0.25:
            cancel.set()

    with pytest.raises(Cancelled):
        execute(run, Pool([HttpBackend(s.url) for s in srv]), progress=progress, cancel=cancel)
    assert all(s.interrupts == 1 for s in srv)
    left = len(run.missing())
    assert 0 < left <= 12
    assert any(srv[0].url.split("//")[1] in m and srv[1].url.split("//")[1] in m for m in seen)  # per member
    rec = execute(run, Pool([HttpBackend(s.url) for s in srv]))
    verify(run)
    assert rec["made_now"] == left and rec["ok"] == 16


def test_no_member_answers(tmp_path):
    pool = http_pool(["http://127.0.0.1:9", "http://127.0.0.1:9/x"])
    with pytest.raises(GenError, match="No WebUI of the pool answers"):
        pool.refresh()


def test_split_auth():
    assert split_auth("http://me:pw@127.0.0.1:7860/") == ("http://127.0.0.1:7860", "me:pw")
    assert split_auth("me:pw@http://host:1") == ("http://host:1", "me:pw")
    assert split_auth("127.0.0.1:7861") == ("http://127.0.0.1:7861", None)
    with pytest.raises(GenError, match="given twice"):
        http_pool(["http://a:1", "http://a:1/"])
    with pytest.raises(GenError, match="credentials for"):
        http_pool(["http://a:1"], ["x:y", "z:w"])


def test_grid_command_over_two_webuis_with_auth(dirs, tmp_path, capsys):
    base, ck, lo = dirs
    a = FakeWebUI(FakeBackend(ck, lo), auth="me:secret", latency=0.01)
    b = FakeWebUI(FakeBackend(ck, lo), latency=0.01)
    try:
        host = a.url.split("//")[1]
        code = main(
            [
                "grid",
                "--webui",
                f"http://me:secret@{host}",
                "--webui",
                b.url,
                "--batch-size",
                "2",
                "--lora",
                "styleA",
                "--prompt",
                "a castle",
                "--strengths",
                "0, 1",
                "--seeds",
                "1, 2, 3, 4",
                "--width",
                "64",
                "--height",
                "64",
                "--out",
                str(tmp_path / "runs"),
                "-q",
            ]
        )
        assert code == 0, capsys.readouterr()
        root = tmp_path / "runs" / "lorakit" / "grid"
        (run_dir,) = os.listdir(root)
        run = Run(str(root / run_dir))
        by = verify(run)
        assert set(by) == {a.url, b.url}
        rec = json.load(open(root / run_dir / "run.json"))
        assert rec["batch_size"] == 2 and len(rec["members"]) == 2
    finally:
        a.close()
        b.close()


def test_idle_member_switches_when_that_ends_sooner(servers, tmp_path):
    srv = servers(2, latency=0.02)
    srv[1].fake.loaded = "other.safetensors [abc]"  # the second WebUI has another checkpoint loaded
    cells = [Cell("b", str(i), f"p{i}", seed=i, checkpoint="base.safetensors") for i in range(12)]
    run = Run.create(str(tmp_path), "grid", cells)
    rec = execute(run, Pool([HttpBackend(s.url) for s in srv], switch_cost=4))
    by = verify(run)
    # 12 images for one member with it loaded: 12 > 1 x 4, so the second switches once and helps
    assert srv[1].fake.switches == 1 == rec["model_switches"] and len(by[srv[1].url]) >= 3
    srv[0].fake.loaded = srv[1].fake.loaded = "base.safetensors [abc]"
    srv[1].fake.switches = 0
    few = [Cell("o", str(i), f"q{i}", seed=i, checkpoint="other.safetensors") for i in range(3)]
    run = Run.create(str(tmp_path / "few"), "grid", few)
    srv[1].fake.loaded = "other.safetensors [abc]"
    rec = execute(run, Pool([HttpBackend(s.url) for s in srv], switch_cost=4))
    verify(run)
    # 3 images on the member with it loaded beat a switch: the first WebUI stays idle
    assert rec["model_switches"] == 0 and srv[0].fake.switches == 0
    assert {m["name"]: m["state"] for m in rec["members"]}[srv[0].url] == "idle"


def test_this_webui_and_the_settings_field_webuis_as_one_pool(tmp_path, monkeypatch):
    import importlib.util
    import sys

    from fake_webui import install

    from lib_lorakit import host as host_pkg
    from lib_lorakit.ops.context import HostContext
    from lib_lorakit.synth import write_checkpoint

    fake = install(monkeypatch, str(tmp_path / "host"), "a1111")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a, **k: (object() if n in sys.modules else None) if n in ("backend", "modules_forge") else real(n),
    )
    host_pkg.reset()
    ckdir = tmp_path / "host" / "models" / "Stable-diffusion"
    write_checkpoint(str(ckdir / "base.safetensors"), "sd15", tiny=True)
    host = host_pkg.get_host()
    fake.shared.opts.sd_model_checkpoint = host.list_checkpoints()[0].name
    srv = FakeWebUI(FakeBackend(str(ckdir), str(tmp_path / "host" / "models" / "Lora")), latency=0.02)
    try:
        ctx = HostContext(host)
        assert ctx.backend("x").kind == "host"  # no other WebUI set: the host alone, as before
        fake.shared.opts.lorakit_pool_webuis = f"{srv.url}, "
        pool = ctx.backend("x")
        assert pool.kind == "pool" and [m.name for m in pool.members] == ["this WebUI", srv.url]
        pool.batch_size = pool.user_batch = 2
        cells = [Cell("r", str(s), "a castle", seed=s, settings={"width": 64, "height": 64}) for s in range(1, 13)]
        run = Run.create(str(tmp_path / "out"), "grid", cells)
        rec = execute(run, pool)
        assert rec["ok"] == 12 and rec["model_switches"] == 0
        made = {m["name"]: m["made"] for m in rec["members"]}
        assert made["this WebUI"] > 0 and made[srv.url] > 0
        batched = [p for p, _ in fake.processing.calls if getattr(p, "batch_size", 1) == 2]
        assert batched  # in-process batches through the host's processing
        cells_by_key = {c.key: c for c in run.cells}
        for key, ev in run.results().items():
            seed = cells_by_key[key].seed
            assert infotext_seed(ev["infotext"]) == seed
            px = run.load_image(ev).getpixel((1, 1))
            if ev["member"] == "this WebUI":
                assert px[0] == seed % 256  # the fake host's batch paints each image's own seed
            else:
                assert decode(run.load_image(ev))[0] == seed
        pool.interrupt()  # what a cancel does: every member stops its image, this WebUI too
        assert fake.shared.state.interrupted and srv.interrupts == 1
    finally:
        srv.close()
        host_pkg.reset()


def test_triage_over_a_pool_reports_who_lacked_what(tmp_path, capsys):
    from test_triage import make_loras

    ck, lo = tmp_path / "ck", tmp_path / "Lora"
    ck.mkdir()
    (ck / "base.safetensors").write_bytes(b"x")
    paths = make_loras(str(lo), 3)
    lacking = os.path.splitext(os.path.basename(paths[0]))[0]
    a = FakeWebUI(FakeBackend(str(ck), str(lo)), latency=0.01)
    b = FakeWebUI(FakeBackend(str(ck), str(lo)), latency=0.01)
    b.fake.hidden = {os.path.basename(paths[0])}
    b.fake.refresh()
    data = str(tmp_path / "data")
    try:
        code = main(
            ["triage", "create", "--webui", a.url, "--webui", b.url, "--folder", str(lo), "--seeds", "1, 2"]
            + ["--width", "64", "--height", "64", "--data-dir", data, "--out", str(tmp_path / "runs")]
        )
        out = capsys.readouterr()
        assert code == 0, out.err
        tid = out.out.strip().splitlines()[-1]
        assert f"{b.url}: " in out.err and f"gets no cells needing: LoRA {lacking}: not listed" in out.err
    finally:
        a.close()
        b.close()
    assert not [body for m, p, body in b.requests if p == "/sdapi/v1/txt2img" and lacking in body["prompt"]]
    assert [body for m, p, body in a.requests if p == "/sdapi/v1/txt2img" and lacking in body["prompt"]]
    assert main(["triage", "report", tid, "--data-dir", data]) == 0
    md = capsys.readouterr().out
    assert "## Generated on" in md and f"| {a.url} |" in md and f"| {b.url} |" in md
    assert f"LoRA {lacking}: not listed" in md


def test_mixed_engines_keep_each_seed_on_one_engine(dirs, tmp_path):
    base, ck, lo = dirs
    srv = [
        FakeWebUI(FakeBackend(ck, lo), latency=0.01),
        FakeWebUI(FakeBackend(ck, lo), latency=0.01),
        FakeWebUI(FakeBackend(ck, lo), latency=0.01, engine="forge"),
    ]
    try:
        cells = cells_for(6, strengths=(0.5, 1.0))  # per seed: a baseline and two strengths, compared
        run = Run.create(str(tmp_path), "grid", cells)
        rec = execute(run, Pool([HttpBackend(s.url) for s in srv], batch_size=2))
        by = verify(run)
        engine = {srv[0].url: "a1111", srv[1].url: "a1111", srv[2].url: "forge"}
        seen: dict[int, set] = {}
        for url, cs in by.items():
            for c in cs:
                seen.setdefault(c.seed, set()).add(engine[url])
        assert all(len(e) == 1 for e in seen.values()), seen
        assert {e for s in seen.values() for e in s} == {"a1111", "forge"}  # both engines worked
        assert any("mixes engines" in n for n in rec["pool_notes"])
        assert {m["engine"] for m in rec["members"]} == {"a1111", "forge"}
        # two seeds in batches of 4 (a triage's pairs): one seed per engine, not both on the first
        run = Run.create(str(tmp_path / "two"), "grid", cells_for(2))
        execute(run, Pool([HttpBackend(s.url) for s in srv], batch_size=4))
        seen = {}
        for url, cs in verify(run).items():
            for c in cs:
                seen.setdefault(c.seed, set()).add(engine[url])
        assert sorted(map(sorted, seen.values())) == [["a1111"], ["forge"]], seen
        # a slow engine: the others take over the groups it has not started
        srv[2].latency = 0.3
        run = Run.create(str(tmp_path / "slow"), "grid", cells_for(6))
        rec = execute(run, Pool([HttpBackend(s.url) for s in srv], batch_size=1))
        seen = {}
        for url, cs in verify(run).items():
            for c in cs:
                seen.setdefault(c.seed, set()).add(engine[url])
        assert all(len(e) == 1 for e in seen.values()), seen
        forge_seeds = [s for s, e in seen.items() if e == {"forge"}]
        assert len(forge_seeds) == 1, seen  # its block was two seeds; it started one
    finally:
        for s in srv:
            s.close()


def test_single_requests_through_a_pool_move_past_a_vanished_webui(servers):
    srv = servers(2, latency=0.0)
    pool = Pool([HttpBackend(s.url) for s in srv])
    req = {"prompt": "a castle", "seed": 5, "checkpoint": "base.safetensors", "width": 64, "height": 64}
    assert decode(pool.txt2img(req).image) == (5, 0.0)  # one image, as a plain backend (the bake doctor's way)
    first = next(s for s in srv if any(p == "/sdapi/v1/txt2img" for m, p, b in s.requests))
    first.kill()
    time.sleep(0.2)
    out = pool.txt2img({**req, "seed": 6})
    assert decode(out.image) == (6, 0.0) and infotext_seed(out.infotext) == 6
    assert [m.state for m in pool.members if m.name == first.url] == ["down"]
    assert [o.seed for o in pool.txt2img_batch([{**req, "seed": 7}, {**req, "seed": 8}])] == [7, 8]


def test_member_without_a_sampler_gets_none_of_its_cells(dirs, tmp_path):
    base, ck, lo = dirs
    a = FakeWebUI(FakeBackend(ck, lo), latency=0.01)
    b = FakeWebUI(FakeBackend(ck, lo), latency=0.01, samplers=("Euler a", "Euler"))
    try:
        cells = [Cell("e", str(i), f"p{i}", seed=i, settings={"sampler_name": "Euler"}) for i in range(6)]
        cells += [Cell("d", str(i), f"q{i}", seed=i, settings={"sampler_name": "DPM++ 2M"}) for i in range(6)]
        run = Run.create(str(tmp_path), "grid", cells)
        rec = execute(run, Pool([HttpBackend(a.url), HttpBackend(b.url)]))
        by = verify(run)
        assert by.get(b.url) and not [c for c in by[b.url] if c.settings["sampler_name"] == "DPM++ 2M"]
        assert f"{b.url} gets no cells needing: sampler DPM++ 2M: not offered" in rec["pool_notes"]
    finally:
        a.close()
        b.close()
