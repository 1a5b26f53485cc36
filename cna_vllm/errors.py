"""Exceptions raised by cna-vllm. Every one carries a message a user can act on."""

from __future__ import annotations


class CnaError(Exception):
    """Base class of every error this package raises on purpose."""


class CircuitError(CnaError, ValueError):
    """A circuit file is malformed or does not belong to the model at hand."""


class ModelError(CnaError):
    """A model cannot be found, prepared or identified."""


class PromptSetError(CnaError, ValueError):
    """A prompt set cannot be read."""


class SteeringError(CnaError, ValueError):
    """A steering request is invalid (unknown circuit, bad number, bad mode...).

    ``param`` names the part of the request it is about (``steering[1].multiplier``) and
    ``code`` is the machine-readable reason; the server maps both into its error body.
    """

    def __init__(self, message: str, *, param: str | None = "steering", code: str = "invalid_steering") -> None:
        super().__init__(message)
        self.param, self.code = param, code


class ExportError(CnaError, ValueError):
    """A steering spec cannot be exported as a LoRA adapter or merged weights (e.g. it needs a bias)."""
