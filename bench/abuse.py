"""
The hardening issue's attacks, replayed against bioproxy in front of
fakellama (llama-server's default mode, 4 slots, answers generated at once),
with raw sockets:

    python bench/abuse.py [--stalled 4] [--tokens 14000,56000] [--slowloris 101]

- stalled readers: N clients open streams of T tokens and never read them;
  then one more user asks. Reported: that user's status and seconds, and
  bioproxy's resident memory before and after.
- slowloris: N connections send one byte of a request's headers a second.
  Reported: how many are still open after 20 s, and after client_timeout.
- streams (--streams N): N streamed chats opened at once, each connect not
  waiting for the last, R times (--runs). Reported per run: how many got
  200 and [DONE], and what the others got (issue 26, item 13).
- listing (--templates N): bioproxy with N templates; GET /templates and
  GET /status on the admin port, each with a proxied GET /v1/models sent
  while it runs. Reported: medians of 5 of the listing's seconds and of
  that request's.

The config is bioproxy's defaults but for max_queue_wait (90 s), so that a
held slot shows as a wait rather than a 503.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from warm import ROOT, Bioproxy, call, freePort, waitFor  # noqa: E402


def rss(pid: int) -> int:
    """Resident memory in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def chat(port: int, tokens: int, stream: bool) -> bytes:
    body = json.dumps(
        {"messages": [{"role": "user", "content": "tell me"}], "stream": stream, "max_tokens": tokens}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body)
    )


@contextlib.contextmanager
def stack(
    work: Path, prefixes: dict[str, str] | None = None, checkout: Path = ROOT
) -> Iterator[tuple[int, int, subprocess.Popen[bytes]]]:
    """fakellama (answers generated at once) and bioproxy (warm.py's) in front of it."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    backend = types.SimpleNamespace(url=f"http://127.0.0.1:{freePort()}", key=None)
    fake = subprocess.Popen(
        [sys.executable, "-m", "bioproxy.testing.fakellama", "--port", backend.url.rsplit(":", 1)[1]]
        + ["--ms-per-generated-token", "0"],
        stdout=(work / "fake.log").open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    proxy = Bioproxy(work, backend, prefixes or {}, checkout, max_queue_wait=90)
    try:
        waitFor(lambda: call(backend.url + "/health") is not None, "fakellama", timeout=30)
        # With many templates, listed while they are being warmed: up, not warm.
        waitFor(lambda: call(proxy.admin + ("/health" if prefixes else "/ready")) is not None, "bioproxy", 30)
        yield proxy.port, proxy.adminPort, proxy.proc
    finally:
        proxy.stop()
        fake.terminate()
        fake.wait(30)


def stalled(count: int, tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="abuse-") as name, stack(Path(name)) as (port, _admin, proxy):
        before = rss(proxy.pid)
        readers = []
        for _ in range(count):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(chat(port, tokens, stream=True))
            readers.append(s)
        time.sleep(3)  # the answers generated, and as much sent as the sockets take
        held = rss(proxy.pid)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as user:
            user.sendall(chat(port, 4, stream=False))
            user.settimeout(120)
            status = int(user.recv(65536).split(b" ", 2)[1])
        waited = time.monotonic() - started
        for s in readers:
            s.close()
        return {"status": status, "seconds": round(waited, 2), "rss_before_kib": before, "rss_held_kib": held}


def slowloris(count: int, grace: float) -> dict[str, int]:
    with tempfile.TemporaryDirectory(prefix="abuse-") as name, stack(Path(name)) as (port, _admin, _proxy):
        request = chat(port, 1, stream=False)
        conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        for s in conns:
            s.setblocking(False)
        openAt: dict[str, int] = {}
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < grace:
            for s in conns:
                with contextlib.suppress(OSError):
                    s.send(request[i : i + 1])
            i += 1
            time.sleep(1)
            elapsed = time.monotonic() - started
            if "after_20s" not in openAt and elapsed >= 20:
                openAt["after_20s"] = sum(_open(s) for s in conns)
        openAt[f"after_{grace:g}s"] = sum(_open(s) for s in conns)
        for s in conns:
            s.close()
        return openAt


def streams(count: int, runs: int) -> list[dict[str, int]]:
    results = []
    with stack(Path(tempfile.mkdtemp(prefix="bioproxy-abuse-"))) as (port, _, _):
        for _ in range(runs):
            selector = selectors.DefaultSelector()
            got: dict[socket.socket, bytes] = {}
            for _ in range(count):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                got[s] = b""
                selector.register(s, selectors.EVENT_WRITE)
            outcome: collections.Counter[str] = collections.Counter()
            deadline = time.monotonic() + 120
            while selector.get_map() and time.monotonic() < deadline:
                for key, events in selector.select(timeout=1):
                    s = key.fileobj  # type: ignore[assignment]
                    if events & selectors.EVENT_WRITE:
                        s.sendall(chat(port, 30, True))
                        selector.modify(s, selectors.EVENT_READ)
                        continue
                    try:
                        piece = s.recv(1 << 16)
                    except OSError as e:
                        piece, got[s] = b"", got[s] + f" {type(e).__name__}".encode()
                    got[s] += piece
                    if not piece or b"data: [DONE]" in got[s]:
                        selector.unregister(s)
                        s.close()
                        whole = got[s]
                        status = (
                            whole.split(b" ", 2)[1].decode() if whole.startswith(b"HTTP/1.1 ") else "none"
                        )
                        outcome[status + (" [DONE]" if b"data: [DONE]" in whole else " cut")] += 1
            outcome["never ended"] += len(selector.get_map())
            results.append(dict(outcome))
    return results


def listing(count: int, checkout: Path = ROOT) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="bioproxy-abuse-"))
    prefixes = {}
    for i in range(count):
        path = work / f"t{i}.txt"
        path.write_text(f"Template {i}: " + "a long instruction. " * 40 + "{message}")
        prefixes[f"@t{i}"] = str(path)
    out: dict[str, float] = {}
    with stack(work, prefixes, checkout) as (port, admin, _):
        for path in ("/templates", "/status"):
            listed, proxied = [], []
            for _ in range(5):
                started = time.perf_counter()
                with socket.create_connection(("127.0.0.1", admin)) as a:
                    a.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
                    time.sleep(0.005)  # the listing has begun
                    sent = time.perf_counter()
                    call(f"http://127.0.0.1:{port}/v1/models")
                    proxied.append(time.perf_counter() - sent)
                    size = 0
                    while piece := a.recv(1 << 16):
                        size += len(piece)
                    assert size > count * 10, f"{path} answered only {size} bytes"
                listed.append(time.perf_counter() - started)
            out[f"{path} s"] = round(statistics.median(listed), 3)
            out[f"/v1/models during {path} s"] = round(statistics.median(proxied), 3)
    return out


def _open(s: socket.socket) -> bool:
    try:
        data = s.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return not data.startswith(b"HTTP/1.1 408") and data != b""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stalled", type=int, default=4)
    parser.add_argument("--tokens", default="14000,56000")
    parser.add_argument("--slowloris", type=int, default=101)
    parser.add_argument(
        "--templates", type=int, default=0, help="the listing scenario alone, with N templates"
    )
    parser.add_argument(
        "--grace", type=float, default=63.0, help="seconds of slowloris (client_timeout is 60)"
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="another checkout, listed beside this one"
    )
    parser.add_argument("--streams", type=int, default=0, help="the streams scenario alone, N at once")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if args.streams:
        for i, outcome in enumerate(streams(args.streams, args.runs)):
            print(f"run {i + 1}: {args.streams} streams at once: {outcome}", flush=True)
        return
    if args.templates:
        print(f"{args.templates} templates: {listing(args.templates)}")
        if args.baseline:
            print(f"{args.templates} templates, baseline: {listing(args.templates, args.baseline)}")
        return
    for tokens in (int(t) for t in args.tokens.split(",")):
        result = stalled(args.stalled, tokens)
        print(f"{args.stalled} stalled readers of {tokens} tokens, then one user: {result}", flush=True)
    print(f"slowloris, {args.slowloris} connections: still open {slowloris(args.slowloris, args.grace)}")


if __name__ == "__main__":
    main()
