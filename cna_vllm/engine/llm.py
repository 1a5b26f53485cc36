"""Offline and async front ends: vLLM's ``LLM`` / ``AsyncLLM`` with per-request steering.

Both build the engine with :func:`cna_vllm.engine.config.engine_kwargs`. Every steered request
carries its spec's wire form in ``extra_args["steering"]``; the cache salt is composed at intake
(patch P5), so prefix-cache blocks are never shared across specs. At most
``max_steering_configs`` distinct specs run at once (:mod:`cna_vllm.engine.admission`): further
requests with new specs *wait* (offline: later waves; async: until a row frees up).

Hot-loading: an engine built with ``hot_load_neurons`` > 0 reserves spare steerable neurons
per layer (and an offset table per layer); ``add_circuit`` adds sources while it runs,
through the worker RPCs of :mod:`cna_vllm.engine.worker`.

The server does not use these classes: it runs vLLM's own engine client with the same
``engine_kwargs`` and :mod:`cna_vllm.engine.admission`'s gate. ``AsyncSteeredLLM`` is the
Python async API for applications that embed the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cna_vllm import sources
from cna_vllm.engine.admission import SpecGate, plan_waves, steer_request
from cna_vllm.engine.config import DEFAULT_MAX_STEERING_CONFIGS, engine_kwargs
from cna_vllm.engine.intake import catalogue
from cna_vllm.engine.worker import add_to_engine, add_to_llm
from cna_vllm.errors import SteeringError
from cna_vllm.patches.engine import shutdown_engine_core
from cna_vllm.sources import Source
from cna_vllm.steering import SteeringSpec, parse_many


def effective_spec(spec: SteeringSpec, params: Any) -> SteeringSpec:
    """``spec``, or, when it is empty, the spec already in ``params`` (never silently dropped)."""
    return spec or SteeringSpec.from_params(params)


# --------------------------------------------------------------------------- shared front end
class _SteeredFrontEnd:
    """What the offline and async front ends share: circuits, validation, capacity, hot-load.

    ``circuits`` is ``{name: path, Circuit or VectorSet}`` or a directory of circuit files.
    Any other keyword goes to the vLLM engine; subclasses start it in :meth:`_start`.
    """

    def __init__(
        self,
        model: str | Path,
        circuits: sources.SourcesArg = None,
        *,
        max_steering_configs: int = DEFAULT_MAX_STEERING_CONFIGS,
        hot_load_neurons: int = 0,
        **vllm_kwargs: Any,
    ) -> None:
        kw, _ = engine_kwargs(
            model,
            circuits,
            max_steering_configs=max_steering_configs,
            hot_load_neurons=hot_load_neurons,
            **vllm_kwargs,
        )
        self.model_dir = kw["model"]
        self.max_steering_configs = max_steering_configs
        self.hot_load_neurons = hot_load_neurons
        self.catalogue = catalogue(self._start(kw))
        self.circuits = self.catalogue.sources  # the one catalogue intake checks against, shared

    def _start(self, engine_kwargs: dict[str, Any]) -> Any:
        """Start the engine; return its ``VllmConfig``."""
        raise NotImplementedError

    def _hot_load(self, source: str | Path | Source) -> tuple[str, Source, sources.Entry]:
        name, circuit, entry = sources.for_hot_load(source, self.model_dir)
        if name in self.circuits:
            raise SteeringError(f"a circuit named {name!r} is already loaded")
        return name, circuit, entry


# --------------------------------------------------------------------------- offline API
class SteeredLLM(_SteeredFrontEnd):
    """``vllm.LLM`` with circuits and a per-request ``steering=`` argument (see the base class)."""

    def _start(self, engine_kwargs: dict[str, Any]) -> Any:
        from vllm import LLM

        self.llm = LLM(**engine_kwargs)
        return self.llm.llm_engine.vllm_config

    def add_circuit(self, source: str | Path | Source) -> str:
        """Add a circuit or vector set (file or object) to the running engine; returns its name."""
        name, circuit, entry = self._hot_load(source)
        add_to_llm(self.llm, name, entry, circuit)
        return name

    def specs(self, steering: Any, n: int) -> list[SteeringSpec]:
        """Parse and validate ``steering`` (one spec for all, or one per prompt)."""
        return [self.catalogue.validate(s) for s in parse_many(steering, n)]

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
        asked = parse_many(steering, n)
        specs = [self.catalogue.validate(effective_spec(s, sp)) for s, sp in zip(asked, params, strict=True)]
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
        shutdown_engine_core(self.llm)


# --------------------------------------------------------------------------- async API
class AsyncSteeredLLM(_SteeredFrontEnd):
    """``vllm.v1.engine.async_llm.AsyncLLM`` with circuits and per-request steering.

    ``engine`` is the underlying ``AsyncLLM`` (the server builds on it). Call
    :meth:`shutdown` when done.
    """

    def _start(self, engine_kwargs: dict[str, Any]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.gate = SpecGate(self.max_steering_configs)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))
        return self.engine.vllm_config

    def spec(self, steering: Any) -> SteeringSpec:
        return self.catalogue.validate(SteeringSpec.parse(steering))

    async def add_circuit(self, source: str | Path | Source) -> str:
        """Add a circuit or vector set to the running engine; returns its name."""
        name, circuit, entry = self._hot_load(source)
        await add_to_engine(self.engine, name, entry, circuit)
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
        spec = self.catalogue.validate(effective_spec(self.spec(steering), sampling_params))
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
