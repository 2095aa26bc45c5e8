"""
Several llama-servers behind one proxy: bioproxy's cache-affine router
against nginx's round robin (what a user would put in front otherwise) and
against bioproxy placing by hashing alone, without its load guard.

    python bench/scaling.py [--backends 2] [--templates 12] [--requests 120] [--clients 6] [--config default] [--model slow]

Each path gets its own llama-servers with the same flags (the "slow"
generated model by default, whose prefill costs about what a real small
model's does on these cores; -t 1 each, so that N of them fit the cores),
and sees the same workload: clients
sending streamed chats at once, each to a template drawn from a skewed
(Zipf, s=1.1) distribution over more templates than the backends have
slots, with a new question each time. nginx's clients send the template's
text themselves, as they would without bioproxy; llama-server's own prompt
cache is all they get. The paths run one after another, twice, in
alternating order, and the figures are over both rounds.

Reported per path: prompt tokens computed per request (`timings.prompt_n`,
which no noise changes), the share of requests computed cold (more than
half the prompt computed), and TTFT median and p90.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from warm import (  # noqa: E402
    CONFIGS,
    NGINX_HEAD,
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

NGINX = (
    NGINX_HEAD
    + """
    upstream llama {{ {servers} }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://llama;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""
)


class _Front:
    """What warm.Bioproxy reads of its backend."""

    key = None

    def __init__(self, url: str) -> None:
        self.url = url


def zipf(n: int, s: float, rng: random.Random) -> int:
    weights = [1 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights)[0]


def ask(base: str, content: str) -> tuple[float, int, int]:
    """TTFT (s), prompt tokens computed, and prompt tokens in all."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "max_tokens": 8,
            "temperature": 0,
        }
    ).encode()
    request = urllib.request.Request(
        base + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        first, timings, _ = readStream(response, started)
    computed = timings.get("prompt_n", -1)
    total = computed + timings.get("cache_n", 0) if timings else -1
    return first, computed, total


def settled(admin: str) -> bool:
    slots = json.load(urllib.request.urlopen(admin + "/slots"))
    return all(
        b["waiting"]["warmup"] == 0 and not any(s["holder"] == "warmup" for s in b["slots"])
        for b in slots["backends"]
    )


def workload(n: int, templates: int, seed: int) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    return [
        (zipf(templates, 1.1, rng), f"question {i}: what does rule {rng.randrange(50)} mean?")
        for i in range(n)
    ]


def run(
    base: str, jobs: list[tuple[int, str]], texts: list[str], expand: bool, clients: int
) -> list[tuple[float, int, int]]:
    def one(job: tuple[int, str]) -> tuple[float, int, int]:
        t, question = job
        content = texts[t].replace("<{message}>", question) if expand else f"@t{t} {question}"
        return ask(base, content)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, default=2)
    parser.add_argument("--templates", type=int, default=12)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--config", default="default", choices=sorted(CONFIGS))
    parser.add_argument(
        "--guard", type=int, default=2, help="bioproxy's balance_threshold in the guarded path"
    )
    parser.add_argument("--model", choices=sorted(tinymodel.SIZES), default="slow")
    parser.add_argument("--llama-server", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    binary = llamaServer(args.llama_server)
    with workRoot("bioproxy-scaling-bench-", args.keep) as work:
        model = tinymodel.write(work / f"{args.model}.gguf", size=args.model)
        texts = [template(i, 24) for i in range(args.templates)]
        prefixes = {}
        for i, text in enumerate(texts):
            (work / f"t{i}.txt").write_text(text)
            prefixes[f"@t{i}"] = str(work / f"t{i}.txt")
        paths = {
            "bioproxy": {"balance_threshold": args.guard},
            "bioproxy, hashing only": {"balance_threshold": 10**9},
            "nginx round robin": None,
        }
        servers: dict[str, list[Llama]] = {}
        procs: list[Any] = []
        bases: dict[str, str] = {}
        admins: dict[str, str] = {}
        try:
            for name, settings in paths.items():
                group = [
                    Llama(binary, model, work, f"{name.split()[0]}{i}-{len(servers)}", args.config)
                    for i in range(args.backends)
                ]
                for llama in group:
                    llama.args[llama.args.index("-t") + 1] = "1"
                    llama.start()
                servers[name] = group
                if settings is None:
                    port = freePort()
                    nginxWork = work / "nginx"
                    nginxWork.mkdir()
                    upstream = " ".join(f"server {s.url.removeprefix('http://')};" for s in group)
                    (nginxWork / "nginx.conf").write_text(
                        NGINX.format(work=nginxWork, servers=upstream, port=port)
                    )
                    procs.append(subprocess.Popen(["nginx", "-c", str(nginxWork / "nginx.conf")]))
                    bases[name] = f"http://127.0.0.1:{port}"
                else:
                    home = work / f"proxy{len(admins)}"  # its own config file and log
                    home.mkdir()
                    bio = Bioproxy(
                        home,
                        _Front(group[0].url),
                        prefixes,
                        backends=[s.url for s in group],
                        warmup_check_interval=5,
                        **settings,
                    )
                    procs.append(bio)
                    bases[name], admins[name] = bio.url, bio.admin
            for name, admin in admins.items():
                time.sleep(1)
                waitFor(lambda admin=admin: settled(admin), f"{name}'s warmups")
            time.sleep(2)
            results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in paths}
            jobs = workload(args.requests, args.templates, seed=1)
            order = list(paths)
            for round_ in range(2):
                for name in order if round_ == 0 else reversed(order):
                    results[name] += run(bases[name], jobs, texts, paths[name] is None, args.clients)
            print(
                f"### {args.backends} backends ({args.config}, {args.model} model), {args.templates} templates, "
                f"{args.requests} requests x 2 rounds, {args.clients} clients\n"
            )
            print("| path | computed tokens/request (mean) | cold requests | TTFT p50 ms | TTFT p90 ms |")
            print("|---|---|---|---|---|")
            for name, rows in results.items():
                computed = [r[1] for r in rows]
                cold = sum(1 for r in rows if r[1] > r[2] / 2) / len(rows)
                ttft = sorted(r[0] * 1000 for r in rows)
                p90 = ttft[int(0.9 * (len(ttft) - 1))]
                print(
                    f"| {name} | {statistics.mean(computed):.0f} | {cold:.0%} | {statistics.median(ttft):.1f} | {p90:.1f} |"
                )
        finally:
            for proc in procs:
                if isinstance(proc, Bioproxy):
                    proc.stop()
                else:
                    proc.terminate()
                    proc.wait(30)
            for group in servers.values():
                for llama in group:
                    llama.stop()


if __name__ == "__main__":
    main()
