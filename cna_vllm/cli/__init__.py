"""``cna-vllm`` command line: :mod:`.parser` declares the flags, :mod:`.commands` calls the package.

``serve`` and all its flags go to vLLM's own server parser (:mod:`cna_vllm.server.app`).
A :class:`~cna_vllm.errors.CnaError` is printed as ``cna-vllm CMD: error: …`` with exit code 2.
"""

from __future__ import annotations

import sys

from cna_vllm.cli.parser import build_parser
from cna_vllm.errors import CnaError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from cna_vllm.server.app import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CnaError as exc:
        print(f"cna-vllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
