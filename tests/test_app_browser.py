"""The chat app end to end in a real browser: `python app.py` in a subprocess with the embedded
model, Debian's chromium driven by Playwright (scripts/browser-setup.sh installs it; `playwright
install` is never run). Upload an image, ask, and see the verdict badge and the mask.

FORENSICS_SCREENSHOTS=docs/images also writes the README's screenshots (app_*.png) there."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from experts.samples import splice

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser_available():
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: run scripts/browser-setup.sh as root (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # on CI the browser test must run
        pytest.skip(reason)
    pytest.importorskip("playwright", reason="playwright is a dev requirement (requirements-dev.txt)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(browser_available, tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("app") / "app.log").open("w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the app did not start: {Path(log.name).read_text()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_upload_ask_and_see_the_verdict_badge_and_the_mask(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    image = tmp_path / "splice_coffee_cat.jpg"
    image.write_bytes(splice().data)
    shots = tmp_path / "shots"
    shots.mkdir()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1440, "height": 1000},
        )
        try:
            page = context.new_page()
            page.goto(server)
            expect(page.locator("#verdict-badge")).to_have_attribute("data-label", "none", timeout=60_000)
            page.screenshot(path=shots / "app_start.png", full_page=True)

            page.set_input_files("#ask input[type=file]", str(image))
            expect(page.locator("#ask img, #ask .thumbnail-item").first).to_be_visible(timeout=30_000)
            page.locator("#ask textarea").fill("Is this image fake? Show me where.")
            page.keyboard.press("Enter")

            badge = page.locator("#verdict-badge")
            expect(badge).to_have_attribute("data-label", "manipulated", timeout=240_000)
            probability = float(badge.get_attribute("data-probability"))
            assert 0.65 < probability <= 1.0
            assert f"{probability:.0%}" in badge.inner_text()

            masks = page.locator("#masks")
            expect(masks.get_by_text("fused mask (verdict)")).to_be_visible()
            assert masks.locator("img").count() >= 2  # the image and at least one mask over it
            chat = page.locator("#chat")
            # a tool step, whichever tool the model (or the triage plan) chose: "⚙ <tool> (image_1...)"
            expect(chat.get_by_text(re.compile(r"⚙ \w+ \(")).first).to_be_visible()
            expect(chat.get_by_text("manipulated", exact=False).first).to_be_visible()
            expect(page.locator("#evidence [data-expert='jpeg']")).to_be_visible()
            expect(page.locator("#report [aria-label='report.html']")).to_be_visible()
            page.wait_for_timeout(500)
            page.screenshot(path=shots / "app_answer.png", full_page=True)
            page.locator("#masks").screenshot(path=shots / "app_masks.png")
        finally:
            context.close()
    if target := os.environ.get("FORENSICS_SCREENSHOTS"):
        for shot in shots.iterdir():
            shutil.copy(shot, Path(target) / shot.name)
