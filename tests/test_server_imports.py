"""The cache node and its data-plane workers start without importing torch.

A worker that dies is restarted while replicas wait on it, and torch alone takes seconds to
import; the node shares the loader's byte helpers (digests, reads, headers), never its
tensor code. The replica side imports torch on first use of what needs it.
"""

from __future__ import annotations

import subprocess
import sys


def _imports_torch(statement: str) -> bool:
    code = f"{statement}\nimport sys\nprint('torch' in sys.modules)"
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    return answer.stdout.strip() == "True"


def test_the_data_plane_worker_and_the_node_import_no_torch() -> None:
    assert not _imports_torch("import api.data_plane")
    assert not _imports_torch("import cache_node.node, api.app")


def test_the_replica_side_still_gets_its_loaders() -> None:
    assert _imports_torch("from loader import load, HttpRangeSource")
