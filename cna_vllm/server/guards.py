"""Checks on a request body before it reaches vLLM: nesting depth, misplaced steering, unsupported options.

A request that asked for steering is answered steered or refused with a clear 4xx, never served
unsteered. vLLM ignores unknown fields, so a ``steering`` key in the wrong place (``"Steering"``,
``messages[0].steering``, ``metadata``, ``chat_template_kwargs``, a query parameter or a header)
would silently do nothing; these checks refuse it and name the right place. Other unknown
fields are left to vLLM. JSON-schema subtrees (``tools``, ``response_format``...) are not
searched: a tool may well have a parameter called ``steering``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

from cna_vllm.server.schema import ApiError

MAX_JSON_DEPTH = 128
"""The deepest nesting of a JSON body accepted (far above any OpenAI body, far below Python's recursion limit)."""
SCHEMA_KEYS = frozenset({"tools", "functions", "response_format", "structured_outputs", "guided_json", "tool_choice"})
"""Top-level fields whose contents are user schemas or names, not request fields: never searched."""
_STEERING_LIKE = frozenset(
    {"steering", "steer", "steeringspec", "steeringconfig", "xsteering", "cnasteering", "xcnasteering"}
)
RIGHT_PLACE = (
    "pass it as the top-level 'steering' field of POST /v1/chat/completions or /v1/completions "
    "(or name a steered model in 'model')"
)


def is_steering_like(key: str) -> bool:
    """``steering`` in any case or spelling with separators (``Steering``, ``x-cna-steering``, ``steering_spec``)."""
    return re.sub(r"[^a-z]", "", key.lower()) in _STEERING_LIKE


def _walk(data: Any) -> Iterator[tuple[str, str]]:
    """``(path, key)`` of every object key, depth-first without recursion; :class:`ApiError` past the depth cap."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(
                f"request body nests deeper than {MAX_JSON_DEPTH} levels", param=None, code="invalid_json"
            )
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else str(key)
                yield where, str(key)
                if isinstance(value, dict | list) and not (depth == 1 and key in SCHEMA_KEYS):
                    stack.append((value, where, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node) if isinstance(v, dict | list))


def _may_nest_deeply(body: bytes) -> bool:
    return body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH


def _may_hold_steering(body: bytes) -> bool:
    return b"steer" in body.lower() or b"\\u" in body  # an escaped key could spell it


def check_body(body: bytes, data: Any, allowed: frozenset[str]) -> None:
    """Refuse a body nested too deeply or carrying a steering-like key outside ``allowed`` (top-level keys).

    Cheap byte tests skip the walk for the common body (no brackets to speak of, no "steer").
    """
    if not (_may_nest_deeply(body) or _may_hold_steering(body)):
        return
    for where, key in _walk(data):
        if where in allowed or where == "vllm_xargs.steering" or not is_steering_like(key):
            continue  # vllm_xargs.steering has its own message (routes that steer) or refusal (others)
        raise ApiError(
            f"steering was found at {where!r}, where it would be ignored; {RIGHT_PLACE}",
            param=where,
            code="misplaced_steering",
        )


def check_query_and_headers(scope: dict[str, Any]) -> None:
    """Refuse a steering-like query parameter or request header (vLLM would ignore both)."""
    query = scope.get("query_string", b"").decode("latin-1")
    for key, _ in parse_qsl(query, keep_blank_values=True):
        if is_steering_like(key):
            raise ApiError(
                f"steering was given as the query parameter {key!r:.40}, where it would be ignored; {RIGHT_PLACE}",
                param=key[:64],
                code="misplaced_steering",
            )
    for raw, _ in scope.get("headers", []):
        name = raw.decode("latin-1")
        if is_steering_like(name):
            raise ApiError(
                f"steering was given as the request header {name!r:.40}, where it would be ignored; {RIGHT_PLACE}",
                param=name[:64],
                code="misplaced_steering",
            )


def check_supported_options(data: dict[str, Any]) -> None:
    """Refuse options under which vLLM would drop a steered request's steering."""
    if data.get("use_beam_search"):
        raise ApiError(
            "steering is not supported with use_beam_search: vLLM's beam search rebuilds the sampling "
            "parameters of every step without the request's steering; leave use_beam_search out "
            "(n > 1 sampling is supported)",
            param="use_beam_search",
            code="steering_unsupported_option",
        )
