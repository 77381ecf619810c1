"""``torchrun`` command lines for the multi-process tests, with no fixed port.

torchrun without rendezvous arguments uses ``MASTER_PORT`` 29500: two such runs at once on one machine (CI jobs, or
several people's tests on one shared host) collide and one fails at random. One node uses ``--standalone`` (the
rendezvous store binds a port the OS chooses); two "nodes" on 127.0.0.1 meet at a port found free just before.
"""

from __future__ import annotations

import socket
import sys

__all__ = ["free_port", "standalone_command", "node_command"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (bound to port 0 and released; the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def standalone_command(nproc: int) -> list[str]:
    """``torchrun --standalone --nproc_per_node nproc --tee 3`` (each output line prefixed ``[default<local rank>]:``),
    to be followed by ``-m module ...``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--tee", "3"]


def node_command(node_rank: int, nnodes: int, endpoint: str, run_id: str, nproc: int = 1) -> list[str]:
    """One node of an ``nnodes``-node launch that meets at ``endpoint`` (``host:port``) through the c10d rendezvous,
    as on a cluster (one such command per machine, same ``run_id``). Node 0 hosts the rendezvous store: with every
    "node" on one host each would otherwise try to, and which one did would depend on timing."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
            "--rdzv_id", run_id,
            "--rdzv_conf", f"is_host={int(node_rank == 0)}", "--tee", "3"]
