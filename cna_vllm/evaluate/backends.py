"""Where A/B prompts are answered: an OpenAI-compatible server, or an in-process engine.

Both backends take chat prompts plus one steering spec per call and return texts in
prompt order, greedy. MMLU uses next-token log-probabilities where the backend has them.
The in-process engine also returns full-vocabulary next-token log-probabilities along a
given continuation (:meth:`EngineBackend.forced_logprobs`), for the KL referee.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from tqdm.auto import tqdm

from cna_vllm.errors import CnaError, SteeringError
from cna_vllm.evaluate.mmlu import choice_from_logprobs, choice_from_text
from cna_vllm.steering import SteeringSpec

ECHO_HEADER = "x-cna-steering"
FINGERPRINT_HEADER = "x-cna-steering-fingerprint"


class Backend(Protocol):
    circuits: dict[str, dict]  # name -> circuit metadata

    def chat(self, prompts: Sequence[str], spec: SteeringSpec, max_tokens: int, desc: str) -> list[str]: ...

    def choose(self, prompts: Sequence[str], spec: SteeringSpec, desc: str) -> list[str | None]: ...


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


HARNESS_DTYPE = "bfloat16"
"""Default dtype of the in-process harness (benchmarks/results/harness.json: fastest, agrees with fp32)."""
HARNESS_COMPILE = True
"""Default: torch.compile the in-process harness (``enforce_eager=False``)."""


class EngineBackend:
    """An in-process :class:`cna_vllm.engine.llm.SteeredLLM` (built with ``max_logprobs=-1`` for the KL referee)."""

    def __init__(self, model: str, circuits: Any, **vllm_kwargs: Any) -> None:
        from cna_vllm.engine.llm import SteeredLLM

        vllm_kwargs.setdefault("max_logprobs", -1)
        self.llm = SteeredLLM(model, circuits, **vllm_kwargs)
        self.circuits = {name: c.metadata() for name, c in self.llm.circuits.items()}
        self.vocab_size = self.llm.llm.llm_engine.model_config.get_vocab_size()

    def chat_ids(self, prompts: Sequence[str], spec: SteeringSpec, max_tokens: int, desc: str) -> list[list[int]]:
        """Greedy continuations as token ids (the KL referee forces these)."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False)
        outs = self.llm.chat([_messages(p) for p in prompts], params, steering=spec, use_tqdm=True)
        return [list(o.outputs[0].token_ids) for o in outs]

    def forced_logprobs(
        self, prompts: Sequence[str], continuations: Sequence[Sequence[int]], spec: SteeringSpec, desc: str,
        chunk: int = 8,
    ) -> list:
        """Full-vocabulary next-token log-probabilities along each continuation, teacher-forced.

        One float32 array ``[len(continuation), vocab]`` per prompt: row r is the distribution of
        the token after the chat prompt and the first r continuation tokens (row 0: the first
        generated token). One prefill per prompt with ``prompt_logprobs=-1``, read as arrays
        (patch P6), ``chunk`` prompts at a time to bound memory.
        """
        from vllm import SamplingParams

        from cna_vllm.patches.requests import DENSE_LOGPROBS_KEY

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=-1, detokenize=False,
                                flat_logprobs=True, extra_args={DENSE_LOGPROBS_KEY: True})
        out: list = []
        items = list(zip(prompts, continuations, strict=True))
        render = self.llm.render_chat
        for start in tqdm(range(0, len(items), chunk), desc=desc):
            batch = [(render(_messages(p))["prompt_token_ids"], list(c)) for p, c in items[start : start + chunk]]
            res = self.llm.generate([{"prompt_token_ids": ids + cont} for ids, cont in batch], params, steering=spec)
            for (ids, cont), o in zip(batch, res, strict=True):
                dense = getattr(o.prompt_logprobs, "cna_dense", None)
                if dense is None:
                    raise CnaError("the engine returned no dense prompt log-probabilities (patch P6 not installed?)")
                # dense row j is the distribution of token j + 1; continuation token r sits at len(ids) + r
                out.append(dense[len(ids) - 1 : len(ids) - 1 + len(cont), : self.vocab_size])
        return out

    def chat(self, prompts, spec, max_tokens, desc):
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        outs = self.llm.chat([_messages(p) for p in prompts], params, steering=spec, use_tqdm=True)
        return [o.outputs[0].text for o in outs]

    def choose(self, prompts, spec, desc):
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=20)
        outs = self.llm.chat([_messages(p) for p in prompts], params, steering=spec, use_tqdm=True)
        picks = []
        for out in outs:
            step = (out.outputs[0].logprobs or [{}])[0]
            top = {lp.decoded_token or "": lp.logprob for lp in step.values()}
            picks.append(choice_from_logprobs(top) or choice_from_text(out.outputs[0].text))
        return picks

    def close(self) -> None:
        self.llm.shutdown()


class ServerBackend:
    """Any OpenAI-compatible base URL; steering goes in ``extra_body`` and must be echoed."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str = "none", concurrency: int = 16):
        import httpx
        from openai import APIError, OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
        try:
            self.model = model or self.client.models.list().data[0].id
        except APIError as exc:
            raise CnaError(f"cannot use the server at {base_url}: {exc}") from exc
        self.concurrency = concurrency
        headers = {"Authorization": f"Bearer {api_key}"}
        resp = httpx.get(base_url.rstrip("/") + "/circuits", headers=headers, timeout=30)
        self.circuits = {c["name"]: c for c in resp.json().get("data", [])} if resp.status_code == 200 else {}

    def _one(self, prompt: str, spec: SteeringSpec, **kw: Any):
        extra = {"steering": spec.to_list()} if spec else None
        raw = self.client.chat.completions.with_raw_response.create(
            model=self.model, messages=_messages(prompt), temperature=0.0, extra_body=extra, **kw
        )
        echoed = raw.headers.get(FINGERPRINT_HEADER, "")
        if echoed != spec.fingerprint():  # "" for unsteered on both sides
            raise SteeringError(
                f"the server did not confirm steering {spec or 'none'}: it echoed "
                f"{raw.headers.get(ECHO_HEADER)!r} (fingerprint {echoed!r})"
            )
        return raw.parse()

    def _map(self, fn, prompts, desc):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(fn, prompts), total=len(prompts), desc=desc))

    def chat(self, prompts, spec, max_tokens, desc):
        def one(p: str) -> str:
            return self._one(p, spec, max_tokens=max_tokens).choices[0].message.content or ""

        return self._map(one, prompts, desc)

    def choose(self, prompts, spec, desc):
        def one(p: str) -> str | None:
            choice = self._one(p, spec, max_tokens=1, logprobs=True, top_logprobs=20).choices[0]
            content = (choice.logprobs.content or []) if choice.logprobs else []
            top = {t.token: t.logprob for t in content[0].top_logprobs} if content else {}
            return choice_from_logprobs(top) or choice_from_text(choice.message.content or "")

        return self._map(one, prompts, desc)

    def close(self) -> None:
        self.client.close()
