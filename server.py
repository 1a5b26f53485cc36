"""Start the cna-vllm server: ``python server.py [--model ALIAS|DIR] [--circuits DIR] [vLLM flags]``."""

import sys

from cna_vllm.server.app import main

if __name__ == "__main__":
    sys.exit(main())
