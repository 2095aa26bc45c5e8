"""
The proxy port's own cost per request, in one process with no network:
requests fed to bioproxy's HTTP server (bioproxy/serve.py) on an in-memory
transport, answered at once by a stand-in resource. What is left is the
server's parsing, framing and bookkeeping, which bench/passthrough.py sees
through the noise of sockets and a backend.

    python bench/parse.py [--baseline DIR]

--baseline runs the same in a child process from another checkout (say
`git worktree add ../before REV`), so that both are measured in one run.
Reported: the best of 5 rounds of N requests, in microseconds a request.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REQUESTS = {
    "GET, 3 headers": b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
    "POST, 7 headers, 300 B": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: OpenAI/Python 1.40\r\n"
        b"Accept: application/json\r\nContent-Type: application/json\r\nAuthorization: Bearer x\r\n"
        b"X-Stainless-Lang: python\r\nContent-Length: 300\r\n\r\n" + b"x" * 300
    ),
    "POST, chunked 4 x 1 KB": b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + (b"400\r\n" + b"y" * 1024 + b"\r\n") * 4 + b"0\r\n\r\n",
}


def measure(n: int) -> dict[str, float]:
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from bioproxy.metrics import Metrics
    from bioproxy.serve import ProxySite

    class Answer:
        def render(self, request: object) -> None:
            request.setHeader(b"content-type", b"application/json")  # type: ignore[attr-defined]
            request.setHeader(b"content-length", b"2")  # type: ignore[attr-defined]
            request.write(b"{}")  # type: ignore[attr-defined]
            request.finish()  # type: ignore[attr-defined]

    clock = Clock()
    site = ProxySite(Answer(), Metrics(), clock, 1 << 20, accessLog=False)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    out = {}
    for name, raw in REQUESTS.items():
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                channel.dataReceived(raw)
                transport.clear()
                clock.advance(0)
            best = min(best, (time.perf_counter() - started) / n * 1e6)
        out[name] = best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("-n", type=int, default=10000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        for name, us in measure(args.n).items():
            print(f"{name}\t{us:.2f}")
        return
    runs = {"this checkout": ROOT} | ({"baseline": args.baseline} if args.baseline else {})
    results: dict[str, dict[str, float]] = {}
    for label, root in runs.items():
        out = subprocess.run(
            [sys.executable, __file__, "--child", "-n", str(args.n)],
            env={**os.environ, "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[label] = {line.split("\t")[0]: float(line.split("\t")[1]) for line in out.splitlines()}
    print(
        "| request | "
        + " | ".join(f"{label} µs" for label in results)
        + (" | ratio |" if args.baseline else " |")
    )
    print("|---" * (len(results) + 1 + bool(args.baseline)) + "|")
    for name in REQUESTS:
        cells = [f"{results[label][name]:.2f}" for label in results]
        ratio = (
            f" | {results['this checkout'][name] / results['baseline'][name]:.2f}" if args.baseline else ""
        )
        print(f"| {name} | " + " | ".join(cells) + ratio + " |")


if __name__ == "__main__":
    main()
