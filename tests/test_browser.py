"""A real browser on the standalone launcher: pick a base and two LoRAs, bake, see progress and
the report, and find the output file. Needs Playwright and Debian's Chromium (/usr/bin/chromium);
skips without them unless LORAKIT_REQUIRE_BROWSER=1 (CI sets it)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from factories import write

from lib_lorakit.synth import kohya_metadata, make_lora, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("LORAKIT_CHROMIUM", "/usr/bin/chromium")


def need(cond: bool, why: str):
    if not cond:
        if os.environ.get("LORAKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    need(os.path.exists(CHROMIUM) or shutil.which("chromium"), "Chromium is not installed")
    pytest.importorskip("gradio")
    ckpt = tmp_path / "Stable-diffusion"
    loras = tmp_path / "Lora"
    ckpt.mkdir()
    loras.mkdir()
    write_checkpoint(str(ckpt / "sdxl-base.safetensors"), "sdxl", tiny=True, seed=1)
    write(loras, "ink.safetensors", make_lora("sdxl", "lora", seed=2, conv=False))
    write(loras, "grain.safetensors", make_lora("sdxl", "loha", seed=3, conv=False, te=False))
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "lib_lorakit", "ui", "--models-dir", str(ckpt), "--loras-dir", str(loras),
                          "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    import urllib.request

    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "lorakit/v1/jobs", timeout=2)
            break
        except OSError:
            if p.poll() is not None:
                raise AssertionError(p.stdout.read())
            time.sleep(0.3)
    yield url, ckpt
    p.terminate()
    p.wait(timeout=30)


def pick(page, elem_id: str, value: str) -> None:
    """Choose ``value`` in a gradio dropdown (3.41 and 4.x)."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.locator(f"#{elem_id} ul li, .options li").filter(has_text=value).first.click()


def test_bake_in_the_browser(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, ckpt = server
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#lorakit_bake_base", timeout=60_000)
        pick(page, "lorakit_bake_base", "sdxl-base.safetensors")
        pick(page, "lorakit_bake_lora", "ink")
        page.locator("#lorakit_bake_add").click()
        page.wait_for_function("document.querySelector('#lorakit_bake_recipe').innerText.includes('ink')")
        pick(page, "lorakit_bake_lora", "grain")
        page.locator("#lorakit_bake_strength input").fill("0.5")
        page.locator("#lorakit_bake_add").click()
        page.wait_for_function("document.querySelector('#lorakit_bake_recipe').innerText.includes('grain')")
        page.locator("#lorakit_bake_output textarea, #lorakit_bake_output input").first.fill("browser-baked")
        page.locator("#lorakit_bake_run").click()
        # progress shows, then the report
        page.wait_for_selector("#lorakit_bake_progress .lorakit-progress", timeout=30_000)
        page.wait_for_function("document.querySelector('#lorakit_bake_summary').innerText.includes('Saved')",
                               timeout=120_000)
        summary = page.locator("#lorakit_bake_summary").first.inner_text()
        progress = page.locator("#lorakit_bake_progress").first.inner_text()
        browser.close()
    assert "browser-baked.safetensors" in summary
    assert "ink @ 1" in summary and "grain @ 0.5" in summary and "unet" in summary
    assert "done" in progress and "100%" in progress
    assert (ckpt / "browser-baked.safetensors").exists()


def test_merge_in_the_browser(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, ckpt = server
    write_checkpoint(str(ckpt / "sdxl-other.safetensors"), "sdxl", tiny=True, seed=5)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(url)
        page.locator("#lorakit_tabs button, #lorakit_tabs [role=tab]").filter(has_text="Merge").first.click(
            timeout=60_000)
        page.locator("#lorakit_merge_refresh").click()  # the second checkpoint was written after start-up
        page.wait_for_timeout(1000)
        for name in ("sdxl-base.safetensors", "sdxl-other.safetensors"):
            pick(page, "lorakit_merge_pick", name)
            page.locator("#lorakit_merge_add").click()
            page.wait_for_function(f"document.querySelector('#lorakit_merge_models').innerText.includes('{name}')")
        page.locator("#lorakit_merge_preset").click()
        page.wait_for_function("document.querySelector('#lorakit_merge_models').innerText.includes('0.7')")
        page.locator("#lorakit_merge_output textarea, #lorakit_merge_output input").first.fill("browser-merge")
        page.locator("#lorakit_merge_run").click()
        page.wait_for_function("document.querySelector('#lorakit_merge_summary').innerText.includes('Saved')",
                               timeout=120_000)
        summary = page.locator("#lorakit_merge_summary").first.inner_text()
        page.wait_for_selector("#lorakit_merge_chart img", timeout=30_000)
        browser.close()
    assert "browser-merge.safetensors" in summary and "weight 0.7" in summary and "weight 0.2" in summary
    assert "VAE copied from sdxl-base" in summary
    assert (ckpt / "browser-merge.safetensors").exists()


def test_inspect_in_the_browser(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, ckpt = server
    loras = ckpt.parent / "Lora"
    meta = kohya_metadata("sd15", output_name="zkwgirl", keep_tokens=1, dim=2, alpha=1.0, folders={
        "10_zkwgirl": (20, [("zkwgirl", 20), ("1girl", 20), ("solo", 20), ("red hair", 19)])})
    write(loras, "zkwgirl.safetensors", make_lora("sd15", "lora", rank=2, alpha=1.0, tiny=False, conv=False), meta)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(url)
        page.locator("#lorakit_tabs button, #lorakit_tabs [role=tab]").filter(has_text="Inspect").first.click(
            timeout=60_000)
        page.locator("#lorakit_inspect_refresh").click()  # the LoRA was added after start-up
        page.wait_for_timeout(1000)
        pick(page, "lorakit_inspect_lora", "zkwgirl")
        page.locator("#lorakit_inspect_run").click()
        page.wait_for_function("document.querySelector('#lorakit_inspect_report').innerText.includes('trigger-dependent')",
                               timeout=60_000)
        report = page.locator("#lorakit_inspect_report").first.inner_text()
        act = page.locator("#lorakit_inspect_act textarea, #lorakit_inspect_act input").first.input_value()
        page.locator("#lorakit_inspect_write").click()
        page.wait_for_selector("#lorakit_inspect_confirm", state="visible", timeout=30_000)
        assert not (loras / "zkwgirl.json").exists()  # nothing is written before the confirmation
        page.locator("#lorakit_inspect_confirm").click()
        page.wait_for_function("document.querySelector('#lorakit_inspect_written').innerText.includes('Wrote')",
                               timeout=30_000)
        page.locator("#lorakit_inspect_all").click()
        page.wait_for_function("document.querySelector('#lorakit_inspect_report').innerText.includes('LoRAs')",
                               timeout=60_000)
        table = page.locator("#lorakit_inspect_summary").first.inner_text()
        browser.close()
    assert "zkwgirl" in report and "character" in report and act == "zkwgirl"
    data = json.loads((loras / "zkwgirl.json").read_text())
    assert data["activation text"] == "zkwgirl" and data["preferred weight"] == 0.9
    assert "ink" in table and "grain" in table and "zkwgirl" in table
