"""What a running process tree listens on, and how each port answers a request that carries no credentials.

Used while a search runs (the ``smoke_search`` fixture): every listening socket of the search's processes (Ray's
GCS, raylet, dashboard, agents, workers) is recorded once, and each is sent one unauthenticated HTTP GET over
loopback. Nothing is ever sent beyond this machine's loopback addresses: a socket bound to another address only
is recorded, not contacted.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

PROBE_PATH = "/api/jobs/"  # the job API: it runs shell commands for whoever may submit


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def http_status(port: int, timeout: float = 3.0) -> str:
    """The HTTP status of an unauthenticated GET of ``PROBE_PATH`` on 127.0.0.1:``port``, or why there is none."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{PROBE_PATH}", timeout=timeout) as resp:
            return str(resp.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except Exception as exc:  # noqa: BLE001 - a gRPC port, a closed port: not an HTTP answer
        return f"no HTTP ({type(exc).__name__})"


def listeners(root: int) -> list[dict[str, Any]]:
    """The listening TCP sockets of ``root`` and its descendants: ip, port, pid, process name."""
    try:
        procs = {p.pid: p for p in psutil.Process(root).children(recursive=True)}
    except psutil.NoSuchProcess:
        return []
    found = []
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
            try:
                name = " ".join(procs[conn.pid].cmdline()[:3])[-80:]
            except psutil.Error:
                name = "?"
            found.append({"ip": conn.laddr.ip, "port": conn.laddr.port, "pid": conn.pid, "process": name})
    return found


class ProbeWhileRunning:
    """Probe every new listener of a process tree every ``every`` seconds until ``stop``; ``results`` holds one
    record per (pid, ip, port) with its ``answer`` (an HTTP status, "no HTTP ...", or "not contacted")."""

    def __init__(self, root: int, every: float = 3.0) -> None:
        self.root, self.every = root, every
        self.results: dict[tuple, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProbeWhileRunning":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            for item in listeners(self.root):
                key = (item["pid"], item["ip"], item["port"])
                if key not in self.results:
                    item["answer"] = http_status(item["port"]) if is_loopback(item["ip"]) or \
                        item["ip"] in ("0.0.0.0", "::") else "not contacted"
                    self.results[key] = item
            self._stop.wait(self.every)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(sorted(self.results.values(), key=lambda r: r["port"]), indent=1))
