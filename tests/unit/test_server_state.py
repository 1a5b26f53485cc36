"""The steering state the middleware and routes share: its defaults and where the app keeps it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from starlette.applications import Starlette

from cna_vllm.engine.admission import SpecGate
from cna_vllm.server.catalog import Catalog
from cna_vllm.server.metrics import metrics
from cna_vllm.server.state import DEFAULT_MAX_REQUEST_BYTES, ServerState, server_state
from cna_vllm.server.variants import Variants
from cna_vllm.steering import SteeringLimits


def state() -> ServerState:
    return ServerState(Catalog({}, {}, "/m", "m", 2), SteeringLimits(), SpecGate(2), metrics())


def test_defaults_are_closed_and_bounded():
    s = state()
    assert s.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 4 * 1024 * 1024
    assert s.hot_load_enabled is False and s.hot_load_roots == ()  # hot-loading is opt-in, no directory allowed
    assert isinstance(s.hot_load_lock, asyncio.Lock) and isinstance(s.variants, Variants) and len(s.variants) == 0


def test_every_state_owns_its_lock_and_variants():
    a, b = state(), state()
    assert a.hot_load_lock is not b.hot_load_lock and a.variants is not b.variants


def test_the_state_lives_in_the_app_state():
    app = Starlette()
    assert server_state(app) is None  # a plain app: no steering attached
    s = state()
    app.state.cna_steering = s
    assert server_state(app) is s
    assert server_state(SimpleNamespace(state=SimpleNamespace(cna_steering=s))) is s  # any object with .state
