"""Throughput of the simulated Consul's KV endpoint over keep-alive HTTP/1.1.

Runs N KV PUTs and N KV GETs through python-consul2 (one persistent ``requests`` session)
against a :class:`~shepard_lib.sim.consul.ConsulServer`, plus the same loop over a bare
``http.client`` connection, and compares both with a baseline measured in the same process: a
raw ``requests`` GET loop against a minimal stdlib HTTP/1.1 handler that answers a constant.
Prints requests/s and ratios only; it asserts nothing about timing. The whole process (server and
client) is pinned to one core, so the ``http.client`` figures are a lower bound of what the sim
serves on one core: the target is 2,000 KV requests/s, so that the sim is never the bottleneck of a
100-node simulation. The python-consul2 figures are bounded by the client library itself (compare
the baseline, which is ``requests`` against a handler that does nothing).

    python benchmarks/bench_sim_kv.py [-n 3000] [--all-cores]
"""

from __future__ import annotations

import argparse
import http.client
import os
import threading
import time
import warnings
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

from shepard_lib.clock import Clock
from shepard_lib.sim.consul import ConsulServer, ConsulState

TARGET_RATE = 2000
"""KV requests/s the sim must serve on one core (issue: never the bottleneck of 100 nodes)."""


class _ConstantHandler(BaseHTTPRequestHandler):
    """The baseline: the least a stdlib HTTP/1.1 keep-alive handler can do."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    body = b'[{"Key":"k","Value":"dg=="}]'

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def rate(n: int, fn: Callable[[int], object]) -> float:
    """Calls per second of ``fn(i)`` over ``n`` calls (after a short warm-up)."""
    for i in range(min(50, n)):
        fn(i)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def baseline(n: int) -> float:
    """Requests/s of a raw ``requests`` GET loop against the constant handler."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ConstantHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/kv/k"
    try:
        with requests.Session() as session:
            return rate(n, lambda i: session.get(url).content)
    finally:
        httpd.shutdown()
        httpd.server_close()


def sim_rates(n: int) -> dict[str, float]:
    """Requests/s of KV PUT and GET against the sim, via python-consul2 and via http.client."""
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN"):
        os.environ.pop(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import consul

        server = ConsulServer(ConsulState(Clock())).start()
        client = consul.Consul(host="127.0.0.1", port=server.port)
    conn = http.client.HTTPConnection("127.0.0.1", server.port)

    def raw(method: str, path: str, body: bytes | None = None) -> bytes:
        conn.request(method, path, body=body)
        return conn.getresponse().read()

    try:
        keys = [f"bench/key-{i % 100}" for i in range(n)]
        return {
            "python-consul2 PUT": rate(n, lambda i: client.kv.put(keys[i], f"value-{i}")),
            "python-consul2 GET": rate(n, lambda i: client.kv.get(keys[i])),
            "http.client PUT": rate(n, lambda i: raw("PUT", f"/v1/kv/{keys[i]}", f"v{i}".encode())),
            "http.client GET": rate(n, lambda i: raw("GET", f"/v1/kv/{keys[i]}")),
        }
    finally:
        conn.close()
        server.stop()


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=3000, help="requests per measurement (default 3000)")
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    args = parser.parse_args()
    if not args.all_cores:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cores = len(os.sched_getaffinity(0))
    base = baseline(args.n)
    print(f"on {cores} core(s), server and client together")
    print(f"baseline: requests GET -> minimal stdlib handler   {base:8.0f} req/s")
    rates = sim_rates(args.n)
    for name, value in rates.items():
        print(f"sim KV:   {name:<40} {value:8.0f} req/s   ratio to baseline {value / base:5.2f}")
    lean = min(rates["http.client PUT"], rates["http.client GET"])
    verdict = "met" if lean >= TARGET_RATE else "NOT met"
    print(f"target {TARGET_RATE} KV req/s on one core: {verdict} ({lean:.0f} req/s, client included)")


if __name__ == "__main__":
    main()
