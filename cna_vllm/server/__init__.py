"""The OpenAI-compatible steered server: vLLM's API server plus the ``steering`` field.

See :mod:`cna_vllm.server.app` (start-up), :mod:`cna_vllm.server.middleware` (the field),
:mod:`cna_vllm.server.schema` (validation) and :mod:`cna_vllm.server.routes` (``/v1/circuits``).
"""
