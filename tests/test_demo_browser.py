"""The Gradio demo in a real browser: ``vtr demo`` in a subprocess, driven by Playwright in headless Chromium.

Uses Debian's ``chromium`` (``.ci/run`` installs it), never Playwright's own browser download; skipped only
when ``/usr/bin/chromium`` is missing. The server is the real command (``python -m vtr.cli demo``) on the
bundled model, offline; every page request must stay on the local server.

Set ``VTR_DEMO_SCREENSHOT=path.png`` to also write the main test's screenshot there (docs/demo.png).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed (/usr/bin/chromium); .ci/run installs it: apt-get install -y chromium",
)

ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
RESULT = "#figures [data-metric=visual_tokens][data-side=reduced]"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(log_path: Path, *extra: str):
    """Start ``vtr demo`` on a free port in a subprocess; yield its URL once it serves, stop it afterwards."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vtr.cli", "demo", "--port", str(port), *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vtr demo exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vtr demo did not serve {url} within 180 s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``vtr demo`` on the bundled model."""
    yield from _serve(tmp_path_factory.mktemp("demo") / "server.log")


@pytest.fixture(scope="module")
def video_server(tmp_path_factory):
    """``vtr demo --model DIR`` on a saved tiny random Qwen2-VL (a video model)."""
    from vtr.testing import tiny_qwen2_vl

    folder = tmp_path_factory.mktemp("qwen")
    model, processor = tiny_qwen2_vl()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    yield from _serve(folder / "server.log", "--model", str(folder))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(server)
    pg.locator("#run").wait_for()
    yield pg
    ctx.close()


def _setup(page, *, prompt: str, recipe: str, mode: str, value: str, example: str = "sample.png") -> None:
    """Choose an example, a prompt, a recipe and a budget (without running)."""
    page.locator("#examples").get_by_text(example).click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('ready')")
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#recipe input").click()
    page.locator(f'li[role=option][aria-label^="{recipe} —"]').click()
    page.locator("#budget-mode label", has_text=mode).click()
    page.locator("#budget-value input").fill(value)


def _cell(page, metric: str, side: str) -> str:
    return page.locator(f"#figures [data-metric={metric}][data-side={side}]").inner_text()


def test_side_by_side_answers_figures_and_overlay(page, server, tmp_path):
    hosts: set[str] = set()
    page.on("request", lambda r: hosts.add(r.url.split("/")[2]))
    page.reload()  # record every request of a fresh page load too
    page.locator("#run").wait_for()
    _setup(page, prompt="What colour is the circle?", recipe="divprune", mode="ratio", value="0.1")
    page.locator("#run").click()
    page.locator(RESULT).wait_for()
    base_answer = page.locator("#baseline-answer textarea").input_value()
    red_answer = page.locator("#reduced-answer textarea").input_value()
    assert base_answer.strip() and red_answer.strip()
    base_tokens = int(_cell(page, "visual_tokens", "baseline"))
    red_tokens = int(_cell(page, "visual_tokens", "reduced"))
    assert red_tokens == round(0.1 * base_tokens) < base_tokens  # one image: DivPrune keeps round(0.1 * N)
    for metric in ("ttft", "total", "prefill_gflops"):
        assert float(_cell(page, metric, "baseline")) > 0 and float(_cell(page, metric, "reduced")) > 0
    assert float(_cell(page, "prefill_gflops", "ratio")) < 1 and float(_cell(page, "kv_cache", "ratio")) < 1
    assert _cell(page, "peak_memory", "ratio") == ""  # CPU RSS: shown, but too rough for a ratio
    stages = page.locator("#stages-table").inner_text()
    assert f"pre_llm: DivPrune\t{red_tokens} ({100 * red_tokens / base_tokens:.1f}%)" in stages
    assert "What colour is the circle?" in page.locator("#figures").inner_text()
    for image in ("#overlay img", "#tokens-plot img"):
        page.wait_for_function(
            f"document.querySelector('{image}') && document.querySelector('{image}').naturalWidth > 0"
        )
    assert "Done" in page.locator("#status").inner_text()
    assert hosts == {server.split("/")[2]}, f"the page reached beyond the local server: {sorted(hosts)}"
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    target = os.environ.get("VTR_DEMO_SCREENSHOT")
    if target:
        shutil.copy(shot, target)
    print(f"screenshot: {shot}")


def test_bad_uploads_show_their_message(page, tmp_path):
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 64)
    page.locator("#media input[type=file]").set_input_files(str(corrupt))
    page.wait_for_function("document.querySelector('#status').innerText.includes('broken.png')")
    assert "broken.png is not a valid image file" in page.locator("#status").inner_text()
    page.locator("#media input[type=file]").wait_for(state="attached")  # the bad file was dropped
    page.locator("#run").click()  # nothing to run on: said so; the server keeps serving
    page.wait_for_function("document.querySelector('#status').innerText.includes('no image or video')")

    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.truncate(21 * 2**20)  # over the 20 MB image limit, under Gradio's cap (the video limit)
    page.locator("#media input[type=file]").set_input_files(str(big))
    page.wait_for_function("document.querySelector('#status').innerText.includes('huge.png')")
    assert "huge.png is 21.0 MB; the limit for images is 20 MB" in page.locator("#status").inner_text()

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    page.locator("#media input[type=file]").set_input_files(str(text))
    # Gradio's upload checks the declared types first (check_upload says the same through the API).
    page.wait_for_function("document.body.innerText.includes('Invalid file type: notes.txt')")

    # After the bad uploads, a good request still works: the server is alive.
    _setup(page, prompt="What colour is the circle?", recipe="random", mode="count", value="30")
    page.locator("#run").click()
    page.locator(RESULT).wait_for()
    assert _cell(page, "visual_tokens", "reduced") == "30"


def test_concurrent_sessions_get_their_own_results(browser, server):
    pages, contexts = [], []
    for _ in range(2):
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        pg = ctx.new_page()
        pg.set_default_timeout(90_000)
        pg.goto(server)
        pg.locator("#run").wait_for()
        contexts.append(ctx)
        pages.append(pg)
    a, b = pages
    _setup(a, prompt="What colour is the circle?", recipe="random", mode="ratio", value="0.5")
    _setup(b, prompt="Is there a triangle?", recipe="divprune", mode="count", value="7")
    a.get_by_text("Advanced").click()  # a longer answer for a, so b's request arrives while a's runs
    a.locator("#max-new-tokens input[type=number]").fill("40")
    a.locator("#max-new-tokens input[type=number]").press("Enter")
    a.locator("#run").click()
    b.locator("#run").click()  # queued behind a's request (one model request at a time)
    a.locator(RESULT).wait_for()
    b.locator(RESULT).wait_for()
    try:
        n = int(_cell(a, "visual_tokens", "baseline"))
        assert _cell(b, "visual_tokens", "baseline") == str(n)
        assert _cell(a, "visual_tokens", "reduced") == str(round(0.5 * n))
        assert _cell(b, "visual_tokens", "reduced") == "7"
        fa, fb = a.locator("#figures").inner_text(), b.locator("#figures").inner_text()
        assert "What colour is the circle?" in fa and "Is there a triangle?" not in fa and "random" in fa
        assert "Is there a triangle?" in fb and "What colour is the circle?" not in fb and "divprune" in fb
        assert "Random" in a.locator("#stages-table").inner_text()
        assert "DivPrune" in b.locator("#stages-table").inner_text()
        for pg in pages:
            assert pg.locator("#baseline-answer textarea").input_value().strip()
            assert pg.locator("#reduced-answer textarea").input_value().strip()
    finally:
        for ctx in contexts:
            ctx.close()


def _write_clip(path: Path, frames: int = 8, size: int = 64) -> Path:
    """A clip with a white square moving left to right (PyAV, MPEG-4)."""
    import av
    import numpy as np

    out = av.open(str(path), "w")
    stream = out.add_stream("mpeg4", rate=4)
    stream.height = stream.width = size
    stream.pix_fmt = "yuv420p"
    for i in range(frames):
        frame = np.full((size, size, 3), 40, np.uint8)
        x = i * (size - 16) // max(frames - 1, 1)
        frame[24:40, x : x + 16] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def test_video_on_a_video_model(browser, video_server, tmp_path):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = ctx.new_page()
        page.set_default_timeout(60_000)
        page.goto(video_server)
        page.locator("#run").wait_for()
        assert "Qwen2-VL family" in page.locator("body").inner_text()
        page.locator("#media input[type=file]").set_input_files(str(_write_clip(tmp_path / "clip.mp4")))
        page.wait_for_function("document.querySelector('#status').innerText.includes('Video ready: clip.mp4')")
        page.locator("#prompt textarea").fill("what moves ?")
        page.locator("#recipe input").click()
        page.locator('li[role=option][aria-label^="divprune —"]').click()
        page.locator("#budget-mode label", has_text="ratio").click()
        page.locator("#budget-value input").fill("0.5")
        page.get_by_text("Advanced").click()
        for slider, value in (("#frames", "4"), ("#max-new-tokens", "3")):
            page.locator(f"{slider} input[type=number]").fill(value)
            page.locator(f"{slider} input[type=number]").press("Enter")
        page.locator("#run").click()
        page.locator(RESULT).wait_for()
        n = int(_cell(page, "visual_tokens", "baseline"))
        assert int(_cell(page, "visual_tokens", "reduced")) == round(0.5 * n) < n  # one budget for the whole video
        assert "on clip.mp4" in page.locator("#figures").inner_text()
        page.wait_for_function(
            "document.querySelector('#overlay img') && document.querySelector('#overlay img').naturalWidth > 0"
        )
        # 4 frames = 2 temporal steps of Qwen2-VL: the overlay is a strip of two frames side by side.
        width, height = page.evaluate(
            "(i => [i.naturalWidth, i.naturalHeight])(document.querySelector('#overlay img'))"
        )
        assert width > 1.5 * height
        assert "Done" in page.locator("#status").inner_text()
    finally:
        ctx.close()
