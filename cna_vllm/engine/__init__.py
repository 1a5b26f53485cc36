"""The vLLM side of cna-vllm: steered model classes, row table, offline/async API.

Import ``cna_vllm.engine.llm`` for :class:`~cna_vllm.engine.llm.SteeredLLM` and
:class:`~cna_vllm.engine.llm.AsyncSteeredLLM`; this package itself imports nothing heavy.
"""
