"""
Instructions per request: bioproxy's CPU work counted by callgrind, which
does not depend on what else the machine is doing.

    python bench/instructions.py [--scenarios templated,untemplated] [--requests 150]
                                 [--config np4] [--baseline DIR] [--lean]

Times on a 2-core machine that also runs llama-server move by a tenth from
one run to the next; an instruction count moves by about one percent, so a
change of a few percent in bioproxy's own work shows. bioproxy runs under
`valgrind --tool=callgrind` (Debian's valgrind) with instrumentation off
through start-up and warmups, on for the counted requests only
(callgrind_control), in front of a llama-server of its own (tiny model).
The requests are bench/latency.py's, sent one at a time.

--baseline DIR counts another checkout the same way (`git worktree add
../before REV`); --lean counts bench/lean.py --fresh, the relay that does
nothing but relay, as the floor. Instructions are not time: a cold cache
makes the same instructions slower, and the kernel's work (the sends) is
not counted at all. Read them beside bench/latency.py's CPU figures, not
instead of them.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import bodies, send  # noqa: E402
from warm import Bioproxy, Llama, freePort, llamaServer, template, tinymodel, waitFor, workRoot  # noqa: E402


def callgrind(out: Path) -> tuple[str, ...]:
    return ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p")


def control(pid: int, *command: str) -> None:
    subprocess.run(
        ["callgrind_control", *command, str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def counted(
    pid: int, out: Path, requests: int, url: str, scenario: str, templated: bool, texts: dict[str, str]
) -> float:
    """Millions of instructions per request over `requests` requests of scenario."""
    for i in range(-3, 0):  # settled first, not counted
        send(url, *bodies(scenario, i, templated, texts))
    control(pid, "-i", "on")
    for i in range(requests):
        send(url, *bodies(scenario, i, templated, texts))
    control(pid, "-i", "off")
    for stale in glob.glob(f"{out}.{pid}*"):
        os.remove(stale)
    control(pid, "-d")  # dump, and zero the counts for the next scenario
    total = 0
    deadline = time.monotonic() + 60
    while not total and time.monotonic() < deadline:
        for dump in glob.glob(f"{out}.{pid}*"):
            for line in Path(dump).read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        time.sleep(0.2)
    return total / requests / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="templated,untemplated")
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--config", default="np4")
    parser.add_argument("--baseline", type=Path, default=None, help="another bioproxy checkout")
    parser.add_argument("--lean", action="store_true", help="also the lean relay, the floor")
    parser.add_argument("--llama-server", default=None)
    args = parser.parse_args()
    binary = llamaServer(args.llama_server)
    scenarios = args.scenarios.split(",")
    with workRoot("bioproxy-instructions-bench-", False) as root:
        model = tinymodel.write(root / "tiny.gguf", size="tiny")
        texts = {f"@t{i}": template(i, 24) for i in range(6)}
        prefixes = {}
        for i, text in enumerate(texts.values()):
            (root / f"t{i}.txt").write_text(text)
            prefixes[f"@t{i}"] = str(root / f"t{i}.txt")
        checkouts = {"bioproxy": None}
        if args.baseline is not None:
            checkouts["bioproxy at baseline"] = args.baseline.resolve()
        rows: dict[tuple[str, str], float] = {}
        for name, checkout in checkouts.items():
            work = root / name.replace(" ", "-")
            work.mkdir()
            llama = Llama(binary, model, work, "llama", args.config)
            llama.start()
            out = work / "callgrind.out"
            extra = {"checkout": checkout} if checkout else {}
            bio = Bioproxy(work, llama, prefixes, under=callgrind(out), **extra)
            try:
                waitFor(bio.warm, f"{name}'s warmups")
                time.sleep(2)
                for scenario in scenarios:
                    rows[(scenario, name)] = counted(
                        bio.proc.pid, out, args.requests, bio.url, scenario, True, texts
                    )
            finally:
                bio.stop()
                llama.stop()
        if args.lean:
            work = root / "lean"
            work.mkdir()
            llama = Llama(binary, model, work, "llama", args.config)
            llama.start()
            port = freePort()
            out = work / "callgrind.out"
            relay = subprocess.Popen(
                [
                    *callgrind(out),
                    sys.executable,
                    str(Path(__file__).parent / "lean.py"),
                    str(port),
                    llama.url.rsplit(":", 1)[1],
                    "--fresh",
                ],
                stderr=subprocess.DEVNULL,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                waitFor(lambda: _listening(port), "the lean relay")
                for scenario in scenarios:
                    rows[(scenario, "lean relay")] = counted(
                        relay.pid, out, args.requests, url, scenario, False, texts
                    )
            finally:
                relay.terminate()
                relay.wait(30)
                llama.stop()
    names = [*checkouts, *(["lean relay"] if args.lean else [])]
    print(f"### {args.config}, {args.requests} requests per scenario\n")
    print("| scenario | " + " | ".join(f"{n}: M instructions/request" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for scenario in scenarios:
        print(f"| {scenario} | " + " | ".join(f"{rows[(scenario, n)]:.3f}" for n in names) + " |")


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
