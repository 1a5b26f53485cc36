"""ASGI plumbing for a middleware that reads, rewrites and answers JSON bodies itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable

from starlette.types import Message, Receive, Scope, Send

from cna_vllm.server.schema import ApiError


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The whole request body (``(body, disconnected)``); :class:`BodyTooLarge` over ``limit``."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the client (disconnects)."""
    sent = False

    async def inner() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return inner


def _first(message: Message, receive: Receive) -> Receive:
    """A ``receive`` that yields ``message`` once, then defers to ``receive``."""
    sent = False

    async def inner() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return message
        return await receive()

    return inner


async def until_disconnect(awaitable: Awaitable[None], receive: Receive) -> tuple[Receive, bool]:
    """Await ``awaitable`` while listening for the client: ``(receive to use next, client gone)``.

    Call it once the body has been read (``receive`` then only ever yields a disconnect). If the
    client leaves first, ``awaitable`` is cancelled (a queued request leaves its queue) and
    ``gone`` is true. Errors of ``awaitable`` propagate.
    """
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(receive())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler itself is cancelled: take both down
        task.cancel()
        watcher.cancel()
        raise
    if not task.done():
        if watcher.result()["type"] == "http.disconnect":
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return receive, True
        await task  # some other message: keep it for the app
    if watcher.done():
        task.result()
        return _first(watcher.result(), receive), False
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    task.result()
    return receive, False


def with_length(scope: Scope, length: int) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


async def send_error(send: Send, err: ApiError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(err.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def renaming(send: Send, base: str, name: str) -> Send:
    """A ``send`` that names the variant where vLLM's answer names the base model (``"model":"<base>"``).

    vLLM writes compact JSON (one object per body message, one per SSE event when streaming); an
    unescaped ``"model":"<base>"`` can only be a field, never text inside a JSON string. An answer
    in one body message gets its ``content-length`` fixed; a streamed one has none.
    """
    old = b'"model":' + json.dumps(base, ensure_ascii=False).encode()
    new = b'"model":' + json.dumps(name, ensure_ascii=False).encode()
    start: Message | None = None
    rewrite = True

    async def inner(message: Message) -> None:
        nonlocal start, rewrite
        if message["type"] == "http.response.start":
            start = message  # held until the first body message: its length may change
            return
        if message["type"] == "http.response.body":
            body, more = message.get("body", b""), message.get("more_body", False)
            if start is not None:
                headers = list(start.get("headers", []))
                sized = any(k.lower() == b"content-length" for k, _ in headers)
                rewrite = not (sized and more)  # a sized answer in pieces is left as it is
                if rewrite:
                    body = body.replace(old, new)
                    if sized:
                        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                        headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                start = None
            elif rewrite:
                body = body.replace(old, new)
            message = {**message, "body": body}
        await send(message)

    return inner
