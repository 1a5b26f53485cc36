"""The server's steering state: what the middleware and routes share, in ``app.state.cna_steering``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cna_vllm.engine.admission import SpecGate
from cna_vllm.server.catalog import Catalog
from cna_vllm.server.metrics import SteeringMetrics
from cna_vllm.server.variants import Variants
from cna_vllm.steering import SteeringLimits

DEFAULT_MAX_REQUEST_BYTES = 4 << 20


@dataclass
class ServerState:
    """What the steering middleware and routes need, in ``app.state.cna_steering``."""

    catalog: Catalog
    limits: SteeringLimits
    gate: SpecGate
    metrics: SteeringMetrics
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    hot_load_enabled: bool = False
    hot_load_roots: tuple[Path, ...] = ()
    hot_load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    variants: Variants = field(default_factory=lambda: Variants(""))


def server_state(app: Any) -> ServerState | None:
    """The steering state of a Starlette/FastAPI app, if the plugin attached one."""
    return getattr(app.state, "cna_steering", None)
