"""The check every request passes in the API process, whatever the path (patch P5 calls it).

vLLM's ``InputProcessor.process_inputs`` turns every request into an ``EngineCoreRequest``:
offline ``LLM``, ``AsyncLLM``, and every HTTP route of the OpenAI server (``/v1/...``,
``/invocations``, ``vllm_xargs`` sent directly). Here, once per request:

- the spec in ``extra_args["steering"]`` is parsed, bounded and validated against the
  engine's circuits (names and the modes each kind takes), and replaced by its canonical
  wire form; a bad spec raises :class:`SteeringError` (a ``ValueError``: HTTP 400), so the
  worker only ever sees valid specs;
- the cache salt is composed in one place: a steered request gets
  ``cna-steer-<fingerprint>[|<hash of the user's salt>]`` (fixed length, under vLLM's cap),
  and a user salt that starts with the reserved prefix is refused, so no request can reuse
  KV blocks computed under a steering it did not ask for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from cna_vllm.errors import SteeringError
from cna_vllm.steering import SALT_PREFIX, SteeringSpec, is_vector_set

_CATALOGUES: dict[str, dict[str, dict[str, Any]]] = {}
"""API-process registry: vLLM instance id -> {circuit name: {"kind": ..., "parts": {part: count}}}."""


def catalogue(vllm_config: Any) -> dict[str, dict[str, Any]]:
    """The circuits this engine steers with, by name (read once from ``additional_config``)."""
    found = _CATALOGUES.get(vllm_config.instance_id)
    if found is None:
        from cna_vllm.engine.state import EngineSteeringConfig

        cfg = EngineSteeringConfig.from_additional_config(vllm_config.additional_config)
        found = {name: _entry(c) for name, c in cfg.load_circuits().items()}
        _CATALOGUES[vllm_config.instance_id] = found
    return found


def add_to_catalogue(vllm_config: Any, name: str, circuit: Any) -> None:
    """Make a hot-loaded circuit steerable in requests (after every worker has it)."""
    catalogue(vllm_config)[name] = _entry(circuit)


def _entry(circuit: Any) -> dict[str, Any]:
    """What intake needs to validate a spec: the kind, and a neuron circuit's signed-part sizes."""
    if is_vector_set(circuit):
        return {"kind": "caa"}
    return {"kind": "cna", "parts": circuit.part_counts()}


def check_user_salt(user_salt: object) -> None:
    """Refuse a client's cache salt that starts with the reserved :data:`SALT_PREFIX`."""
    if isinstance(user_salt, str) and user_salt.startswith(SALT_PREFIX):
        raise SteeringError(f"cache_salt may not start with {SALT_PREFIX!r}: that prefix is reserved for steering")


def compose_salt(spec: SteeringSpec, user_salt: str | None) -> str | None:
    """The request's cache salt: the user's for unsteered requests; steering-keyed otherwise."""
    check_user_salt(user_salt)
    salt = spec.cache_salt()
    if salt is None:
        return user_salt
    if user_salt:
        salt += "|" + hashlib.sha256(user_salt.encode()).hexdigest()[:16]
    return salt


def check_request(vllm_config: Any, request: Any, circuits: Mapping[str, Any] | None = None) -> None:
    """Validate, canonicalise and salt one ``EngineCoreRequest`` in place (see the module docstring)."""
    params = getattr(request, "sampling_params", None)
    extra = (getattr(params, "extra_args", None) or {}) if params is not None else {}
    raw = extra.get("steering")
    spec = SteeringSpec.parse(raw) if raw else SteeringSpec()
    if spec:
        spec.validate(catalogue(vllm_config) if circuits is None else circuits)
        params.extra_args = {**extra, "steering": spec.to_list()}
    elif "steering" in extra:
        params.extra_args = {k: v for k, v in extra.items() if k != "steering"} or None
    request.cache_salt = compose_salt(spec, request.cache_salt)
