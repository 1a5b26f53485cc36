"""Worker-side RPCs for adding circuits while the engine runs (vLLM's ``worker_extension_cls``).

The front end calls ``collective_rpc("cna_check_circuit", ...)`` on every worker, then
``collective_rpc("cna_add_circuit", ...)``: a circuit that does not fit on some rank is
refused everywhere before any rank changes. Both run between engine steps, never during
a forward.
"""

from __future__ import annotations

from typing import Any

from cna_vllm import sources
from cna_vllm.engine.context import lookup_state


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
