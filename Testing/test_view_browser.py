"""The browser view (`samv2 view`) in a real headless Chromium (Debian's, driven by Playwright).

The server runs as `samv2 view` on a free loopback port with the bundled lung CT as baseline and
a follow-up SIMULATED from it with a known motion. The test points the baseline view at the
tumour centre through the page's own "go to" control, computes where that point is on the
screen from the view's published XY->RAS geometry, clicks there, reads the matched point from
the page and compares it with the known answer. With a lesion radius set, a click carries a ball
of that radius onto the follow-up (drawn in red, its volume shown). Then Register, then a bad
path (the error must appear in the page). A second server asks for a token: the page and its websocket are refused
without it, paths outside the allowed ones read like missing ones, a FIFO is refused at once, a
second tab is refused while the first is open and starts afresh once it is closed.
Screenshots go to the test's tmp dir and Testing/artifacts/ (git-ignored).
"""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

if not CHROMIUM.exists():
    pytest.skip(f"browser test: {CHROMIUM} is not installed (apt-get install -y chromium; .ci/run does)",
                allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="browser test: playwright is not installed")
pytest.importorskip("trame_slicer", reason="browser test: the 'view' extra (trame-slicer) is not installed")

from playwright.sync_api import sync_playwright
from samv2core.bundled_samples import load_sample
from samv2core.simulate import simulate_followup


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("view")
    baseline, label = load_sample("lung1_ct"), load_sample("lung1_tumor_label")
    pair = simulate_followup(baseline, seed=0)
    sitk.WriteImage(baseline.to_sitk(), str(d / "baseline.nrrd"), True)
    sitk.WriteImage(pair.followup.to_sitk(), str(d / "followup_simulated.nrrd"), True)
    tumour = baseline.index_to_lps(np.argwhere(label.array > 0)[:, ::-1].mean(0))
    return d, pair, tumour


def _start_server(d: Path, *extra: str):
    """`samv2 view` on a free loopback port (--port 0: the server picks one and prints it), run from
    the scans' folder with relative paths, as a user would type them."""
    cmd = [sys.executable, "-m", "samv2core.cli", "view", "--template", "baseline.nrrd",
           "--query", "followup_simulated.nrrd", "--device", "cpu", *extra]
    core = str(Path(__file__).resolve().parents[1] / "SAMv2Core")  # this checkout's samv2core and samv2view
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([core, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=d)
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        found = re.search(r"serving on (http://127\.0\.0\.1:\d+/\S*)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise AssertionError("the server did not start:\n" + "".join(seen[-30:]))


def _screen_position(page, view_index: int, ras) -> tuple[float, float]:
    """Page coordinates of a RAS point on the current slice of the baseline view.

    Waits until the geometry the server published matches the view's size on the page (a
    resize reaches the server, and its new geometry the page, a moment later)."""
    deadline = time.time() + 15
    while True:
        geo = json.loads(page.text_content("#baseline-geometry"))
        width, height = geo["dimensions"][:2]
        box = page.query_selector_all(".v-main img")[view_index].bounding_box()
        if abs(box["width"] - width) < 2 and abs(box["height"] - height) < 2:
            break
        assert time.time() < deadline, f"view size {box} and published geometry {geo['dimensions']} disagree"
        time.sleep(0.2)
    m = np.array(geo["xy_to_ras"])
    a = m[:3, :2]  # RAS = a @ (x, y) + m[:3, 3] on this slice; x, y: pixels from the lower left
    xy, *_ = np.linalg.lstsq(a, np.asarray(ras) - m[:3, 3], rcond=None)
    return box["x"] + xy[0], box["y"] + height - xy[1]


def _view_is_blank(page, view_index: int) -> bool:
    """True when a slice view's picture is one flat colour (no scan shown)."""
    from io import BytesIO

    from PIL import Image

    picture = np.asarray(Image.open(BytesIO(page.query_selector_all(".v-main img")[view_index].screenshot()))
                         .convert("L"), dtype=float)
    h, w = picture.shape
    return float(picture[h // 4: 3 * h // 4, w // 4: 3 * w // 4].std()) < 2.0


def _red_pixels(page, view_index: int) -> int:
    """How many pixels of a view are clearly red (a lesion drawn over a grey scan)."""
    from io import BytesIO

    from PIL import Image

    rgb = np.asarray(Image.open(BytesIO(page.query_selector_all(".v-main img")[view_index].screenshot()))
                     .convert("RGB"), dtype=int)
    return int(((rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 60).sum())


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)


def test_click_on_baseline_finds_the_tumour_on_the_simulated_followup(scans, tmp_path):
    d, pair, tumour = scans
    truth = pair.map_points(tumour[None])[0]
    proc, url = _start_server(d)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            page.goto(url)
            page.wait_for_function("document.querySelector('#status')?.textContent.includes('ready')", timeout=90000)
            assert "SAMv2" in page.title()
            page.fill("#goto-lps", ", ".join(f"{v:.2f}" for v in tumour))
            page.click("#goto-button")
            ras = tumour * [-1, -1, 1]  # the published geometry is in RAS; wait for the tumour's axial slice
            page.wait_for_function("Math.abs(JSON.parse(document.querySelector('#baseline-geometry').textContent)"
                                   f".xy_to_ras[2][3] - {ras[2]}) < 1.0", timeout=10000)
            # linked views: before any match the follow-up shows the same axial position
            follow = json.loads(page.text_content("#followup-geometry"))["xy_to_ras"]
            assert abs(follow[2][3] - ras[2]) < 1.0, "the follow-up view does not follow the baseline"
            x, y = _screen_position(page, 0, ras)
            page.mouse.click(x, y)
            page.wait_for_selector("#match-lps", timeout=60000)
            placed = np.array([float(v) for v in page.text_content("#match-template-lps").split(",")])
            got = np.array([float(v) for v in page.text_content("#match-lps").split(",")])
            assert np.linalg.norm(placed - tumour) < 2.0, f"click landed at {placed}, aimed at {tumour}"
            err = np.linalg.norm(got - truth)
            assert err < 5.0, f"matched {got}, known answer {truth} (error {err:.1f} mm)"
            assert "score" in page.text_content("#match") and page.is_visible("#match-confident")
            follow = json.loads(page.text_content("#followup-geometry"))["xy_to_ras"]
            assert abs(follow[2][3] - got[2]) < 1.0, "the follow-up view did not jump to the match's slice"
            # a point in the air in front of the chest has no anatomical match
            air = tumour + np.array([0.0, -95.0, 0.0])
            x, y = _screen_position(page, 0, air * [-1, -1, 1])
            page.mouse.click(x, y)
            page.wait_for_function("document.querySelector('#match')?.textContent.includes('P2')", timeout=60000)
            assert page.is_visible("#match-not-confident"), page.text_content("#match")
            time.sleep(1.0)  # let the views refresh before the picture
            _shot(page, tmp_path, "view_match.png")

            # with a lesion radius, a click carries a ball of that radius onto the follow-up (the core's propagation)
            page.fill("#lesion-radius", "10")
            time.sleep(0.5)
            x, y = _screen_position(page, 0, ras)
            page.mouse.click(x, y)
            page.wait_for_function("document.querySelector('#lesion')?.textContent.includes('P3')", timeout=60000)
            got = np.array([float(v) for v in page.text_content("#match-lps").split(",")])
            assert np.linalg.norm(got - truth) < 5.0, f"lesion centre {got}, known answer {truth}"
            ball_ml = 4.0 / 3.0 * np.pi * 10.0 ** 3 / 1000.0
            assert abs(float(page.text_content("#lesion-followup-ml")) - ball_ml) < 0.25 * ball_ml
            deadline = time.time() + 15
            while _red_pixels(page, 1) < 50 and time.time() < deadline:  # the region is drawn in red
                time.sleep(0.5)
            _shot(page, tmp_path, "view_lesion.png")
            assert _red_pixels(page, 1) >= 50, "no lesion drawn on the follow-up view"

            page.click("#register-button")
            page.wait_for_function("document.querySelector('#status')?.textContent.includes('registered') "
                                   "|| document.querySelector('#error')", timeout=120000)
            assert not page.query_selector("#error"), page.text_content("#error")
            time.sleep(1.0)
            _shot(page, tmp_path, "view_registered.png")

            page.fill("#template-path", str(d / "no_such_scan.nii.gz"))
            page.click("#open-button")
            page.wait_for_selector("#error", timeout=30000)
            assert "no such scan among the ones this view may open" in page.text_content("#error")
            assert page.is_visible("#goto-button")  # the page is alive
            _shot(page, tmp_path, "view_error.png")
            browser.close()
    finally:
        _stop(proc)


def test_token_allowed_files_and_one_tab_at_a_time(scans, tmp_path):
    d, _, _ = scans
    (d / "allowed").mkdir(exist_ok=True)
    (d / "outside").mkdir(exist_ok=True)
    shutil.copy(d / "followup_simulated.nrrd", d / "outside" / "secret.nrrd")
    if not (d / "allowed" / "link.nrrd").exists():
        os.symlink(d / "outside" / "secret.nrrd", d / "allowed" / "link.nrrd")
        os.mkfifo(d / "allowed" / "pipe.nrrd")
    token = "browser-test-token-0123456789"
    proc, url = _start_server(d, "--data-dir", str(d / "allowed"), "--token", token)
    assert url.endswith(f"?token={token}")
    bare = url.split("?")[0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            stranger = browser.new_context().new_page()
            response = stranger.goto(bare)
            assert response.status == 403 and "token" in stranger.text_content("#refused")
            refused = stranger.evaluate("""url => new Promise(done => { const ws = new WebSocket(url);
                ws.onopen = () => done('open'); ws.onerror = () => done('refused'); })""",
                                        bare.replace("http", "ws") + "ws")
            assert refused == "refused"

            context = browser.new_context(viewport={"width": 1200, "height": 760})
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("document.querySelector('#status')?.textContent.includes('ready')", timeout=90000)
            messages = []
            for path in (d / "outside" / "secret.nrrd", d / "outside" / "missing.nrrd", d / "allowed" / "link.nrrd",
                         d / "allowed" / ".." / "outside" / "secret.nrrd"):
                page.fill("#query-path", str(path))
                page.click("#open-button")
                page.wait_for_function("p => document.querySelector('#error')?.textContent.includes(p)",
                                       arg=str(path), timeout=30000)
                messages.append(page.text_content("#error").replace(str(path), "<path>"))
                page.click("#error .v-alert__close button")
                page.wait_for_selector("#error", state="detached", timeout=10000)
            assert len(set(messages)) == 1 and "no such scan among" in messages[0], messages
            page.fill("#query-path", str(d / "allowed" / "pipe.nrrd"))
            page.click("#open-button")
            # refused at once (a FIFO is never opened); wait for this message, not a stale one
            page.wait_for_function("() => document.querySelector('#error')?.textContent.includes('not a regular file')",
                                   timeout=10000)
            page.fill("#template-path", "typed by the first tab")
            time.sleep(0.5)  # let the typed text reach the server

            second = context.new_page()  # same browser, so it carries the token's cookie
            response = second.goto(bare)
            assert response.status == 409 and "another browser tab" in second.text_content("#refused")
            assert "typed by the first tab" not in second.content()
            page.close()
            response = second.goto(bare)
            assert response.status == 200
            second.wait_for_function("document.querySelector('#status')?.textContent.includes('ready')",
                                     timeout=90000)
            assert second.input_value("#template-path") == str(d / "baseline.nrrd")  # a fresh session
            assert not second.query_selector("#error")
            deadline = time.time() + 20  # the command line's scans are shown again, not an empty scene
            while _view_is_blank(second, 0) and time.time() < deadline:
                time.sleep(0.5)
            _shot(second, tmp_path, "view_second_tab.png")
            assert not _view_is_blank(second, 0), "the second tab's baseline view shows nothing"
            browser.close()
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a `samv2 view` server started by a test (killed if it does not exit in 10 s)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
