"""The check every request passes in the API process, whatever the path (patch P5 calls it).

vLLM's ``InputProcessor.process_inputs`` turns every request into an ``EngineCoreRequest``:
offline ``LLM``, ``AsyncLLM``, and every HTTP route of the OpenAI server (``/v1/...``,
``/invocations``, ``vllm_xargs`` sent directly). Here, once per request:

- the spec in ``extra_args["steering"]`` is read (:meth:`SteeringSpec.from_params`, parsed once
  per process per wire string) and validated against the engine's :class:`Catalogue` (once per
  spec), then written back in its wire form; a bad spec raises :class:`SteeringError`, so the
  worker only ever sees valid specs;
- the cache salt is composed (:meth:`SteeringSpec.cache_salt`), so no request can reuse KV
  blocks computed under a steering it did not ask for.

The registry holds one catalogue per engine instance in this process, read once from the
engine's ``additional_config``; the server and the offline front end share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cna_vllm.catalogue import Catalogue, as_catalogue
from cna_vllm.steering import SteeringSpec

_CATALOGUES: dict[str, Catalogue] = {}
"""API-process registry: vLLM instance id -> the catalogue that engine steers with."""


def catalogue(vllm_config: Any) -> Catalogue:
    """The sources this engine steers with, by name (files read once per process)."""
    found = _CATALOGUES.get(vllm_config.instance_id)
    if found is None:
        from cna_vllm.engine.config import EngineSteeringConfig

        cfg = EngineSteeringConfig.from_additional_config(vllm_config.additional_config)
        found = _CATALOGUES[vllm_config.instance_id] = Catalogue(cfg.load_circuits())
    return found


def add_to_catalogue(vllm_config: Any, name: str, source: Any) -> None:
    """Make a hot-loaded source steerable in requests (after every worker has it)."""
    catalogue(vllm_config).add(name, source)


def check_request(vllm_config: Any, request: Any, circuits: Mapping[str, Any] | None = None) -> None:
    """Validate, canonicalise and salt one ``EngineCoreRequest`` in place (see the module docstring)."""
    params = getattr(request, "sampling_params", None)
    extra = (getattr(params, "extra_args", None) or {}) if params is not None else {}
    spec = SteeringSpec.from_params(params)
    if spec:
        (catalogue(vllm_config) if circuits is None else as_catalogue(circuits)).validate(spec)
        params.extra_args = {**extra, "steering": spec.to_wire()}
    elif "steering" in extra:
        params.extra_args = {k: v for k, v in extra.items() if k != "steering"} or None
    request.cache_salt = spec.cache_salt(request.cache_salt)
