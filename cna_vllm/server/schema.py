"""The HTTP ``steering`` field: its checks mapped to OpenAI-style errors.

Accepted shapes of ``steering`` in a request body (:meth:`SteeringSpec.parse` with
``strict=True``): one item ``{"circuit": "refusal", "multiplier": 0.0}`` (``mode`` defaults to
``scale``), a non-empty list of items applied in order, the compact string ``"refusal@0.0"`` /
``"refusal@0.5:patch,other@2"``, or ``null`` (not steered). ``scale`` takes ``multiplier``;
``patch`` and ``shift`` take ``alpha``. Everything else is an :class:`ApiError` (HTTP 400)
carrying the ``param`` and ``code`` of the :class:`~cna_vllm.errors.SteeringError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cna_vllm.catalogue import as_catalogue
from cna_vllm.errors import SteeringError
from cna_vllm.steering import SteeringLimits, SteeringSpec


class ApiError(Exception):
    """An error answered as OpenAI-style JSON ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = "steering",
        code: str = "invalid_steering",
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    @classmethod
    def of(cls, exc: SteeringError, status: int = 400) -> ApiError:
        """The HTTP form of a steering error: its message, ``param`` and ``code``."""
        return cls(str(exc), status=status, param=exc.param, code=exc.code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_steering(
    raw: Any,
    limits: SteeringLimits,
    circuits: Mapping[str, Any],
    *,
    foreign: Mapping[str, str] | None = None,
) -> SteeringSpec:
    """The request's ``steering`` (raw JSON value or a spec) as a checked :class:`SteeringSpec`.

    ``circuits`` is the server's :class:`~cna_vllm.catalogue.Catalogue` (or any name -> source
    mapping, with ``foreign`` hints): names are validated once per spec.
    """
    try:
        spec = SteeringSpec.parse(raw, limits, strict=True)
        return as_catalogue(circuits, foreign).validate(spec)
    except SteeringError as exc:
        raise ApiError.of(exc) from None


def echo(spec: SteeringSpec) -> str:
    """The ``x-cna-steering`` header value: the compact form, or ``none``."""
    return str(spec) if spec else "none"
