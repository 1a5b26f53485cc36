"""Offline and async APIs: vLLM's ``LLM`` / ``AsyncLLM`` with per-request steering.

Both build the engine the same way (:func:`engine_kwargs`): the checkpoint's architecture
is overridden with its ``Steered*`` twin, circuits travel to the workers in
``additional_config`` (part of vLLM's compile-cache hash), and the steering logits
processor is registered. Every steered request gets ``extra_args["steering"]`` and a
steering-keyed ``cache_salt`` (composed at intake, :mod:`cna_vllm.engine.intake`), so
prefix-cache blocks are never shared across specs.

Capacity: at most ``max_steering_configs`` distinct specs may be in flight. Further
requests with new specs *wait* (offline: later waves; async: until a row frees up).

Hot-loading: an engine built with ``hot_load_neurons`` > 0 reserves that many spare
steerable neurons per layer (and an offset table per layer), and :meth:`add_circuit`
adds circuits or CAA vector sets while it runs, through the worker RPCs of
:mod:`cna_vllm.engine.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cna_vllm.circuit import Circuit, scan_dir
from cna_vllm.engine.intake import add_to_catalogue
from cna_vllm.engine.plugin import STEERED
from cna_vllm.engine.state import (
    CONFIG_KEY,
    DEFAULT_MAX_STEERING_CONFIGS,
    LOGITS_PROCESSOR_FQCN,
    EngineSteeringConfig,
    Source,
    file_sha256,
)
from cna_vllm.engine.worker import WORKER_EXTENSION_FQCN
from cna_vllm.errors import CnaError, SteeringError
from cna_vllm.models import cache_dir, resolve_model
from cna_vllm.steering import SteeringSpec, parse_many, union_neurons, vector_layers
from cna_vllm.vectors import VectorSet, load_any

CircuitsArg = Mapping[str, str | Path | Source] | str | Path | None


# --------------------------------------------------------------------------- engine config
def _circuit_file(name: str, circuit: Source) -> Path:
    """A content-addressed copy of ``circuit`` named ``name`` in the cache (stable across runs)."""
    root = cache_dir() / "engine-circuits"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        path = replace(circuit, name=name).save(Path(tmp) / "c.safetensors")
        final = root / f"{name}-{file_sha256(path)[:16]}.safetensors"
        if not final.exists():
            path.rename(final)
    return final


def prepare_circuits(circuits: CircuitsArg, model_dir: str | Path) -> tuple[dict[str, Source], dict]:
    """Load, validate against the model and locate the circuits: ``(by name, config entries)``."""
    if circuits is None:
        loaded: dict[str, Source] = {}
        files: dict[str, Path] = {}
    elif isinstance(circuits, str | Path):
        found = scan_dir(circuits)
        if not found:
            raise SteeringError(f"no circuits (*.safetensors) in {circuits}")
        loaded = {name: circuit for name, (_, circuit) in found.items()}
        files = {name: path for name, (path, _) in found.items()}
    else:
        loaded, files = {}, {}
        for name, value in circuits.items():
            if isinstance(value, Circuit | VectorSet):
                loaded[name] = value
            else:
                loaded[name] = load_any(value)
                if loaded[name].name == name:
                    files[name] = Path(value).resolve()
    entries = {}
    for name, circuit in loaded.items():
        entries[name] = circuit_entry(name, circuit, model_dir, files.get(name))
    return loaded, entries


def circuit_entry(name: str, circuit: Source, model_dir: str | Path, path: Path | None = None) -> dict[str, str]:
    """Validate ``circuit`` for the model; its engine config entry ``{"path", "sha256"}``."""
    circuit.validate_for(model_dir)
    path = path or _circuit_file(name, circuit)
    return {"path": str(path), "sha256": file_sha256(path)}


def hot_load_entry(source: str | Path | Source, model_dir: str | Path) -> tuple[str, Source, dict[str, str]]:
    """``(name, circuit, entry)`` for a circuit to add to a running engine (validated for the model)."""
    if isinstance(source, Circuit | VectorSet):
        return source.name, source, circuit_entry(source.name, source, model_dir)
    path = Path(source).resolve()
    circuit = load_any(path)
    return circuit.name, circuit, circuit_entry(circuit.name, circuit, model_dir, path)


def engine_kwargs(
    model: str | Path,
    circuits: CircuitsArg = None,
    *,
    max_steering_configs: int = DEFAULT_MAX_STEERING_CONFIGS,
    hot_load_neurons: int = 0,
    **vllm_kwargs: Any,
) -> tuple[dict[str, Any], dict[str, Source]]:
    """vLLM engine keyword arguments for a steered engine, and the loaded circuits."""
    model_dir = resolve_model(str(model), progress=False)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in STEERED:
        raise SteeringError(f"architecture {arch!r} is not supported for steering; supported: {', '.join(STEERED)}")
    loaded, entries = prepare_circuits(circuits, model_dir)
    kw = dict(vllm_kwargs)
    kw["model"] = str(model_dir)
    kw["hf_overrides"] = {**(kw.get("hf_overrides") or {}), "architectures": [STEERED[arch]]}
    section = EngineSteeringConfig(entries, max_steering_configs, hot_load_neurons).to_dict()
    kw["additional_config"] = {**(kw.get("additional_config") or {}), CONFIG_KEY: section}
    procs = list(kw.get("logits_processors") or [])
    if LOGITS_PROCESSOR_FQCN not in procs:
        procs.append(LOGITS_PROCESSOR_FQCN)
    kw["logits_processors"] = procs
    if not kw.get("worker_extension_cls"):
        kw["worker_extension_cls"] = WORKER_EXTENSION_FQCN  # add_circuit's RPCs
    if not kw.get("scheduler_cls"):  # the row cap is enforced where vLLM admits requests (engine/admission.py)
        from cna_vllm.engine.admission import ASYNC_SCHEDULER_FQCN, SCHEDULER_FQCN

        use_async = has_cuda() and kw.get("async_scheduling") is not False
        kw["scheduler_cls"] = ASYNC_SCHEDULER_FQCN if use_async else SCHEDULER_FQCN
    if kw.get("speculative_config"):
        raise SteeringError("speculative decoding is not supported with steering")
    # The V1 runner is required (patches.P3); the worker refuses V2 loudly if this is overridden.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if has_cuda() and not kw.get("enforce_eager"):
        comp = kw.get("compilation_config") or {}
        if isinstance(comp, dict):
            kw["compilation_config"] = {"cudagraph_mode": "PIECEWISE", **comp}
    return kw, loaded


def steering_info(circuits: Mapping[str, Source], capacity: int) -> dict[str, Any]:
    """What the engine holds for steering: circuits, sparse-index size and row-table memory (TP=1, no hot-load)."""
    union = union_neurons(circuits.values())
    k = sum(len(v) for v in union.values())
    offsets = vector_layers(circuits.values())
    hidden = max((c.vectors.shape[1] for c in circuits.values() if isinstance(c, VectorSet)), default=0)
    return {
        "circuits": {name: len(c) for name, c in circuits.items()},
        "steerable_neurons": k,
        "layers": sorted(union),
        "offset_layers": offsets,
        "max_steering_configs": capacity,
        # float32 tables with row 0 = identity: scale + bias per neuron, one offset per layer
        "table_bytes": 4 * (capacity + 1) * (2 * k + hidden * len(offsets)),
    }


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any probe failure means no CUDA
        return False


# --------------------------------------------------------------------------- request helpers
def effective_spec(spec: SteeringSpec, params: Any) -> SteeringSpec:
    """``spec``, or, when it is empty, the spec already in ``params.extra_args["steering"]``.

    A spec set directly on the sampling params is honoured (never silently dropped).
    """
    if spec:
        return spec
    return SteeringSpec.parse((getattr(params, "extra_args", None) or {}).get("steering"))


def steer_request(prompt: Any, params: Any, spec: SteeringSpec) -> tuple[Any, Any]:
    """Attach ``spec`` to one request as ``extra_args["steering"]`` (the salt is composed at intake, P5)."""
    params = params.clone()
    extra = dict(params.extra_args or {})
    extra.pop("steering", None)
    if spec:
        extra["steering"] = spec.to_list()
    params.extra_args = extra or None
    return prompt, params


def plan_waves(specs: Sequence[SteeringSpec], capacity: int) -> list[list[int]]:
    """Split request indices into waves with at most ``capacity`` distinct non-empty specs each."""
    waves: list[list[int]] = []
    seen: list[set[str]] = []
    for i, spec in enumerate(specs):
        key = spec.fingerprint()
        for wave, keys in zip(waves, seen, strict=True):
            if not key or key in keys or len(keys) < capacity:
                wave.append(i)
                if key:
                    keys.add(key)
                break
        else:
            waves.append([i])
            seen.append({key} if key else set())
    return waves


class AdmissionRefused(CnaError):
    """A steered request could not wait for a row: the queue is full or the wait timed out."""

    def __init__(self, message: str, *, status: int, code: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class SpecGate:
    """Async admission in one front-end process: at most ``capacity`` distinct specs in flight.

    First come, first served: a request whose spec is already active does not jump ahead of an
    earlier waiter, so a popular spec cannot starve a rare one. At most ``max_waiting`` requests
    wait (:class:`AdmissionRefused`, HTTP 429, beyond), each at most ``wait_timeout`` seconds
    (HTTP 503 then). A waiter that is cancelled (its client went away) leaves the queue.
    The engine's scheduler enforces the same cap for every path (engine/admission.py); this
    gate keeps its queue short and gives HTTP clients a clear answer.
    """

    def __init__(self, capacity: int, max_waiting: int | None = None, wait_timeout: float | None = None) -> None:
        self.capacity, self.max_waiting, self.wait_timeout = capacity, max_waiting, wait_timeout
        self.active: Counter[str] = Counter()
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, key: str) -> bool:
        return key in self.active or len(self.active) < self.capacity

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            key, fut = self._waiters.popleft()
            if not fut.done():
                self.active[key] += 1
                fut.set_result(None)

    async def acquire(self, spec: SteeringSpec) -> None:
        key = spec.fingerprint()
        if not key:
            return
        if not self._waiters and self._fits(key):
            self.active[key] += 1
            return
        if self.max_waiting is not None and len(self._waiters) >= self.max_waiting:
            raise AdmissionRefused(
                f"{len(self._waiters)} steered requests are already waiting for a steering row; retry later",
                status=429,
                code="steering_queue_full",
            )
        entry = (key, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), self.wait_timeout)
        except BaseException as exc:
            if entry[1].done() and not entry[1].cancelled():
                self._release(key)  # granted just as the waiter gave up
            else:
                entry[1].cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            if isinstance(exc, TimeoutError):
                raise AdmissionRefused(
                    f"no steering row became free within {self.wait_timeout:g} s; retry later",
                    status=503,
                    code="steering_wait_timeout",
                ) from None
            raise

    def _release(self, key: str) -> None:
        self.active[key] -= 1
        if self.active[key] <= 0:
            del self.active[key]
        self._wake()

    async def release(self, spec: SteeringSpec) -> None:
        key = spec.fingerprint()
        if key:
            self._release(key)


# --------------------------------------------------------------------------- shared front end
class _SteeredFrontEnd:
    """What the offline and async front ends share: circuits, validation, capacity, hot-load.

    ``circuits`` is ``{name: path, Circuit or VectorSet}`` or a directory of circuit files.
    Any other keyword goes to the vLLM engine; subclasses start it in :meth:`_start`.
    """

    def __init__(
        self,
        model: str | Path,
        circuits: CircuitsArg = None,
        *,
        max_steering_configs: int = DEFAULT_MAX_STEERING_CONFIGS,
        hot_load_neurons: int = 0,
        **vllm_kwargs: Any,
    ) -> None:
        kw, self.circuits = engine_kwargs(
            model,
            circuits,
            max_steering_configs=max_steering_configs,
            hot_load_neurons=hot_load_neurons,
            **vllm_kwargs,
        )
        self.model_dir = kw["model"]
        self.max_steering_configs = max_steering_configs
        self.hot_load_neurons = hot_load_neurons
        self._start(kw)

    def _start(self, engine_kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def steering_info(self) -> dict[str, Any]:
        return {**steering_info(self.circuits, self.max_steering_configs), "hot_load_neurons": self.hot_load_neurons}

    def _hot_load(self, source: str | Path | Source) -> tuple[str, Source, dict[str, str]]:
        name, circuit, entry = hot_load_entry(source, self.model_dir)
        if name in self.circuits:
            raise SteeringError(f"a circuit named {name!r} is already loaded")
        return name, circuit, entry


@contextlib.contextmanager
def _worker_errors() -> Iterator[None]:
    """Re-raise a worker-side failure of a hot-load RPC as a :class:`SteeringError` with its message."""
    try:
        yield
    except CnaError:
        raise
    except Exception as exc:  # a worker's error comes back as a generic exception
        raise SteeringError(f"the engine refused the circuit: {exc}") from exc


# --------------------------------------------------------------------------- offline API
class SteeredLLM(_SteeredFrontEnd):
    """``vllm.LLM`` with circuits and a per-request ``steering=`` argument (see the base class)."""

    def _start(self, engine_kwargs: dict[str, Any]) -> None:
        from vllm import LLM

        self.llm = LLM(**engine_kwargs)

    def add_circuit(self, source: str | Path | Source) -> str:
        """Add a circuit or vector set (file or object) to the running engine; returns its name."""
        name, circuit, entry = self._hot_load(source)
        with _worker_errors():  # check on every worker, then add
            self.llm.collective_rpc("cna_check_circuit", args=(name, entry))
            self.llm.collective_rpc("cna_add_circuit", args=(name, entry))
        add_to_catalogue(self.llm.llm_engine.vllm_config, name, circuit)  # steerable at intake from now on
        self.circuits[name] = circuit
        return name

    def specs(self, steering: Any, n: int) -> list[SteeringSpec]:
        """Parse and validate ``steering`` (one spec for all, or one per prompt)."""
        return [s.validate(self.circuits) for s in parse_many(steering, n)]

    def generate(
        self,
        prompts: Any,
        sampling_params: Any = None,
        *,
        steering: Any = None,
        use_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[Any]:
        """``LLM.generate`` with ``steering`` (see :func:`cna_vllm.steering.parse_many`)."""
        from vllm import SamplingParams

        single = isinstance(prompts, str | dict)
        prompts = [prompts] if single else list(prompts)
        n = len(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, list | tuple) else [sampling_params] * n
        if len(params) != n:
            raise SteeringError(f"got {len(params)} sampling params for {n} prompts")
        specs = [
            effective_spec(s, sp).validate(self.circuits) for s, sp in zip(self.specs(steering, n), params, strict=True)
        ]
        reqs = [steer_request(p, sp, spec) for p, sp, spec in zip(prompts, params, specs, strict=True)]
        outputs: list[Any] = [None] * n
        for wave in plan_waves(specs, self.max_steering_configs):
            outs = self.llm.generate(
                [reqs[i][0] for i in wave], [reqs[i][1] for i in wave], use_tqdm=use_tqdm, **kwargs
            )
            for i, out in zip(wave, outs, strict=True):
                outputs[i] = out
        return outputs

    def chat(
        self,
        messages: Any,
        sampling_params: Any = None,
        *,
        steering: Any = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Apply the chat template (with the generation prompt) and :meth:`generate`."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.render_chat(c, **(chat_template_kwargs or {})) for c in convs]
        return self.generate(prompts, sampling_params, steering=steering, **kwargs)

    def render_chat(self, conversation: list[dict[str, Any]], **template_kwargs: Any) -> dict[str, Any]:
        tok = self.llm.get_tokenizer()
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **template_kwargs)
        return {"prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"]}

    def get_tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def shutdown(self) -> None:
        """Stop the engine core process now (rather than at garbage collection)."""
        self.llm.llm_engine.engine_core.shutdown()


# --------------------------------------------------------------------------- async API
class AsyncSteeredLLM(_SteeredFrontEnd):
    """``vllm.v1.engine.async_llm.AsyncLLM`` with circuits and per-request steering.

    ``engine`` is the underlying ``AsyncLLM`` (the server builds on it). Call
    :meth:`shutdown` when done.
    """

    def _start(self, engine_kwargs: dict[str, Any]) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.gate = SpecGate(self.max_steering_configs)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))

    def spec(self, steering: Any) -> SteeringSpec:
        return SteeringSpec.parse(steering).validate(self.circuits)

    def steering_info(self) -> dict[str, Any]:
        return {**super().steering_info(), "in_flight_specs": len(self.gate.active)}

    async def add_circuit(self, source: str | Path | Source) -> str:
        """Add a circuit or vector set to the running engine; returns its name."""
        name, circuit, entry = self._hot_load(source)
        await add_to_engine(self.engine, name, entry, circuit)
        self.circuits[name] = circuit
        return name

    async def generate(
        self,
        prompt: Any,
        sampling_params: Any,
        request_id: str,
        *,
        steering: Any = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """Stream ``RequestOutput`` for one request; waits while all steering rows are taken."""
        spec = effective_spec(self.spec(steering), sampling_params).validate(self.circuits)
        prompt, params = steer_request(prompt, sampling_params, spec)
        await self.gate.acquire(spec)
        stream = self.engine.generate(prompt, params, request_id, **kwargs)
        try:
            async for out in stream:
                yield out
        finally:  # a caller that stops early: the engine aborts the request before its row is released
            await stream.aclose()
            await self.gate.release(spec)

    def shutdown(self) -> None:
        self.engine.shutdown()


async def add_to_engine(engine: Any, name: str, entry: dict[str, str], circuit: Source) -> None:
    """Check on every worker, then add: circuit ``name`` (``{"path", "sha256"}``) in a running ``AsyncLLM``."""
    with _worker_errors():
        await engine.collective_rpc("cna_check_circuit", args=(name, entry))
        await engine.collective_rpc("cna_add_circuit", args=(name, entry))
    add_to_catalogue(engine.vllm_config, name, circuit)  # steerable at intake once every worker has it
