"""The steered engine's configuration: cna-vllm's section of ``additional_config`` and the vLLM kwargs.

:func:`engine_kwargs` is the one way a steered engine is built (offline, async, server): the
checkpoint's architecture is overridden with its ``Steered*`` twin, the sources travel to
the workers pinned by content hash in ``additional_config`` (part of vLLM's compile-cache
hash: different circuits, different graphs), and the steering logits processor, worker
extension and admission scheduler are registered by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cna_vllm import sources
from cna_vllm.errors import SteeringError

CONFIG_KEY = "cna_vllm"
"""Key of cna-vllm's section in vLLM's ``additional_config``."""
DEFAULT_MAX_STEERING_CONFIGS = 64
LOGITS_PROCESSOR_FQCN = "cna_vllm.engine.processor:SteeringLogitsProcessor"
WORKER_EXTENSION_FQCN = "cna_vllm.engine.worker.SteeringWorkerExtension"
SCHEDULER_FQCN = "cna_vllm.engine.admission.SteeringScheduler"
ASYNC_SCHEDULER_FQCN = "cna_vllm.engine.admission.SteeringAsyncScheduler"
STEERED: dict[str, str] = {
    base: f"Steered{base}"
    for base in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
    )
}
"""Stock architecture name -> steered architecture name."""


@dataclass(frozen=True)
class EngineSteeringConfig:
    """cna-vllm's section of ``additional_config``: pinned source files and capacity.

    ``hot_load_neurons`` > 0 reserves that many spare steerable columns per layer (and an
    offset table on every layer) so that sources can be added while the engine runs.
    """

    circuits: dict[str, dict[str, str]]  # name -> {"path": ..., "sha256": ...}
    max_steering_configs: int = DEFAULT_MAX_STEERING_CONFIGS
    hot_load_neurons: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "circuits": self.circuits,
            "max_steering_configs": self.max_steering_configs,
            "hot_load_neurons": self.hot_load_neurons,
        }

    @classmethod
    def from_additional_config(cls, additional: Any) -> EngineSteeringConfig:
        section = additional.get(CONFIG_KEY) if isinstance(additional, Mapping) else None
        if not isinstance(section, Mapping):
            raise SteeringError(
                f"a Steered* architecture needs additional_config={{'{CONFIG_KEY}': {{'circuits': ...}}}}; "
                "use cna_vllm.engine.llm.SteeredLLM or pass --additional-config"
            )
        cap = int(section.get("max_steering_configs", DEFAULT_MAX_STEERING_CONFIGS))
        if cap < 1:
            raise SteeringError(f"max_steering_configs must be >= 1, got {cap}")
        spare = int(section.get("hot_load_neurons", 0))
        if spare < 0:
            raise SteeringError(f"hot_load_neurons must be >= 0, got {spare}")
        return cls(circuits=dict(section.get("circuits", {})), max_steering_configs=cap, hot_load_neurons=spare)

    def load_circuits(self) -> dict[str, sources.Source]:
        """Read each pinned file (:meth:`cna_vllm.sources.Entry.load`: hash and name checked)."""
        return {name: sources.Entry.from_dict(entry).load(name) for name, entry in self.circuits.items()}


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any probe failure means no CUDA
        return False


def engine_kwargs(
    model: str | Path,
    circuits: sources.SourcesArg = None,
    *,
    max_steering_configs: int = DEFAULT_MAX_STEERING_CONFIGS,
    hot_load_neurons: int = 0,
    **vllm_kwargs: Any,
) -> tuple[dict[str, Any], dict[str, sources.Source]]:
    """vLLM engine keyword arguments for a steered engine, and the loaded sources."""
    from cna_vllm.embedded import resolve_model

    model_dir = resolve_model(str(model), progress=False)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in STEERED:
        raise SteeringError(f"architecture {arch!r} is not supported for steering; supported: {', '.join(STEERED)}")
    loaded, entries = sources.resolve(circuits, model_dir)
    kw = dict(vllm_kwargs)
    kw["model"] = str(model_dir)
    kw["hf_overrides"] = {**(kw.get("hf_overrides") or {}), "architectures": [STEERED[arch]]}
    pinned = {name: entry.to_dict() for name, entry in entries.items()}
    section = EngineSteeringConfig(pinned, max_steering_configs, hot_load_neurons).to_dict()
    kw["additional_config"] = {**(kw.get("additional_config") or {}), CONFIG_KEY: section}
    procs = list(kw.get("logits_processors") or [])
    if LOGITS_PROCESSOR_FQCN not in procs:
        procs.append(LOGITS_PROCESSOR_FQCN)
    kw["logits_processors"] = procs
    if not kw.get("worker_extension_cls"):
        kw["worker_extension_cls"] = WORKER_EXTENSION_FQCN  # add_circuit's RPCs
    if not kw.get("scheduler_cls"):  # the row cap is enforced where vLLM admits requests (engine/admission.py)
        use_async = has_cuda() and kw.get("async_scheduling") is not False
        kw["scheduler_cls"] = ASYNC_SCHEDULER_FQCN if use_async else SCHEDULER_FQCN
    if kw.get("speculative_config"):
        raise SteeringError("speculative decoding is not supported with steering")
    # The V1 runner is required (patches P3); the worker refuses V2 loudly if this is overridden.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if has_cuda() and not kw.get("enforce_eager"):
        comp = kw.get("compilation_config") or {}
        if isinstance(comp, dict):
            kw["compilation_config"] = {"cudagraph_mode": "PIECEWISE", **comp}
    return kw, loaded
