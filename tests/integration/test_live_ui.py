"""The lorakit tab inside a live WebUI, in a real browser: bake, then the new checkpoint is in the
host's own checkpoint dropdown without a restart. Needs LORAKIT_WEBUI_URL, Playwright and Chromium."""

import os
import re
import uuid

import pytest
from live import URL, call

CHROMIUM = os.environ.get("LORAKIT_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not URL, reason="LORAKIT_WEBUI_URL is not set")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pick(page, elem_id, value):
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.locator(f"#{elem_id} ul li, .options li").filter(has_text=value).first.click()


def host_checkpoint_choices(page) -> str:
    """Open the host's checkpoint dropdown (A1111: #setting_sd_model_checkpoint; Forge: .model_selection)."""
    box = page.locator("#setting_sd_model_checkpoint input, .model_selection input").first
    box.click()
    page.wait_for_timeout(500)
    text = page.locator("ul.options").first.inner_text()
    page.keyboard.press("Escape")
    return text


def test_bake_from_the_tab_updates_the_host_dropdown(base, lora):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium is not installed")
    out = f"lorakit-ui-{uuid.uuid4().hex[:6]}"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(URL)
        # the top-level tab: a button in gradio 3.41 (A1111), role "tab" in gradio 4 (Forge)
        page.locator(".tab-nav button").filter(has_text=re.compile(r"^\s*lorakit\s*$")).first.click(timeout=120_000)
        assert out not in host_checkpoint_choices(page)
        page.locator("#lorakit_bake_refresh").click()  # the LoRA was written after the page loaded
        page.wait_for_timeout(1000)
        pick(page, "lorakit_bake_base", base)
        pick(page, "lorakit_bake_lora", lora)
        page.locator("#lorakit_bake_add").click()
        page.wait_for_function(f"document.querySelector('#lorakit_bake_recipe').innerText.includes('{lora}')")
        page.locator("#lorakit_bake_output textarea, #lorakit_bake_output input").first.fill(out)
        page.locator("#lorakit_bake_run").click()
        page.wait_for_function(
            "document.querySelector('#lorakit_bake_summary').innerText.includes('Saved')", timeout=600_000
        )
        page.wait_for_timeout(1500)  # lorakit.js clicks the host's refresh button
        choices = host_checkpoint_choices(page)
        browser.close()
    assert out + ".safetensors" in choices
    status, models = call("GET", "/sdapi/v1/sd-models")
    assert any(m["title"].startswith(out + ".safetensors") for m in models)


def test_triage_review_in_the_webui():
    """Review the newest triage in the WebUI's lorakit → Triage tab by keyboard (run after test_live_triage)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium is not installed")
    status, triages = call("GET", "/lorakit/v1/triage")
    ready = [t for t in triages if t["state"] == "ready"]
    if not ready:
        pytest.skip("no ready triage on this WebUI (run tests/integration/test_live_triage.py first)")
    tid = ready[0]["id"]
    status, st0 = call("GET", f"/lorakit/v1/triage/{tid}")
    call(
        "POST",
        f"/lorakit/v1/triage/{tid}/decisions",
        {
            "decisions": [
                {"idx": it["idx"], "decision": "clear", "client": "reset", "seq": n}
                for n, it in enumerate(call("GET", f"/lorakit/v1/triage/{tid}/items")[1])
            ]
        },
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(URL)
        page.locator(".tab-nav button").filter(has_text=re.compile(r"^\s*lorakit\s*$")).first.click(timeout=120_000)
        page.locator("#lorakit_tabs button, #lorakit_tabs [role=tab]").filter(has_text="Triage").first.click()
        page.locator("#lorakit_triage_refresh").click()
        page.wait_for_timeout(1000)
        pick(page, "lorakit_triage_pick", tid)
        page.wait_for_selector(f"#lorakit-triage-view[data-loaded='{tid}']", timeout=30_000)
        page.wait_for_function("document.querySelector('#lorakit-triage-img-lora').complete", timeout=30_000)
        n = st0["items"]
        for i in range(n):
            page.keyboard.press("ymn"[i % 3])
            page.wait_for_function(f"window.lorakitTriageTimings.length >= {i + 1}", timeout=10_000)
            page.wait_for_timeout(150)
        page.wait_for_function(
            "JSON.parse(localStorage.getItem('lorakit-triage-pending') || '[]').length === 0", timeout=10_000
        )
        timings = page.evaluate("window.lorakitTriageTimings")
        browser.close()
    status, st = call("GET", f"/lorakit/v1/triage/{tid}")
    assert st["decided"] == n, st
    print(f"\nWebUI triage: {n} pairs, key press -> next pair shown max {max(timings):.1f} ms")


def test_tournament_ranking_in_the_webui():
    """Rank the newest generated tournament blind in the WebUI's lorakit → Tournament tab (run after
    test_live_tournament)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium is not installed")
    status, tours = call("GET", "/lorakit/v1/tournaments")
    ready = [t for t in tours if t["state"] == "ready"]
    if not ready:
        pytest.skip("no generated tournament on this WebUI (run tests/integration/test_live_tournament.py first)")
    tid = ready[0]["id"]
    ev = f"ui-{uuid.uuid4().hex[:4]}"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(URL)
        page.locator(".tab-nav button").filter(has_text=re.compile(r"^\s*lorakit\s*$")).first.click(timeout=120_000)
        page.locator("#lorakit_tabs button, #lorakit_tabs [role=tab]").filter(has_text="Tournament").first.click()
        page.locator("#lorakit_tour_refresh").click()
        page.wait_for_timeout(1000)
        pick(page, "lorakit_tour_pick", tid)
        page.locator("#lorakit_tour_evaluator textarea, #lorakit_tour_evaluator input").first.fill(ev)
        page.wait_for_selector(f"#lorakit-tour-view[data-loaded='{tid}|{ev}']", timeout=30_000)
        n = int(page.locator("#lorakit-tour-head").inner_text().split(" of ")[1].split()[0])
        page.locator("#lorakit-tour-grid").click(position={"x": 1, "y": 1})
        for p in range(n):
            page.wait_for_function(f"document.querySelector('#lorakit-tour-view').dataset.prompt === '{p}'")
            page.keyboard.press("1")
            page.keyboard.press("Enter")
            page.wait_for_function(f"document.querySelector('#lorakit-tour-view').dataset.voted === '{p + 1}'")
        page.wait_for_function(
            "JSON.parse(localStorage.getItem('lorakit-tournament-pending') || '[]').length === 0", timeout=10_000
        )
        browser.close()
    status, b = call("GET", f"/lorakit/v1/tournaments/{tid}/ballot?evaluator={ev}")
    assert b["voted"] == n and all(p["vote"]["ranks"] == ["A"] for p in b["prompts"])
