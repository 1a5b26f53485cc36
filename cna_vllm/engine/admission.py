"""Admission of steered requests in vLLM's scheduler: at most ``max_steering_configs`` distinct specs run.

Each distinct spec needs one row of the workers' steering tables. The scheduler is the one
place every request passes on its way to a worker (offline ``LLM``, ``AsyncLLM``, every HTTP
route, every API-server process), so the cap lives here, where vLLM caps distinct LoRA
adapters per step (``max_loras``). Front-end queues (``SpecGate``, offline waves) only keep
the scheduler's waiting queue short; they are no longer what keeps the workers safe.

Policy (first come, first served for steered requests):

- unsteered requests are never held back;
- a waiting steered request whose spec is already running, or that fits under the cap, may be
  scheduled;
- once a steered request must wait for a row, every later steered request waits behind it,
  including those whose spec is running: a popular spec cannot starve a rare one. The rows
  of the running specs drain as their requests finish, and the waiting one gets the next.

The invariant the workers rely on: the distinct specs of the requests scheduled in a step are
a subset of those of ``running`` plus the admitted waiting requests, at most the cap. The
worker applies a step's removals (explicit and implicit) before its additions, so its rows in
use never exceed the cap.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from cna_vllm.engine.state import CONFIG_KEY, DEFAULT_MAX_STEERING_CONFIGS
from cna_vllm.steering import SteeringSpec

_KEY_ATTR = "_cna_steering_key"


def steering_key(request: Any) -> str:
    """The spec fingerprint of a scheduler ``Request`` (``""`` when unsteered), cached on it."""
    key = getattr(request, _KEY_ATTR, None)
    if key is None:
        params = getattr(request, "sampling_params", None)
        raw = (getattr(params, "extra_args", None) or {}).get("steering")
        key = SteeringSpec.parse(raw).fingerprint() if raw else ""
        setattr(request, _KEY_ATTR, key)
    return key


def held_back(running_keys: Iterable[str], waiting_keys: Sequence[str], capacity: int) -> list[int]:
    """Indices of waiting requests (in queue order) that may not be scheduled this step (see the policy)."""
    active = {k for k in running_keys if k}
    held: list[int] = []
    blocked = False
    for i, key in enumerate(waiting_keys):
        if not key:
            continue
        if not blocked and (key in active or len(active) < capacity):
            active.add(key)
            continue
        blocked = True
        held.append(i)
    return held


class SteeringAdmission:
    """Mixed into a vLLM scheduler: holds back the steered requests that would exceed the row cap."""

    vllm_config: Any
    waiting: Any
    running: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        section = (self.vllm_config.additional_config or {}).get(CONFIG_KEY) or {}
        self.cna_capacity = int(section.get("max_steering_configs", DEFAULT_MAX_STEERING_CONFIGS))

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        waiting = list(self.waiting)
        held_idx = held_back(
            (steering_key(r) for r in self.running), [steering_key(r) for r in waiting], self.cna_capacity
        )
        held = [waiting[i] for i in held_idx]
        if held:
            self.waiting.remove_requests(held)
        try:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            if held:  # back at the head in their order (prepend_requests reverses): the oldest steered waiters
                self.waiting.prepend_requests(reversed(held))


class SteeringScheduler(SteeringAdmission, Scheduler):
    """vLLM's ``Scheduler`` with steering admission (used when async scheduling is off, e.g. on CPU)."""


class SteeringAsyncScheduler(SteeringAdmission, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` with steering admission (GPU default)."""


SCHEDULER_FQCN = "cna_vllm.engine.admission.SteeringScheduler"
ASYNC_SCHEDULER_FQCN = "cna_vllm.engine.admission.SteeringAsyncScheduler"
