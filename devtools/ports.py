"""Loopback ports for servers that another process binds later (a `ray start` head's components)."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def quiet_port() -> int:
    """A free loopback port for a server that another process binds later (a `ray start` head).

    `free_port()` gets its port from the kernel's ephemeral range, the range that every process's
    bind(0) and outgoing connection draws from: a Ray head binds a dozen ports of its own that way
    at start, so a port picked there can be taken before the component it was given to binds it
    (CI saw the job agent lose its HTTP port and `ray job submit` answer "No available agent" until
    it gave up). This picks between Ray's worker ports (10002-19999) and the ephemeral range,
    where only a port that someone named explicitly can collide.
    """
    floor = _ephemeral_floor()
    rng = random.SystemRandom()
    while True:  # the range holds thousands of ports; a taken one is rare, so this ends at once
        port = rng.randrange(20000, max(floor, 20001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
