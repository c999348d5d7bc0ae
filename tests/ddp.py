"""Shared by the DDP tests: run a script under ``torchrun`` as two gloo processes on loopback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def torchrun(script: Path) -> subprocess.CompletedProcess:
    """Two gloo processes on loopback, on a port free now (no dependence on the host name resolving or on 29500
    being idle). A rendezvous lost to the network (the port taken between probe and bind), or a worker aborted by
    gloo's teardown ("terminate called without an active exception"), is retried once, on a
    new port; any other failure fails the test with torchrun's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for attempt in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)],
                              env=env, timeout=300, capture_output=True, text=True)
        network = re.search(r"address already in use|EADDRINUSE|Connection refused|connectFullMesh"
                            r"|terminate called without an active exception", proc.stderr)  # gloo teardown crash
        if proc.returncode == 0 or not network or attempt:
            break
    if proc.returncode:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
