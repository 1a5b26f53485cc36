"""What the ``ab``, ``sweep`` and ``tune`` commands run: a backend, the prompt sets, the referee, the outputs.

:class:`Harness` says where answers come from (a server, or an in-process engine and how it is
built); :class:`EvalSets` holds the prompts; :func:`run_ab_job`, :func:`run_sweep` and
:func:`run_tune` run a job end to end and write its files. The CLI only parses and prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cna_vllm.errors import CnaError
from cna_vllm.evaluate.ab import Arm, KLConfig, KLReference, run_ab, run_arm, write_report
from cna_vllm.evaluate.backends import HARNESS_COMPILE, HARNESS_DTYPE, Backend
from cna_vllm.evaluate.mmlu import Question, load_mmlu
from cna_vllm.evaluate.sweep import Target, derived_circuits, plot_sweep, recommendation, summarise
from cna_vllm.prompts import PromptSet, load_prompts
from cna_vllm.sources import shipped_dir


@dataclass(frozen=True)
class Harness:
    """Where answers come from: the server at ``base_url``, else an in-process engine on ``model``."""

    model: str
    circuits: str | None = None
    base_url: str | None = None
    served_model: str | None = None
    api_key: str = "none"
    concurrency: int = 16
    dtype: str | None = None
    compile: bool | None = None
    max_model_len: int = 2048
    kv_cache_gib: int = 2
    kl_prompts: int = 16
    kl_tokens: int = 32

    @classmethod
    def of(cls, namespace: Any) -> Harness:
        """The harness fields of a parsed command line (any object with those attributes)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})

    @property
    def circuits_dir(self) -> Path:
        return Path(self.circuits) if self.circuits else shipped_dir(self.model)

    @property
    def settings(self) -> dict[str, Any]:
        """What a report records about the engine that answered."""
        if self.base_url:
            return {"model": self.base_url}
        return {"model": self.model, "dtype": self.dtype or HARNESS_DTYPE,
                "compiled": HARNESS_COMPILE if self.compile is None else self.compile}

    @property
    def kl(self) -> KLConfig | None:
        """The KL referee's configuration, or None when either count is 0."""
        return KLConfig(self.kl_prompts, self.kl_tokens) if self.kl_prompts > 0 and self.kl_tokens > 0 else None

    def backend(self, circuits: dict | None = None) -> Backend:
        """A :class:`ServerBackend` for ``base_url``, else an :class:`EngineBackend` on every core."""
        from cna_vllm.evaluate.backends import EngineBackend, ServerBackend

        if self.base_url:
            return ServerBackend(self.base_url, self.served_model, api_key=self.api_key, concurrency=self.concurrency)
        if hasattr(os, "sched_getaffinity"):  # offline: the engine may use every core (vLLM keeps one back)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
        return EngineBackend(
            self.model, circuits or self.circuits_dir, dtype=self.settings["dtype"], max_model_len=self.max_model_len,
            enforce_eager=not self.settings["compiled"], kv_cache_memory_bytes=self.kv_cache_gib << 30, seed=0,
        )

    def sized_circuits(self, names: Sequence[str], wide: Sequence[str], fractions: Sequence[float]):
        """Circuits derived at ``fractions`` from each ``wide`` circuit file, joined to the directory's, and
        the names to sweep (derived first). ``({}, names)`` when there is no wide circuit."""
        from cna_vllm.circuit import Circuit
        from cna_vllm.sources import load_dir

        if not wide:
            return {}, list(names)
        if self.base_url:
            raise CnaError("--wide-circuit (circuit sizes) needs the in-process engine, not --base-url")
        derived: dict = {}
        for path in wide:
            derived.update(derived_circuits(Circuit.load(path), list(fractions)))
        return {**load_dir(self.circuits_dir), **derived}, [*derived, *names]


@dataclass(frozen=True)
class EvalSets:
    """The prompts a job answers: harmful, harmless (over-refusal, KL), MMLU questions."""

    harmful: PromptSet
    harmless: PromptSet | None
    mmlu: list[Question] | None

    @classmethod
    def load(cls, prompts: str, harmless: str | None, mmlu: int, seed: int = 0, limit: int | None = None) -> EvalSets:
        return cls(load_prompts(prompts, limit), load_prompts(harmless, limit) if harmless else None,
                   load_mmlu(mmlu, seed=seed) if mmlu else None)


def run_ab_job(harness: Harness, arms: list[Arm], sets: EvalSets, max_tokens: int, out: str | Path,
               circuits: dict | None = None, extra: dict | None = None) -> tuple[dict, list[Path]]:
    """Answer every arm on one backend (closed afterwards); write the report; return it and its files."""
    backend = harness.backend(circuits)
    try:
        report = run_ab(backend, arms, sets.harmful, harmless=sets.harmless, mmlu=sets.mmlu, max_tokens=max_tokens,
                        settings={**harness.settings, **(extra or {})}, kl=harness.kl)
    finally:
        backend.close()
    return report, write_report(report, out)


def run_sweep(harness: Harness, arms: list[Arm], sets: EvalSets, max_tokens: int, target: Target,
              out: str | Path, circuits: dict | None = None) -> tuple[dict, list[Path]]:
    """:func:`run_ab_job` plus the sweep's summary, ``sweep.png`` and ``recommended.json``."""
    report = run_ab_job(harness, arms, sets, max_tokens, out, circuits, {"sweep": True})[0]
    summary = summarise(report, target)
    report["sweep"] = summary
    paths = write_report(report, out)
    paths.append(plot_sweep(report, summary, Path(out) / "sweep.png"))
    rec = Path(out) / "recommended.json"
    rec.write_text(json.dumps(recommendation(summary, harness.base_url or harness.model), indent=2) + "\n")
    return summary, [*paths, rec]


def run_tune(harness: Harness, space, sets: EvalSets, max_tokens: int, target: Target, out: str | Path, *,
             trials: int, seeds: list | None = None, seed: int = 0, circuits: dict | None = None,
             echo: Callable[[str], None] = print) -> tuple[dict, list[Path]]:
    """The Optuna search of :mod:`.tune` on one in-process engine; returns ``recommended.json`` and the files."""
    from cna_vllm.evaluate.tune import tune, write_outputs

    if harness.base_url:
        raise CnaError("tune needs the in-process engine (the KL referee), not --base-url")
    if sets.harmless is None:
        raise CnaError("tune needs a harmless set (--harmless) for the KL referee")
    kl = harness.kl
    if kl is None:
        raise CnaError("tune needs the KL referee: --kl-prompts and --kl-tokens must be > 0")
    backend = harness.backend(circuits)
    try:
        kl_ref = KLReference.build(backend, sets.harmless, kl)
        first: list = []

        def evaluate(arm: Arm) -> dict:
            res = run_arm(backend, arm, sets.harmful, harmless=sets.harmless, mmlu=sets.mmlu, max_tokens=max_tokens,
                          kl_ref=kl_ref)
            entry = res.to_dict(first[0] if first else None)
            if not first:
                first.append(res)
            echo(f"  {arm.name}: refusal {entry['refusal_rate']:.3f} quality {entry['quality_paper']:.3f} "
                 f"KL {entry.get('kl_forced', float('nan')):.4f}")
            return entry

        result = tune(evaluate, space, trials=trials, target=target, seeds=seeds or [], seed=seed)
    finally:
        backend.close()
    result["settings"] = {**harness.settings, "harmful": sets.harmful.describe(), "harmless": sets.harmless.describe(),
                          "max_tokens": max_tokens, "kl_prompts": kl.prompts, "kl_tokens": kl.tokens,
                          "trials": trials, "space": space.__dict__}
    paths = write_outputs(result, harness.model, target, out)
    return json.loads(paths[-1].read_text()), paths
