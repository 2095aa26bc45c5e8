"""
What a proxy adds to each request: time to first token and CPU, bioproxy
against the Go original and against llama-server alone, paths interleaved.

    python bench/latency.py [--configs np4,default] [--requests 60] [--go PATH] [--lean]
                            [--baseline DIR] [--copies]

Each path has its own llama-server with the same flags (tiny model, `-t 2`),
so that no path's slots are another's: "alone" is used straight, one is
behind bioproxy (a twistd subprocess), one behind the Go original (built
from its repository: `go build ./cmd/bioproxy`; skipped without --go). Each
request goes to every path in turn, so all see the machine at one moment.
With --lean, bench/lean.py --fresh is one more path, sent what llama-server
alone is sent: a relay on Twisted's reactor that parses heads and copies
bytes and nothing else, the floor under any Python proxy's CPU here.

Scenarios, streamed chats unless named:

  templated     one template, a new question each time
  untemplated   a long system prompt and a new question each time
  switching     six templates round robin (more than the four slots)
  anthropic     /v1/messages, a system prompt and a new question
  responses     /v1/responses, instructions and a new question

Per path and scenario: median TTFT (to the first streamed event), median
"outside" time (TTFT minus llama-server's own prompt_ms: what is not
prefill, much less noisy than TTFT), the proxy's CPU per request, read
from its threads' schedstat (nanoseconds on CPU) around each request, and
the median prompt tokens llama-server computed (which explains a TTFT that
"outside" does not).
Added TTFT and outside are the proxy's median minus alone's.

With --baseline, a bioproxy from another checkout (an earlier commit, say:
`git worktree add ../before REV`) is one more path, with a llama-server of
its own.

With --copies, every llama-server runs at -lv 5, whose trace lines say
each time it copies a slot's state into its RAM prompt cache (an idle slot
as a new task starts, or a slot whose contents a task is about to lose;
bioproxy.testing.llamalog), and the table gives how many each path's
server made over each scenario's counted requests. The trace lines slow
llama-server, so the times of such a run are not the figures to quote.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from warm import (  # noqa: E402
    CONFIGS,
    Bioproxy,
    Llama,
    freePort,
    llamaServer,
    readStream,
    template,
    tinymodel,
    waitFor,
    workRoot,
)

from bioproxy.testing import llamalog  # noqa: E402

SYSTEM = "You are a careful assistant for a software team. Answer briefly and precisely. " * 20


def cpuNanoseconds(pid: int) -> int:
    """Time on CPU of every thread of pid, from schedstat (ns, not clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            pass
    return total


class GoOriginal:
    """The Go original, on its config.json format."""

    def __init__(self, binary: str, work: Path, backend: str, prefixes: dict[str, str]) -> None:
        self.port, admin = freePort(), freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "proxy_host": "127.0.0.1",
            "proxy_port": self.port,
            "admin_host": "127.0.0.1",
            "admin_port": admin,
            "backend_url": backend,
            "warmup_check_interval": 30,
            "prefixes": prefixes,
        }
        (work / "go.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen(
            [binary, "-config", str(work / "go.json")],
            stdout=(work / "go.log").open("ab"),
            stderr=subprocess.STDOUT,
            cwd=work,
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def send(url: str, path: str, body: dict[str, Any]) -> tuple[float, float, float]:
    """One streamed request: seconds to its first event, llama-server's prompt_ms (s) and prompt_n."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    payload = json.dumps(body).encode()
    started = time.perf_counter()
    connection.request("POST", path, payload, {"content-type": "application/json"})
    response = connection.getresponse()
    first, timings, _ = readStream(response, started)
    connection.close()
    if response.status != 200 or math.isnan(first):
        raise Failed(f"{url}{path}: {response.status}")
    return first, timings.get("prompt_ms", math.nan) / 1000, timings.get("prompt_n", math.nan)


class Failed(Exception):
    """A request that got no streamed answer (the Go original answers 502 when llama-server closed its connection)."""


def bodies(scenario: str, i: int, templated: bool, texts: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """The request of scenario's i-th round, as a client of a proxy (templated) or of llama-server alone sends it."""
    question = f"question number {i}: what does line {i * 7 % 50} do?"

    def prefixed(prefix: str) -> str:
        return f"{prefix} {question}" if templated else texts[prefix].replace("<{message}>", question)

    common = {"stream": True, "max_tokens": 8, "temperature": 0}
    if scenario == "templated":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": prefixed("@t0")}], **common}
    if scenario == "switching":
        prefix = f"@t{i % 6}"
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": prefixed(prefix)}], **common}
    if scenario == "untemplated":
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        return "/v1/chat/completions", {"messages": messages, **common}
    if scenario == "anthropic":
        return "/v1/messages", {
            "model": "m",
            "system": SYSTEM,
            "messages": [{"role": "user", "content": prefixed("@t1")}],
            **common,
        }
    if scenario == "responses":
        return "/v1/responses", {
            "model": "m",
            "instructions": SYSTEM,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": prefixed("@t2")}]}],
            "stream": True,
            "max_output_tokens": 8,
            "temperature": 0,
        }
    raise ValueError(scenario)


SCENARIOS = ("templated", "untemplated", "switching", "anthropic", "responses")
GO_SCENARIOS = ("templated", "untemplated", "switching")


def runConfig(work: Path, binary: str, model: Path, config: str, args: argparse.Namespace) -> str:
    texts = {f"@t{i}": template(i, args.rules) for i in range(6)}
    prefixes = {}
    for i, text in enumerate(texts.values()):
        (work / f"t{i}.txt").write_text(text)
        prefixes[f"@t{i}"] = str(work / f"t{i}.txt")
    names = ("alone", "bioproxy", "baseline", "go", "lean")
    servers = {name: Llama(binary, model, work, name, config) for name in names}
    if args.baseline is None:
        del servers["baseline"]
    if not args.go:
        del servers["go"]
    if not args.lean:
        del servers["lean"]
    for server in servers.values():
        if args.copies:
            server.args += llamalog.VERBOSITY
        server.start()
    bio = Bioproxy(work, servers["bioproxy"], prefixes)
    go = GoOriginal(args.go, work, servers["go"].url, prefixes) if args.go else None
    paths: dict[str, tuple[str, int | None]] = {
        "alone": (servers["alone"].url, None),
        "bioproxy": (bio.url, bio.proc.pid),
    }
    baseline = None
    if args.baseline is not None:
        (work / "baseline").mkdir()
        baseline = Bioproxy(
            work / "baseline", servers["baseline"], prefixes, checkout=args.baseline.resolve()
        )
        paths["bioproxy at baseline"] = (baseline.url, baseline.proc.pid)
    if go is not None:
        paths["go"] = (go.url, go.proc.pid)
    lean = None
    if args.lean:
        leanPort = freePort()
        lean = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).parent / "lean.py"),
                str(leanPort),
                servers["lean"].url.rsplit(":", 1)[1],
                "--fresh",
            ]
        )
        paths["lean relay"] = (f"http://127.0.0.1:{leanPort}", lean.pid)
    try:
        waitFor(bio.warm, "bioproxy's warmups")
        if baseline is not None:
            waitFor(baseline.warm, "the baseline's warmups")
        time.sleep(2 if go is None else 10)  # the Go original warms on its own clock
        results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
        failures: dict[str, int] = {}
        serverOf = {
            "alone": "alone",
            "bioproxy": "bioproxy",
            "bioproxy at baseline": "baseline",
            "go": "go",
            "lean relay": "lean",
        }
        copies: dict[tuple[str, str], int] = {}
        counted: dict[str, int] = {}
        for scenario in SCENARIOS:
            for i in range(-2, args.requests):  # two rounds to settle, not counted
                if i == 0 and args.copies:
                    counted = {name: ramCopies(servers[serverOf[name]]) for name in paths}
                for name, (url, pid) in paths.items():
                    if name == "go" and scenario not in GO_SCENARIOS:
                        continue
                    path, body = bodies(scenario, i, name not in ("alone", "lean relay"), texts)
                    before = cpuNanoseconds(pid) if pid else 0
                    try:
                        ttft, promptS, computed = send(url, path, body)
                    except Failed:
                        failures[name] = failures.get(name, 0) + 1
                        continue
                    cpu = (cpuNanoseconds(pid) - before) / 1e9 if pid else 0.0
                    if i >= 0:
                        results.setdefault((scenario, name), []).append((ttft, ttft - promptS, cpu, computed))
            if args.copies:
                for name in paths:
                    copies[(scenario, name)] = ramCopies(servers[serverOf[name]]) - counted[name]
        failed = ", ".join(f"{name}: {n}" for name, n in failures.items()) or "none"
        return table(config, results, list(paths), copies) + f"\nFailed requests (not counted): {failed}\n"
    finally:
        bio.stop()
        if baseline is not None:
            baseline.stop()
        if go is not None:
            go.stop()
        if lean is not None:
            lean.terminate()
            lean.wait(30)
        for server in servers.values():
            server.stop()


def ramCopies(server: Llama) -> int:
    return llamalog.ramCopies(server.log.read_bytes())


def table(
    config: str,
    results: dict[tuple[str, str], list[tuple[float, float, float, float]]],
    names: list[str],
    copies: dict[tuple[str, str], int],
) -> str:
    ms = 1000.0
    extra = " RAM-cache copies |" if copies else ""
    lines = [
        f"### {config}",
        "",
        "| scenario | path | TTFT ms | added TTFT ms | outside ms | added outside ms | proxy CPU ms/request "
        "| tokens computed |" + extra,
        "|---|---|---|---|---|---|---|---|" + ("---|" if copies else ""),
    ]
    for scenario in SCENARIOS:
        alone = results[(scenario, "alone")]
        aloneTTFT = statistics.median(r[0] for r in alone)
        aloneOutside = statistics.median(r[1] for r in alone)
        for name in names:
            rows = results.get((scenario, name))
            if not rows:
                continue
            ttft = statistics.median(r[0] for r in rows)
            outside = statistics.median(r[1] for r in rows)
            cpu = statistics.median(r[2] for r in rows)
            computed = statistics.median(r[3] for r in rows)
            added = "" if name == "alone" else f"{(ttft - aloneTTFT) * ms:+.2f}"
            outsideText = "n/a" if math.isnan(outside) else f"{outside * ms:.2f}"
            addedOutside = (
                "" if name == "alone" or math.isnan(outside) else f"{(outside - aloneOutside) * ms:+.2f}"
            )
            cpuText = "" if name == "alone" else f"{cpu * ms:.2f}"
            copied = f" {copies[(scenario, name)]} |" if copies else ""
            lines.append(
                f"| {scenario} | {name} | {ttft * ms:.2f} | {added} | {outsideText} | {addedOutside} | {cpuText} "
                f"| {'n/a' if math.isnan(computed) else f'{computed:.0f}'} |" + copied
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="np4,default")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rules", type=int, default=24, help="lines per template")
    parser.add_argument("--go", default=None, help="the Go original's binary")
    parser.add_argument(
        "--lean", action="store_true", help="also the lean relay, the floor of a Python relay's cost"
    )
    parser.add_argument(
        "--copies",
        action="store_true",
        help="count the slot states each llama-server copies into its RAM cache",
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="another bioproxy checkout, one more path beside this one"
    )
    parser.add_argument("--llama-server", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    binary = llamaServer(args.llama_server)
    with workRoot("bioproxy-latency-bench-", args.keep) as root:
        model = tinymodel.write(root / "tiny.gguf", size="tiny")
        for config in args.configs.split(","):
            if config not in CONFIGS:
                raise SystemExit(f"unknown config {config!r}: one of {', '.join(CONFIGS)}")
            work = root / config
            work.mkdir()
            print(runConfig(work, binary, model, config, args), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
