"""``GET /playground``: a steering playground page served by the API server itself.

One static page (``playground/index.html``, ``playground.js``, ``playground.css``, shipped
as package data): plain HTML and vanilla JavaScript, no build step, nothing fetched from
elsewhere. It only talks to the server's public HTTP API (``/v1/models``,
``/v1/circuits``, streaming ``/v1/chat/completions``) through relative URLs, so it works
behind a proxy with a path prefix. vLLM's ``--api-key`` only guards ``/v1/...``; the page
itself is open and asks for the key. ``cna-vllm serve --no-playground`` leaves it out.

No ``from __future__ import annotations`` here: FastAPI must see the real parameter types.
"""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

STATIC_DIR = Path(__file__).resolve().with_name("playground")
"""The page's files (package data ``cna_vllm/server/playground/*``)."""

ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
"""The files served under ``/playground/``, with their media types (nothing else is)."""

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/playground")
async def playground_page() -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{name}")
async def playground_asset(name: str) -> Response:
    if name not in ASSETS:
        body = {"error": {"message": f"no playground file {name!r}", "type": "not_found", "param": None, "code": 404}}
        return JSONResponse(body, status_code=404)
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=HEADERS)
