"""``python -m cna_vllm.cli``: the ``cna-vllm`` command."""

import sys

from cna_vllm.cli import main

sys.exit(main())
