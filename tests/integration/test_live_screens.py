"""lorakit as a user meets it inside a live WebUI, in a real browser (LORAKIT_WEBUI_URL; Playwright and
Chromium): the first screen of every sub-tab, the txt2img Script and Settings → lorakit; a tournament made
from the form alone and generated; every Workshop operation run from its tab. Screenshots go to
$LORAKIT_SHOTS_DIR (named after $LORAKIT_WEBUI_NAME) when it is set."""

import hashlib
import json
import os
import re
import time
import uuid

import pytest
from live import URL, call, wait

CHROMIUM = os.environ.get("LORAKIT_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("LORAKIT_SHOTS_DIR")
NAME = os.environ.get("LORAKIT_WEBUI_NAME", "webui")
pytestmark = pytest.mark.skipif(not URL, reason="LORAKIT_WEBUI_URL is not set")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"]
VALUE = "el => (el.querySelector('input') || {}).value"
ROWS_JS = "id => [...document.querySelectorAll('#' + id + ' tbody tr')].filter(tr => tr.innerText.trim()).length"
HEADS_JS = (
    "id => [...document.querySelector('#' + id + ' thead').querySelectorAll('th')]"
    ".map(th => th.innerText.trim()).filter(t => t)"
)


def shot(page, what):
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        page.screenshot(path=os.path.join(SHOTS, f"{NAME}-{what}.png"), full_page=True)


def pick(page, elem_id, value):
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.locator(f"#{elem_id} ul li, .options li").filter(has_text=value).first.click()


def fill(page, elem_id, value):
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(str(value))


def sub_tab(page, name):
    page.locator("#lorakit_tabs button, #lorakit_tabs [role=tab]").filter(has_text=name).first.click()
    page.wait_for_timeout(800)


def open_lorakit(pw, console=None):
    sync_api = pytest.importorskip("playwright.sync_api")  # noqa: F841
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium is not installed")
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    if console is not None:
        page.on("console", lambda m: console.append((m.type, m.text, (m.location or {}).get("url", ""))))
    page.goto(URL)
    top = page.locator(".tab-nav button, [role=tab]").filter(has_text=re.compile(r"^\s*lorakit\s*$")).first
    top.click(timeout=180_000)
    page.wait_for_timeout(1500)
    return browser, page


def current_checkpoint() -> str:
    """The host's loaded checkpoint as lorakit names it."""
    _, opts = call("GET", "/sdapi/v1/options")
    _, ckpts = call("GET", "/lorakit/v1/checkpoints")
    sel = opts["sd_model_checkpoint"]
    return next(c["name"] for c in ckpts if sel == c["name"] or sel.startswith(c["name"] + " "))


def is_lorakit(msg) -> bool:
    """A console message whose source or text is lorakit's (its javascript/ file, its elements)."""
    _, text, where = msg
    return "lorakit" in where.lower() or "lorakit" in text.lower()


def test_first_screen_of_every_sub_tab_and_a_clean_console():
    """Each sub-tab as first shown: the host's current checkpoint preselected, tables empty with their real
    headers, selection-dependent controls disabled; no console warning or error from lorakit while the page
    loads, and none at all while its sub-tabs are shown."""
    sync_api = pytest.importorskip("playwright.sync_api")
    cur = current_checkpoint()
    seen, console = {}, []
    with sync_api.sync_playwright() as pw:
        browser, page = open_lorakit(pw, console)
        page.wait_for_function(
            f"(document.querySelector('#lorakit_bake_base input') || {{}}).value === {json.dumps(cur)}",
            timeout=60_000,
        )
        at_load = list(console)
        # gradio Tabs on the page, and inside lorakit's top-level tab (its sub-tabs are buttons and panels)
        tabs_js = "sel => document.querySelectorAll(sel).length"
        seen["gradio_tabs"] = {
            "page": page.evaluate(tabs_js, ".tabs"),
            "lorakit": page.evaluate(tabs_js, "#tab_lorakit .tabs"),
        }
        for tab in ("Bake", "Merge", "Inspect", "Triage", "Tournament", "Workshop"):
            sub_tab(page, tab)
            shot(page, tab.lower())
            ids = {
                "Bake": ["lorakit_bake_base"],
                "Merge": ["lorakit_merge_pick", "lorakit_diff_a"],
                "Inspect": ["lorakit_inspect_ckpt"],
                "Triage": ["lorakit_triage_ckpt"],
                "Tournament": ["lorakit_tour_f_ckpt"],
                "Workshop": ["lorakit_ws_c_ckpt", "lorakit_ws_h_ckpt"],
            }[tab]
            seen[tab] = {i: page.locator(f"#{i}").first.evaluate(VALUE) for i in ids}
            for table in {
                "Bake": ["lorakit_bake_recipe"],
                "Merge": ["lorakit_merge_models"],
                "Inspect": ["lorakit_inspect_summary"],
                "Tournament": ["lorakit_tour_f_candidates"],
            }.get(tab, []):
                seen[tab][table] = (page.evaluate(HEADS_JS, table), page.evaluate(ROWS_JS, table))
            for button in {
                "Inspect": ["lorakit_inspect_run", "lorakit_inspect_write"],
                "Workshop": ["lorakit_ws_x_run", "lorakit_ws_r_run"],
            }.get(tab, []):
                seen[tab][button + ":disabled"] = page.locator(f"#{button}").first.is_disabled()
            if tab == "Inspect":  # the code's default, whatever the host's ui-config.json saved earlier
                seen[tab]["pref"] = float(page.locator("#lorakit_inspect_pref input").first.input_value())
            if tab == "Triage":
                b = page.locator("[data-lorakit-decide]")
                seen[tab]["decide:disabled"] = [b.nth(i).is_disabled() for i in range(b.count())]
                seen[tab]["picked"] = bool(page.locator("#lorakit_triage_pick").first.evaluate(VALUE))
        browser.close()
    on_tabs = console[len(at_load) :]
    if SHOTS:
        with open(os.path.join(SHOTS, f"{NAME}-console-and-values.txt"), "w") as f:
            json.dump({"values": seen, "console_at_load": at_load, "console_on_sub_tabs": on_tabs}, f, indent=1)
    for tab, vals in seen.items():
        for k, v in vals.items():
            if isinstance(v, str) and k != "picked":
                assert v == cur, (tab, k, v)
    assert seen["Bake"]["lorakit_bake_recipe"] == (["LoRA", "strength", "TE strength", "block weights"], 0)
    assert seen["Merge"]["lorakit_merge_models"] == (["checkpoint", "weight"], 0)
    heads = ["LoRA", "model", "network", "rank", "trigger", "kind", "category", "max safe", "warnings"]
    assert seen["Inspect"]["lorakit_inspect_summary"] == (heads, 0)
    assert seen["Tournament"]["lorakit_tour_f_candidates"] == (["#", "candidate", "kind"], 0)
    assert all(v for k, v in seen["Inspect"].items() if k.endswith(":disabled"))
    assert seen["Inspect"]["pref"] == 1.0
    assert all(v for k, v in seen["Workshop"].items() if k.endswith(":disabled"))
    # YES/MAYBE/NO wait for a triage to be picked (the host may hold one from an earlier run)
    assert seen["Triage"]["decide:disabled"] == [not seen["Triage"].pop("picked")] * 3
    bad = ("error", "warning")
    assert [m for m in at_load if m[0] in bad and is_lorakit(m)] == [], at_load
    # what else the page may log while it loads, each the host's: the hosts run offline (gradio fetches
    # iframeResizer from a CDN); gradio 4.40's Tabs warns when it mounts, and its client on every event sent
    # with inputs (Forge's own load events). An error from the host's scripts (A1111's settings hints fail on
    # a setting without a 'label span') fails here.
    offline = "net::ERR_NAME_NOT_RESOLVED"
    assert [m for m in at_load if m[0] == "error" and offline not in m[1]] == [], at_load
    known = ("Attempted to select a non-interactive or hidden tab", "Too many arguments provided for the endpoint")
    assert [m for m in at_load if m[0] == "warning" and not any(k in m[1] for k in known)] == [], at_load
    # gradio 4.40's Tabs warns when it mounts: every such warning is the host's, as lorakit has no Tabs
    assert seen["gradio_tabs"]["lorakit"] == 0, seen["gradio_tabs"]
    # switching sub-tabs sends no inputs and must say nothing
    assert [m for m in on_tabs if m[0] in bad] == [], on_tabs


def test_the_script_panel_and_the_profile_editor_in_settings():
    """The txt2img Script shows its hints whole and the checkpoint's profile; Settings → lorakit edits the
    generation profiles: an applied change is what GET /lorakit/v1/profiles answers, and emptying the field
    goes back to the shipped table."""
    sync_api = pytest.importorskip("playwright.sync_api")
    _, before = call("GET", "/lorakit/v1/profiles")
    steps = before["profiles"]["sd15"]["steps"]
    with sync_api.sync_playwright() as pw:
        browser, page = open_lorakit(pw)
        page.locator(".tab-nav button, [role=tab]").filter(has_text=re.compile(r"^\s*txt2img\s*$", re.I)).first.click()
        page.locator("#script_list input, #script_list select").first.click()
        page.locator("ul.options li").filter(has_text="lorakit").first.click()
        page.wait_for_selector("#lorakit_grid_strengths", state="visible", timeout=30_000)
        page.locator("#lorakit_grid_strengths").scroll_into_view_if_needed()
        shot(page, "txt2img-script")
        hint_fits = page.locator("#lorakit_grid_strengths").first.evaluate(
            "el => [...el.querySelectorAll('*')].every(e => e.scrollWidth <= e.clientWidth + 1 || "
            "getComputedStyle(e).overflowX !== 'hidden')"
        )
        use_profile = page.locator("#lorakit_grid_profile input").first.is_checked()
        page.locator(".tab-nav button, [role=tab]").filter(has_text=re.compile(r"^\s*Settings\s*$")).first.click()
        page.locator("#settings .tab-nav button, #settings [role=tab]").filter(
            has_text=re.compile(r"^\s*lorakit\s*$")
        ).first.click()
        editor = page.locator("#setting_lorakit_generation_profiles")
        editor.wait_for(state="visible", timeout=30_000)
        change = json.dumps({"sd15": {"steps": steps + 5}})
        code = editor.locator(".cm-content, textarea").first
        code.click()
        page.keyboard.press("Control+A")
        page.keyboard.type(change)
        shot(page, "settings-lorakit")
        page.locator("#settings_submit").click()
        page.wait_for_timeout(3000)
        _, after = call("GET", "/lorakit/v1/profiles")
        code.click()
        page.keyboard.press("Control+A")
        page.keyboard.press("Delete")
        page.locator("#settings_submit").click()
        page.wait_for_timeout(3000)
        _, back = call("GET", "/lorakit/v1/profiles")
        browser.close()
    assert hint_fits and use_profile
    assert after["profiles"]["sd15"]["steps"] == steps + 5, after["profiles"]["sd15"]
    assert back["profiles"]["sd15"]["steps"] == steps


def test_a_tournament_from_the_form_is_generated(base, lora):
    """Three candidates with a control, from the form alone (no JSON typed), at 64x64 and 3 steps; generated
    by the WebUI from the tab; every image's infotext carries its cell's seed and the form's settings."""
    sync_api = pytest.importorskip("playwright.sync_api")
    name = f"form-{uuid.uuid4().hex[:4]}"
    with sync_api.sync_playwright() as pw:
        browser, page = open_lorakit(pw)
        sub_tab(page, "Tournament")
        page.locator(".lorakit-panel").get_by_text("New tournament").first.click()
        page.wait_for_timeout(800)
        page.locator("#lorakit_tour_refresh").first.click()
        page.wait_for_timeout(1500)
        pick(page, "lorakit_tour_f_ckpt", base)
        page.locator("#lorakit_tour_f_add").click()
        page.wait_for_function(f"document.querySelector('#lorakit_tour_f_candidates').innerText.includes('{base}')")
        for strength in ("0.5", "1"):
            fill(page, "lorakit_tour_f_loras", f"{lora}:{strength}")
            page.locator("#lorakit_tour_f_add").click()
            page.wait_for_function(
                f"document.querySelector('#lorakit_tour_f_candidates').innerText.includes('{lora}:{strength}') ||"
                f" document.querySelector('#lorakit_tour_f_candidates').innerText.includes('{lora} @ {strength}') ||"
                " [...document.querySelectorAll('#lorakit_tour_f_candidates tbody tr')]"
                f".filter(t => t.innerText.includes('{lora}')).length >= {1 if strength == '0.5' else 2}",
                timeout=30_000,
            )
        page.wait_for_function(
            "(document.querySelector('#lorakit_tour_f_prompts textarea') || {}).value.split('\\n').length >= 5",
            timeout=30_000,
        )
        for box, v in (("steps", 3), ("cfg", 5), ("width", 64), ("height", 64), ("name", name)):
            fill(page, f"lorakit_tour_f_{box}", v)
        shot(page, "tournament-form")
        page.locator("#lorakit_tour_f_create").click()
        page.wait_for_function(
            "document.querySelector('#lorakit_tour_message').innerText.includes('Created')", timeout=60_000
        )
        t0 = time.time()
        page.locator("#lorakit_tour_generate").click()
        page.wait_for_function(
            "document.querySelector('#lorakit_tour_message').innerText.includes('images made')", timeout=900_000
        )
        made = page.locator("#lorakit_tour_message").first.inner_text()
        shot(page, "tournament-generated")
        browser.close()
    took = time.time() - t0
    _, tours = call("GET", "/lorakit/v1/tournaments")
    (rec,) = [t for t in tours if t["name"] == name]
    _, ballot = call("GET", f"/lorakit/v1/tournaments/{rec['id']}/ballot?evaluator=it")
    call("POST", f"/lorakit/v1/tournaments/{rec['id']}/reveal")
    _, t = call("GET", f"/lorakit/v1/tournaments/{rec['id']}")
    spec = t["spec"]
    kinds = [(c.get("control", False), c.get("checkpoint"), c.get("loras") or []) for c in spec["candidates"]]
    assert kinds[0] == (True, base, []), kinds
    assert [[(x["name"], x["strength"]) for x in k[2]] for k in kinds[1:]] == [[(lora, 0.5)], [(lora, 1.0)]], kinds
    s = spec["settings"]
    assert (s["width"], s["height"], s["steps"], s["cfg_scale"]) == (64, 64, 3, 5), s
    n = len(spec["prompts"])
    assert f"{3 * n} images made, 0 failed" in made, made
    assert len(ballot["prompts"]) == n and all(len(p["entries"]) == 3 for p in ballot["prompts"])
    assert "candidate" not in json.dumps(ballot) and lora not in json.dumps(ballot)  # blind
    print(f"\nform tournament: {3 * n} images at 64x64, 3 steps in {took:.0f} s")


def test_every_workshop_operation_from_its_tab(base, lora):
    """Extract (tuned - base), resize, merge LoRAs, clean a checkpoint and hash it, each from the Workshop tab;
    each new file is in the WebUI's own lists at once, and the hash is the file's SHA-256."""
    sync_api = pytest.importorskip("playwright.sync_api")
    ckdir = os.environ.get("LORAKIT_WEBUI_CKPT_DIR")
    if not ckdir:
        pytest.skip("set LORAKIT_WEBUI_CKPT_DIR")
    tag = uuid.uuid4().hex[:6]
    tuned = f"lorakit-it-tuned-{tag}"
    status, r = call(
        "POST", "/lorakit/v1/bake", {"base": base, "loras": [{"name": lora, "strength": 1.0}], "output": tuned}
    )
    assert status == 200, r
    assert wait(r["job_id"])["state"] == "done"
    call("POST", "/sdapi/v1/refresh-checkpoints", {})
    x, rs, mg, cl = (f"lorakit-it-{k}-{tag}" for k in ("x", "rs", "mg", "cl"))
    times = {}

    def run(page, button, what, out):
        """Click and wait for this operation's own result (the summary still shows the previous one)."""
        t0 = time.time()
        page.locator(f"#{button}").click()
        page.wait_for_function(
            "([out]) => { const t = document.querySelector('#lorakit_ws_summary').innerText;"
            " return (t.includes('Saved') && t.includes(out)) || t.startsWith('Error:'); }",
            arg=[out],
            timeout=900_000,
        )
        times[what] = time.time() - t0
        text = page.locator("#lorakit_ws_summary").first.inner_text()
        assert "Saved" in text and out in text, (what, text)
        return text

    with sync_api.sync_playwright() as pw:
        browser, page = open_lorakit(pw)
        sub_tab(page, "Workshop")
        page.locator("#lorakit_ws_refresh").click()
        page.wait_for_timeout(1500)
        pick(page, "lorakit_ws_x_tuned", tuned)
        pick(page, "lorakit_ws_x_base", base)
        fill(page, "lorakit_ws_x_rank", 8)
        fill(page, "lorakit_ws_x_out", x)
        run(page, "lorakit_ws_x_run", "extract", x)
        shot(page, "workshop-extract")
        page.locator(".lorakit-panel").get_by_text("Resize a LoRA").first.click()
        page.locator("#lorakit_ws_refresh").click()
        page.wait_for_timeout(1500)
        pick(page, "lorakit_ws_r_lora", x)
        fill(page, "lorakit_ws_r_rank", 2)
        fill(page, "lorakit_ws_r_out", rs)
        run(page, "lorakit_ws_r_run", "resize", rs)
        page.locator(".lorakit-panel").get_by_text("Merge LoRAs into one LoRA").first.click()
        fill(page, "lorakit_ws_m_inputs", f"{x}:0.5, {lora}:0.5")
        fill(page, "lorakit_ws_m_out", mg)
        run(page, "lorakit_ws_m_run", "lora-merge", mg)
        page.locator(".lorakit-panel").get_by_text("Clean a checkpoint").first.click()
        pick(page, "lorakit_ws_c_ckpt", tuned)
        fill(page, "lorakit_ws_c_out", cl)
        run(page, "lorakit_ws_c_run", "clean", cl)
        shot(page, "workshop-clean")
        page.locator(".lorakit-panel").get_by_text("Hashes").first.click()
        page.locator("#lorakit_ws_refresh").click()
        page.wait_for_timeout(1500)
        pick(page, "lorakit_ws_h_ckpt", cl + ".safetensors")
        page.locator("#lorakit_ws_h_run").click()
        page.wait_for_function("document.querySelector('#lorakit_ws_h_out').innerText.includes('sha256')")
        hashes = json.loads(page.locator("#lorakit_ws_h_out").first.inner_text().strip().strip("`"))
        browser.close()
    _, loras = call("GET", "/sdapi/v1/loras")
    _, models = call("GET", "/sdapi/v1/sd-models")
    assert {x, rs, mg} <= {e["name"] for e in loras}, [e["name"] for e in loras]  # no refresh asked by the test
    assert any(m["title"].startswith(cl + ".safetensors") for m in models)
    h = hashlib.sha256()
    with open(os.path.join(ckdir, cl + ".safetensors"), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    assert hashes["sha256"] == h.hexdigest(), hashes
    print("\nworkshop from the tab: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


def test_bake_then_check_against_runtime(base, lora):
    """Bake in the Bake tab, then "Check against runtime": the WebUI renders base + <lora:…>, the baked
    checkpoint and the base (3 prompts x 2 seeds, 64x64, 3 steps, CFG 30 so a random-weight model
    responds); the verdict and one contact sheet per prompt appear in the tab."""
    sync_api = pytest.importorskip("playwright.sync_api")
    out = f"lorakit-it-doc-{uuid.uuid4().hex[:6]}"
    with sync_api.sync_playwright() as pw:
        browser, page = open_lorakit(pw)
        sub_tab(page, "Bake")
        page.locator("#lorakit_bake_refresh").click()
        page.wait_for_timeout(1500)
        pick(page, "lorakit_bake_base", base)
        pick(page, "lorakit_bake_lora", lora)
        page.locator("#lorakit_bake_add").click()
        page.wait_for_function(f"document.querySelector('#lorakit_bake_recipe').innerText.includes('{lora}')")
        fill(page, "lorakit_bake_output", out)
        page.locator("#lorakit_bake_run").click()
        page.wait_for_function(
            "document.querySelector('#lorakit_bake_summary').innerText.includes('Saved')", timeout=600_000
        )
        page.wait_for_function(
            "(document.querySelector('#lorakit_doctor_baked textarea, #lorakit_doctor_baked input') || {}).value"
            f".includes('{out}')",
            timeout=60_000,
        )
        fill(page, "lorakit_doctor_prompts", "a cat\na lake\na red car")
        for box, v in (("width", 64), ("height", 64), ("steps", 3), ("cfg", 30)):
            fill(page, f"lorakit_doctor_{box}", v)
        t0 = time.time()
        page.locator("#lorakit_doctor_check").click()
        page.wait_for_function(
            "document.querySelector('#lorakit_doctor_verdict').innerText.includes('Verdict')", timeout=900_000
        )
        took = time.time() - t0
        verdict = page.locator("#lorakit_doctor_verdict").first.inner_text()
        page.wait_for_selector("#lorakit_doctor_sheets img", timeout=60_000)
        n_sheets = page.locator("#lorakit_doctor_sheets img").count()
        shot(page, "bake-doctor")
        browser.close()
    print(f"\nbake doctor from the tab in {took:.0f} s: {verdict[:400]}")
    assert "Verdict: identical" in verdict or "Verdict: equivalent" in verdict, verdict
    assert "SSIM" in verdict and "effect ratio" in verdict
    assert n_sheets >= 3
