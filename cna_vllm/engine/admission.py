"""Admission of steered requests: at most ``max_steering_configs`` distinct specs run at once.

Two layers. **The scheduler** (:class:`SteeringAdmission`) is what keeps workers safe; the
**front-end queues** (:class:`SpecGate` for async/HTTP callers, :func:`plan_waves` offline) only
keep the scheduler's waiting queue short and give HTTP clients a clear 429/503.

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

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from cna_vllm.engine.config import CONFIG_KEY, DEFAULT_MAX_STEERING_CONFIGS
from cna_vllm.errors import CnaError
from cna_vllm.steering import SteeringSpec

_KEY_ATTR = "_cna_steering_key"


def steering_key(request: Any) -> str:
    """The spec fingerprint of a scheduler ``Request`` (``""`` when unsteered), cached on it."""
    key = getattr(request, _KEY_ATTR, None)
    if key is None:
        key = SteeringSpec.from_params(getattr(request, "sampling_params", None)).fingerprint()
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

    def _queues(self) -> list[Any]:
        """The waiting queues in the order vLLM drains them: KV-holding waiters first, where it has them."""
        return [q for q in (getattr(self, "kv_holding_waiting", None), self.waiting) if q is not None]

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        queues = self._queues()
        waiting = [(q, r) for q in queues for r in q]
        held_idx = held_back(
            (steering_key(r) for r in self.running), [steering_key(r) for _q, r in waiting], self.cna_capacity
        )
        held = [waiting[i] for i in held_idx]
        for q in queues:
            if mine := [r for hq, r in held if hq is q]:
                q.remove_requests(mine)
        try:
            return super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:  # back at the head in their order (prepend_requests reverses): the oldest steered waiters
            for q in queues:
                if mine := [r for hq, r in held if hq is q]:
                    q.prepend_requests(reversed(mine))


class SteeringScheduler(SteeringAdmission, Scheduler):
    """vLLM's ``Scheduler`` with steering admission (used when async scheduling is off, e.g. on CPU)."""


class SteeringAsyncScheduler(SteeringAdmission, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` with steering admission (GPU default)."""


# --------------------------------------------------------------------------- front-end queues
def steer_request(prompt: Any, params: Any, spec: SteeringSpec) -> tuple[Any, Any]:
    """Attach ``spec`` to one request in its wire form (the salt is composed at intake, patch P5)."""
    params = params.clone()
    extra = dict(params.extra_args or {})
    extra.pop("steering", None)
    if spec:
        extra["steering"] = spec.to_wire()
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
