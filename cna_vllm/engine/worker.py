"""Hot-loading: the worker-side RPCs (vLLM's ``worker_extension_cls``) and the front-end calls that drive them.

The front end (:func:`add_to_llm` offline, :func:`add_to_engine` for ``AsyncLLM`` and the
server) calls ``collective_rpc("cna_check_circuit", ...)`` on every worker, then
``collective_rpc("cna_add_circuit", ...)``: a source that does not fit on some rank is refused
everywhere before any rank changes. Both run between engine steps, never during a forward.
Only then is it added to the API process's catalogue, so intake accepts specs naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from cna_vllm import sources
from cna_vllm.engine.context import lookup_state
from cna_vllm.engine.intake import add_to_catalogue
from cna_vllm.errors import CnaError, SteeringError


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class; ``self.vllm_config`` is the worker's."""

    vllm_config: Any

    def _cna_load(self, name: str, entry: dict[str, str]) -> sources.Source:
        source = sources.Entry.from_dict(entry).load(name)
        return sources.validate(source, lookup_state(self.vllm_config.instance_id).identity)

    def cna_check_circuit(self, name: str, entry: dict[str, str]) -> None:
        """Raise unless circuit ``name`` (``{"path", "sha256"}``) can be added on this rank."""
        lookup_state(self.vllm_config.instance_id).check_add(name, self._cna_load(name, entry))

    def cna_add_circuit(self, name: str, entry: dict[str, str]) -> str:
        """Add circuit ``name`` on this rank; returns the state's one-line description."""
        state = lookup_state(self.vllm_config.instance_id)
        state.add(name, self._cna_load(name, entry))
        return state.describe()


# --------------------------------------------------------------------------- front-end side
@contextlib.contextmanager
def _worker_errors() -> Iterator[None]:
    """Re-raise a worker-side failure of a hot-load RPC as a :class:`SteeringError` with its message."""
    try:
        yield
    except CnaError:
        raise
    except Exception as exc:  # a worker's error comes back as a generic exception
        raise SteeringError(f"the engine refused the circuit: {exc}") from exc


def add_to_llm(llm: Any, name: str, entry: sources.Entry, source: sources.Source) -> None:
    """Check on every worker, then add: source ``name`` (pinned by ``entry``) in a running ``vllm.LLM``."""
    with _worker_errors():
        llm.collective_rpc("cna_check_circuit", args=(name, entry.to_dict()))
        llm.collective_rpc("cna_add_circuit", args=(name, entry.to_dict()))
    add_to_catalogue(llm.llm_engine.vllm_config, name, source)


async def add_to_engine(engine: Any, name: str, entry: sources.Entry, source: sources.Source) -> None:
    """Check on every worker, then add: source ``name`` (pinned by ``entry``) in a running ``AsyncLLM``."""
    with _worker_errors():
        await engine.collective_rpc("cna_check_circuit", args=(name, entry.to_dict()))
        await engine.collective_rpc("cna_add_circuit", args=(name, entry.to_dict()))
    add_to_catalogue(engine.vllm_config, name, source)
