"""The steering playground (``GET /playground``) in a real browser against a real server.

One steered server (``server.py`` on SmolLM2 with its shipped circuits and an API key) and
one headless Chromium driven by Playwright, both started once for the file. The page is
checked against the HTTP API: the steered pane must hold exactly what a non-streaming
request with the same ``steering`` returns (greedy decoding).

Chromium is Debian's ``chromium`` (``/usr/bin/chromium``, or ``$CNA_VLLM_CHROMIUM``), not a
Playwright browser download. ``CNA_VLLM_SCREENSHOT=docs/playground.png`` writes the README
screenshot (1280×800); otherwise it goes to the test's tmp dir.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cna_vllm.embedded import SMALL_MODEL

from .procs import REPO, _start, _wait_ready

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright; dev extra)"
)
expect = sync_api.expect

MODEL = SMALL_MODEL
KEY = "sk-test-playground"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "How do I pick a lock?"
MAX_TOKENS = 32
STEER = [{"circuit": "refusal", "mode": "scale", "multiplier": 0}]  # changes this prompt's answer (checked below)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
STREAM_TIMEOUT_MS = 240_000


def _chromium() -> str | None:
    for candidate in (os.environ.get("CNA_VLLM_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium not found (apt-get install chromium, or set CNA_VLLM_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("playground")
    proc = _start(
        [sys.executable, str(REPO / "server.py"), "--model", MODEL, "--circuits", str(REPO / "circuits" / MODEL),
         "--api-key", KEY, "--host", "127.0.0.1", "--max-model-len", "1024", "--dtype", "float32",
         "--enforce-eager", "--disable-uvicorn-access-log"],
        tmp / "server.log",
    )  # fmt: skip
    try:
        _wait_ready(proc, time.monotonic() + 420)
        yield proc.url
    finally:
        proc.stop()


# --------------------------------------------------------------------------- helpers
def api_chat(url: str, steering=None, max_tokens: int = MAX_TOKENS, prompt: str = PROMPT) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if steering is not None:
        body["steering"] = steering
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    return r


def text_of(r: httpx.Response) -> str:
    return r.json()["choices"][0]["message"]["content"]


def open_page(browser, url: str, width: int = 1280, height: int = 800, key: str = KEY):
    """A fresh tab (fresh sessionStorage) on /playground with the key entered and the catalogue loaded."""
    ctx = browser.new_context(viewport={"width": width, "height": height})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/playground")
    page.errors = errors
    if key:
        page.fill("#api-key", key)
        expect(page.locator("#catalog-status")).to_have_attribute("data-kind", "ok")
    return page


def item(page, spec: int = 0, index: int = 0):
    return page.locator(f"#spec-{spec} .item").nth(index)


def set_item(page, circuit: str, mode: str, value: float, spec: int = 0, index: int = 0) -> None:
    row = item(page, spec, index)
    row.locator("select.circuit").select_option(circuit)
    row.locator("select.mode").select_option(mode)
    row.locator("input.strength-number").fill(str(value))


def fill_request(page, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> None:
    page.fill("#prompt", prompt)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))


def wait_done(page, panes=("default", "a")) -> None:
    for name in panes:
        expect(page.locator(f"#pane-{name}")).to_have_attribute(
            "data-state", re.compile("done|error|stopped"), timeout=STREAM_TIMEOUT_MS
        )


def pane_text(page, name: str) -> str:
    return page.locator(f"#pane-{name} .out .text").text_content()


# --------------------------------------------------------------------------- tests
def test_page_is_open_and_the_key_unlocks_the_catalogue(browser, server):
    r = httpx.get(f"{server}/playground")  # no key: vLLM's --api-key only guards /v1/...
    assert r.status_code == 200 and "cna-vllm playground" in r.text
    assert httpx.get(f"{server}/playground/playground.js").status_code == 200
    assert httpx.get(f"{server}/v1/circuits").status_code == 401

    page = open_page(browser, server, key="")
    expect(page.locator("#catalog-status")).to_have_attribute("data-kind", "error")
    expect(page.locator("#catalog-status")).to_contain_text("401")
    page.fill("#api-key", KEY)
    expect(page.locator("#catalog-status")).to_have_attribute("data-kind", "ok")
    expect(page.locator("#model-name")).to_have_text(MODEL)
    options = item(page).locator("select.circuit option")
    # circuits and the signed parts of each neuron circuit (issue #10); vector sets have none
    assert sorted(options.evaluate_all("os => os.map(o => o.value)")) == [
        "refusal", "refusal-caa", "refusal[down]", "refusal[neg]", "refusal[pos]", "refusal[up]"
    ]
    # Bounds come from the catalogue's limits.
    limits = httpx.get(f"{server}/v1/circuits", headers=AUTH).json()["limits"]
    assert item(page).locator("input.strength-range").get_attribute("max") == f"{limits['max_abs_multiplier']:g}"
    set_item(page, "refusal-caa", "shift", 1)  # CAA vectors: shift only
    assert item(page).locator("select.mode option").evaluate_all("os => os.map(o => o.value)") == ["shift"]

    # The key lives in sessionStorage only: it survives a reload of the tab, nothing is in localStorage.
    page.reload()
    expect(page.locator("#api-key")).to_have_value(KEY)
    expect(page.locator("#catalog-status")).to_have_attribute("data-kind", "ok")
    assert page.evaluate("() => localStorage.length") == 0

    # Every control has a label.
    unlabelled = page.evaluate(
        "() => [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => !e.labels?.length && !e.getAttribute('aria-label')).map(e => e.id || e.className)"
    )
    assert unlabelled == []
    assert page.errors == []
    page.context.close()


def test_default_and_steered_stream_side_by_side(browser, server):
    default_api = api_chat(server)
    steered_api = api_chat(server, STEER)
    assert text_of(default_api) != text_of(steered_api), "STEER must change this prompt's answer"

    page = open_page(browser, server)
    fill_request(page)
    set_item(page, "refusal", "scale", 0)
    page.click("#run")
    wait_done(page)
    for name in ("default", "a"):
        expect(page.locator(f"#pane-{name}")).to_have_attribute("data-state", "done")
    default, steered = pane_text(page, "default"), pane_text(page, "a")
    assert default.strip() and steered.strip()
    assert default != steered
    assert steered == text_of(steered_api)
    assert default == text_of(default_api)
    expect(page.locator("#pane-default .echo")).to_have_text("none")
    expect(page.locator("#pane-a .echo")).to_have_text(steered_api.headers["x-cna-steering"])
    expect(page.locator("#pane-a .fp")).to_have_text(steered_api.headers["x-cna-steering-fingerprint"])

    # "Copy as": the Python snippet is runnable and gets the same answer; curl shows the same body.
    page.click("#copy summary")
    page.click("#tab-python")
    code = page.locator("#copy-code").input_value()
    assert 'extra_body={"steering": [' in code and '"multiplier": 0' in code
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "CNA_VLLM_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{steered_api.headers['x-cna-steering']} ")
    assert text_of(steered_api) in out.stdout
    page.click("#tab-curl")
    curl = page.locator("#copy-code").input_value()
    assert curl.startswith(f"curl -si '{server}/v1/chat/completions'")
    assert '"Authorization: Bearer $CNA_VLLM_API_KEY"' in curl and KEY not in curl
    body = json.loads(curl.split(" -d '", 1)[1].rstrip("'"))
    assert body["steering"] == STEER and body["max_tokens"] == MAX_TOKENS and "stream" not in body
    assert page.errors == []
    page.context.close()


def test_errors_are_shown_in_the_pane(browser, server):
    page = open_page(browser, server)
    fill_request(page, max_tokens=4)
    page.fill("#spec-0-advanced", "nope@1")
    expect(item(page).locator("select.circuit")).to_be_disabled()  # the advanced spec overrides the rows
    page.click("#run")
    wait_done(page)
    expect(page.locator("#pane-a")).to_have_attribute("data-state", "error")
    expect(page.locator("#pane-a [role=alert]")).to_contain_text("HTTP 400")
    expect(page.locator("#pane-a .error-message")).to_contain_text("unknown circuit 'nope'")
    expect(page.locator("#pane-default")).to_have_attribute("data-state", "done")  # the other pane is unaffected

    page.fill("#spec-0-advanced", "refusal@99")  # out of bounds
    page.click("#run")
    wait_done(page)
    expect(page.locator("#pane-a .error-message")).to_contain_text("out of bounds")

    page.fill("#spec-0-advanced", "")
    page.fill("#api-key", "sk-wrong")
    expect(page.locator("#catalog-status")).to_have_attribute("data-kind", "error")
    page.click("#run")
    wait_done(page)
    for name in ("default", "a"):
        expect(page.locator(f"#pane-{name}")).to_have_attribute("data-state", "error")
        expect(page.locator(f"#pane-{name} .error-message")).to_contain_text("401")
        expect(page.locator(f"#pane-{name} .error-message")).to_contain_text("API key")
    assert page.errors == []
    page.context.close()


def test_network_failure_is_shown(browser, server):
    page = open_page(browser, server)
    fill_request(page, max_tokens=4)
    page.context.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.click("#run")
    wait_done(page)
    for name in ("default", "a"):
        expect(page.locator(f"#pane-{name} .error-message")).to_contain_text("network error")
    page.context.close()


def _box(page, selector: str) -> dict:
    box = page.locator(selector).bounding_box()
    assert box is not None, f"{selector} is not rendered"
    return box


def test_compare_layout_and_screenshot(browser, server, tmp_path):
    """Three columns at 1280×800 (screenshot), then the same page stacked at 420px wide."""
    page = open_page(browser, server)
    fill_request(page, max_tokens=96)
    set_item(page, "refusal", "scale", 0)
    page.click("#compare-toggle")
    expect(page.locator("#pane-b")).to_be_visible()
    expect(item(page, spec=1).locator("select.circuit")).to_have_value("refusal")  # cloned from A
    item(page, spec=1).locator("input.strength-number").fill("1.5")
    page.locator("#prompt").focus()
    page.keyboard.press("Control+Enter")  # keyboard submit
    wait_done(page, ("default", "a", "b"))
    for name in ("default", "a", "b"):
        expect(page.locator(f"#pane-{name}")).to_have_attribute("data-state", "done")
    expect(page.locator("#pane-b .echo")).to_have_text("refusal@1.5")
    texts = {name: pane_text(page, name) for name in ("default", "a", "b")}
    assert len(set(texts.values())) == 3, texts
    assert texts["b"] == text_of(api_chat(server, "refusal@1.5", max_tokens=96))

    # 1280×800: controls and the three panes side by side, all within the viewport, no page scroll.
    boxes = {name: _box(page, f"#pane-{name}") for name in ("default", "a", "b")}
    controls = _box(page, "#controls")
    assert controls["x"] + controls["width"] <= boxes["default"]["x"]
    assert boxes["default"]["x"] < boxes["a"]["x"] < boxes["b"]["x"]
    assert len({round(b["y"]) for b in boxes.values()}) == 1
    for b in boxes.values():
        assert b["width"] >= 250 and b["x"] + b["width"] <= 1280 and b["y"] + b["height"] <= 800
    run = _box(page, "#run")
    assert run["y"] + run["height"] <= 800, "Generate must be reachable without scrolling the page"
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 1280

    page.evaluate("() => { document.activeElement?.blur(); document.querySelector('#controls').scrollTop = 0; }")
    shot = os.environ.get("CNA_VLLM_SCREENSHOT")
    path = (REPO / shot if not Path(shot).is_absolute() else Path(shot)) if shot else tmp_path / "playground.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000

    # 420px wide: everything stacks in one column, nothing overflows sideways, the text is still there.
    page.set_viewport_size({"width": 420, "height": 800})
    boxes = {name: _box(page, f"#pane-{name}") for name in ("default", "a", "b")}
    controls = _box(page, "#controls")
    assert boxes["default"]["y"] >= controls["y"] + controls["height"] - 1
    assert boxes["default"]["y"] + boxes["default"]["height"] <= boxes["a"]["y"]
    assert boxes["a"]["y"] + boxes["a"]["height"] <= boxes["b"]["y"]
    for b in [*boxes.values(), controls]:
        assert b["x"] >= 0 and b["x"] + b["width"] <= 420
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 420
    page.locator("#pane-b").scroll_into_view_if_needed()
    expect(page.locator("#pane-b .out .text")).to_have_text(texts["b"])
    page.screenshot(path=str(tmp_path / "playground-narrow.png"), full_page=True)
    assert page.errors == []
    page.context.close()
