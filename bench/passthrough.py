"""
Pass-through overhead: a fast backend reached directly, through bioproxy and
through nginx, measured side by side in one run.

    python bench/passthrough.py [--duration 5] [--connections 1,10,50] [--baseline DIR]

--baseline runs a second bioproxy from another checkout beside this one (say
`git worktree add ../before REV`), so that before and after are measured in
one run. A row without the access line shows what that line costs. CPU per
request is read from each Python process's schedstat over its wrk run
(nginx, several processes, is left out).

Needs `wrk` and `nginx` (Debian: wrk, nginx-light); the script installs them
with apt-get when missing and it runs as root. The backend is nginx itself
answering a fixed JSON body, so the backend costs the same in every row.
SSE per-event latency uses a Twisted SSE backend and a raw-socket client.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import cpuNanoseconds  # noqa: E402
from warm import NGINX_HEAD  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

NGINX_CONF = (
    NGINX_HEAD
    + """
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
    upstream sse {{ server 127.0.0.1:{sse}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{backend};
        location / {{ default_type application/json; return 200 '{{"object":"list","data":[]}}'; }}
    }}
    server {{
        listen 127.0.0.1:{proxy};
        location /sse {{
            proxy_pass http://sse; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_buffering off;
        }}
        location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
"""
)

SSE_SERVER = r"""
import json, sys, time
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site, NOT_DONE_YET

class SSE(Resource):
    isLeaf = True
    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/event-stream")
        self.tick(request, 0)
        return NOT_DONE_YET
    def tick(self, request, i):
        if request.finished or request.channel is None:
            return
        if i == 200:
            request.write(b"data: [DONE]\n\n"); request.finish(); return
        request.write(b"data: " + json.dumps({"t": time.time()}).encode() + b"\n\n")
        reactor.callLater(0.01, self.tick, request, i + 1)

reactor.listenTCP(int(sys.argv[1]), Site(SSE()), interface="127.0.0.1")
reactor.run()
"""


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def waitFor(port: int, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def nginxBinary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def ensureTools() -> None:
    missing = [
        pkg for pkg, found in (("wrk", shutil.which("wrk")), ("nginx-light", nginxBinary())) if not found
    ]
    if missing and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def startBioproxy(
    work: Path, name: str, backend: int, port: int, admin: int, root: Path = ROOT, settings: str = ""
) -> subprocess.Popen[bytes]:
    config = work / f"{name}.yaml"
    config.write_text("health_check_interval: 60\n" + settings)
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "bioproxy",
            "--config",
            str(config),
            "--backend",
            f"http://127.0.0.1:{backend}",
            "--port",
            str(port),
            "--admin-port",
            str(admin),
        ],
        env={**os.environ, "PYTHONPATH": str(root)},
        cwd=work,  # not the caller's directory, which `-c` would put first on sys.path
        # Its log on standard output, as the bioproxy command and systemd run it.
        stdout=(work / f"{name}.log").open("ab"),
        stderr=subprocess.STDOUT,
    )


def wrk(url: str, connections: int, duration: int) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {p: _ms(re.search(rf"^\s+{p}%\s+(\S+)", out, re.M).group(1)) for p in ("50", "99")}  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50": lat["50"],
        "p99": lat["99"],
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def sseDelays(port: int) -> list[float]:
    """Milliseconds from each event's creation to its arrival, over one stream."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
    buffer, delays = b"", []
    while b"[DONE]" not in buffer:
        data = sock.recv(65536)
        if not data:
            break
        now = time.time()
        buffer += data
        for match in re.finditer(rb'data: (\{"t": [\d.]+\})', data):
            delays.append((now - json.loads(match.group(1))["t"]) * 1000)
    sock.close()
    return delays


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", default="1,10,50")
    parser.add_argument("--baseline", type=Path, default=None, help="another bioproxy checkout, run beside")
    args = parser.parse_args()
    ensureTools()

    work = Path(tempfile.mkdtemp(prefix="bioproxy-bench-"))
    ports = {
        name: freePort()
        for name in (
            "backend",
            "proxy",
            "sse",
            "bio",
            "bioadmin",
            "biosse",
            "biosseadmin",
            "lean",
            "leansse",
            "quiet",
            "quietadmin",
            "base",
            "baseadmin",
        )
    }
    (work / "nginx.conf").write_text(NGINX_CONF.format(work=work, **ports))
    pids: dict[str, int] = {}  # the processes whose CPU per request is read
    procs = [
        subprocess.Popen([nginxBinary() or "nginx", "-c", str(work / "nginx.conf")]),
        subprocess.Popen([sys.executable, "-c", SSE_SERVER, str(ports["sse"])]),
        startBioproxy(work, "plain", ports["backend"], ports["bio"], ports["bioadmin"]),
        startBioproxy(work, "sse", ports["sse"], ports["biosse"], ports["biosseadmin"]),
        startBioproxy(
            work,
            "quiet",
            ports["backend"],
            ports["quiet"],
            ports["quietadmin"],
            settings="access_log: false\n",
        ),
        # What a leaner Twisted forwarding path would give (bench/lean.py): a yardstick, not bioproxy.
        subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "lean.py"), str(ports["lean"]), str(ports["backend"])]
        ),
        subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "lean.py"), str(ports["leansse"]), str(ports["sse"])]
        ),
    ]
    pids.update({"bioproxy": procs[2].pid, "bioproxy, no access line": procs[4].pid})
    pids["lean Twisted relay"] = procs[5].pid
    if args.baseline is not None:
        procs.append(
            startBioproxy(work, "base", ports["backend"], ports["base"], ports["baseadmin"], args.baseline)
        )
        pids["bioproxy at baseline"] = procs[-1].pid
    else:
        del ports["base"], ports["baseadmin"]
    try:
        for name in ports:
            waitFor(ports[name])
        targets = {
            "direct": f"http://127.0.0.1:{ports['backend']}/v1/models",
            **(
                {"bioproxy at baseline": f"http://127.0.0.1:{ports['base']}/v1/models"}
                if args.baseline
                else {}
            ),
            "bioproxy": f"http://127.0.0.1:{ports['bio']}/v1/models",
            "bioproxy, no access line": f"http://127.0.0.1:{ports['quiet']}/v1/models",
            "nginx": f"http://127.0.0.1:{ports['proxy']}/v1/models",
            "lean Twisted relay": f"http://127.0.0.1:{ports['lean']}/v1/models",
        }
        print(
            f"# python {sys.version.split()[0]} ({sys.implementation.name}), {os.cpu_count()} cores, "
            f"wrk {args.duration}s per cell\n"
        )
        print(
            "| connections | target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors "
            "| CPU ms/request |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for c in (int(x) for x in args.connections.split(",")):
            for url in targets.values():
                wrk(url, c, 1)  # warm connections and caches
            rows, cpu = {}, {}
            for name, url in targets.items():
                pid = pids.get(name)
                before = cpuNanoseconds(pid) if pid else 0
                rows[name] = wrk(url, c, args.duration)
                served = rows[name]["rps"] * args.duration
                if pid and served:
                    cpu[name] = (cpuNanoseconds(pid) - before) / 1e6 / served
            for name, row in rows.items():
                added50 = row["p50"] - rows["direct"]["p50"]
                added99 = row["p99"] - rows["direct"]["p99"]
                used = f"{cpu[name]:.3f}" if name in cpu else ""
                print(
                    f"| {c} | {name} | {row['rps']:.0f} | {row['p50']:.3f} | {row['p99']:.3f} | "
                    f"{added50:+.3f} | {added99:+.3f} | {row['errors']:.0f} | {used} |"
                )
        print("\n| SSE path | events | median delay ms | p90 delay ms | added median ms |")
        print("|---|---|---|---|---|")
        sse: dict[str, list[float]] = {
            name: [] for name in ("direct", "bioproxy", "nginx", "lean Twisted relay")
        }
        for _ in range(3):  # interleaved, so noise hits every path alike
            sse["direct"] += sseDelays(ports["sse"])
            sse["bioproxy"] += sseDelays(ports["biosse"])
            sse["nginx"] += sseDelays(ports["proxy"])
            sse["lean Twisted relay"] += sseDelays(ports["leansse"])
        base = statistics.median(sse["direct"])
        for name, delays in sse.items():
            med = statistics.median(delays)
            p90 = statistics.quantiles(delays, n=10)[-1]
            print(f"| {name} | {len(delays)} | {med:.3f} | {p90:.3f} | {med - base:+.3f} |")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
