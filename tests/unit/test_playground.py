"""The steering playground's static files and its router (no engine, no browser)."""

import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cna_vllm.server.playground import ASSETS, STATIC_DIR, router

REPO = Path(__file__).resolve().parents[2]
FILES = ["index.html", "playground.js", "playground.css"]


def test_static_files_exist_and_ship_as_package_data():
    for name in FILES:
        assert (STATIC_DIR / name).is_file(), name
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "server/playground/*" in data["tool"]["setuptools"]["package-data"]["cna_vllm"]
    assert "playwright" in " ".join(data["project"]["optional-dependencies"]["dev"])


@pytest.mark.parametrize("name", FILES)
def test_no_external_urls(name):
    """Works offline: no CDN, no absolute URL, no protocol-relative load, no remote @import."""
    text = (STATIC_DIR / name).read_text()
    assert not re.search(r"https?://", text), "absolute URL in a playground file"
    assert not re.search(r"""(src|href)\s*=\s*["']//""", text), "protocol-relative URL"
    assert "@import" not in text
    assert not re.search(r"""\bimport\s[^;]*?from\s*["'](?!\.)""", text), "bare or absolute ES module import"


def test_page_references_only_relative_assets():
    html = (STATIC_DIR / "index.html").read_text()
    refs = re.findall(r"""(?:src|href)="([^"]+)\"""", html)
    assert refs, "no asset references found"
    for ref in refs:
        assert ref.startswith("playground/") or ref.startswith("data:"), ref
        if ref.startswith("playground/"):
            assert ref.removeprefix("playground/") in ASSETS
    js = (STATIC_DIR / "playground.js").read_text()
    # API calls are relative to the page (a path prefix in front of the server keeps working).
    assert "fetch(API + path" in js and "`${API}v1/chat/completions`" in js
    assert 'fetch("/' not in js and "fetch('/" not in js


def test_every_control_has_a_label():
    """Static controls carry an id named by a <label for>; templated ones get theirs in JS."""
    html = (STATIC_DIR / "index.html").read_text()
    ids = set(re.findall(r"""<(?:input|select|textarea)\b[^>]*\bid="([^"]+)\"""", html))
    labelled = set(re.findall(r"""<label\b[^>]*\bfor="([^"]+)\"""", html))
    assert ids and ids <= labelled, ids - labelled


def _client() -> TestClient:
    app = FastAPI()
    app.include_router(router)
    return TestClient(app)


def test_router_serves_the_page_and_assets():
    client = _client()
    r = client.get("/playground")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "cna-vllm playground" in r.text
    assert "connect-src 'self'" in r.headers["content-security-policy"]
    for name, media in ASSETS.items():
        r = client.get(f"/playground/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"] == media
        assert r.text == (STATIC_DIR / name).read_text()
    # With a trailing slash the page's relative asset URLs would miss: it redirects.
    r = client.get("/playground/", follow_redirects=False)
    assert r.status_code in (307, 308) and r.headers["location"].endswith("/playground")


def test_router_serves_nothing_else():
    client = _client()
    for path in ["/playground/index.html", "/playground/..%2Fplayground.py", "/playground/nope.js"]:
        r = client.get(path)
        assert r.status_code == 404, path


def _plugin_app(**args) -> FastAPI:
    from cna_vllm.engine.config import CONFIG_KEY
    from cna_vllm.server.app import SteeringEndpointPlugin

    app = FastAPI()
    app.state.args = SimpleNamespace(additional_config={CONFIG_KEY: {}}, **args)
    SteeringEndpointPlugin().attach_router(app)
    return app


def test_plugin_attaches_playground_unless_disabled():
    on = TestClient(_plugin_app())
    assert on.get("/playground").status_code == 200
    off = TestClient(_plugin_app(no_playground=True))
    assert off.get("/playground").status_code == 404
    assert off.get("/playground/playground.js").status_code == 404


def test_cli_flag():
    from cna_vllm.server.args import make_parser

    parser = make_parser()
    assert parser.parse_args([]).no_playground is False
    assert parser.parse_args(["--no-playground"]).no_playground is True
