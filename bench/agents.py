"""
Claude Code and Codex CLI themselves against llama-server alone and
against bioproxy in front of it: the prompt tokens each conversation makes
llama-server compute.

    AGENTS=$(mktemp -d); npm install --prefix "$AGENTS" @anthropic-ai/claude-code@2.1 @openai/codex@0.171
    python bench/agents.py --bin "$AGENTS"/node_modules/.bin [--config default] [--agents claude,codex] [--model tiny|slow]

For each agent two fresh llama-servers start with the same flags, on the
tiny model with a context long enough for an agent's prompt (about 12,000
tokens for Claude Code, 19,000 for Codex); one is used straight, one
behind bioproxy. In one project directory the agent runs, in print / exec
mode, one prompt per conversation:

  first         the first conversation in the project
  second        a new conversation in the same project, with another prompt
  resumed       the second conversation resumed (`claude --continue`,
                `codex exec resume --last`) after the user paused and both
                llama-servers restarted
  restart       a new conversation after that restart

Every prompt goes to both paths, one after the other. Computed tokens are
llama-server's own count (`prompt eval time = … / N tokens` in its log),
summed over the requests of the conversation, with the seconds llama-server spent on them (the prefill
a user waits for before the first token); behind bioproxy, the tasks it sent
itself (warmups, pinned) are counted apart. Claude Code's replies are capped
at a few tokens (`CLAUDE_CODE_MAX_OUTPUT_TOKENS`); Codex 0.171 has no cap
that it sends, and the slow model's noise seldom ends, so `--model slow` is
for Claude Code (`--agents claude`). The tiny model's answers are noise, so each conversation
is one or two requests: what matters is how much of the agent's prompt is
computed again.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import warm  # noqa: E402

from bioproxy.testing import tinymodel  # noqa: E402

CONTEXT = 65536
PROMPTS = {
    "first": "list the files",
    "second": "what does main.py print?",
    "resumed": "and what should it print?",
    "restart": "write a test for main.py",
}
# bioproxy's default conversation_idle: the user pauses this long before the restart.
PAUSE = 6.0
SELECTED = re.compile(r"selected slot by (\w+)")
LAUNCHED = re.compile(r"launch_slot_: id +\d+ \| task (\d+)")
COMPUTED = re.compile(r"task (\d+) \| prompt eval time = +([\d.]+) ms / +(\d+) tokens")
# Replies are noise from a random-weight model; a few tokens are enough.
MAX_OUTPUT = 16


def computed(log: Path, offset: int) -> tuple[list[tuple[int, float]], int]:
    """
    From llama-server's log after offset: the prompt tokens computed, and
    the seconds that took, for each task a client sent; and the tokens of
    those bioproxy sent itself. In the default mode bioproxy pins only its
    own probes and warmups, and users' requests go unpinned ("selected slot
    by id" against "by LRU" or "by LCP").
    """
    with log.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", "replace").splitlines()
    pinned, own, ours = False, set(), 0
    users: list[tuple[int, float]] = []
    for line in lines:
        if m := SELECTED.search(line):
            pinned = m.group(1) == "id"
        elif m := LAUNCHED.search(line):
            if pinned:
                own.add(m.group(1))
        elif m := COMPUTED.search(line):
            if m.group(1) in own:
                ours += int(m.group(3))
            else:
                users.append((int(m.group(3)), float(m.group(2)) / 1000))
    return users, ours


class Agent:
    """How to run one agent's CLI against a base URL, in a project directory."""

    def __init__(self, name: str, binary: Path, work: Path) -> None:
        self.name = name
        self.binary = binary
        self.work = work

    def run(self, base: str, prompt: str, project: Path, home: Path, resume: bool = False) -> float:
        """Seconds the agent took to answer prompt, in a conversation of its own (or its last, resumed)."""
        home.mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(home)}
        if self.name == "claude":
            env.update(
                ANTHROPIC_BASE_URL=base,
                ANTHROPIC_API_KEY="unused",
                CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
                DISABLE_TELEMETRY="1",
                CLAUDE_CODE_MAX_OUTPUT_TOKENS=str(MAX_OUTPUT),
            )
            command = [str(self.binary), "-p", prompt, "--model", "tiny", *(["--continue"] if resume else [])]
        else:
            codex = home / "codex"
            codex.mkdir(exist_ok=True)
            (codex / "config.toml").write_text(
                'model = "tiny"\nmodel_provider = "local"\n\n[model_providers.local]\nname = "local"\n'
                f'base_url = "{base}/v1"\nwire_api = "responses"\nenv_key = "LOCAL_KEY"\n'
            )
            env.update(CODEX_HOME=str(codex), LOCAL_KEY="unused")
            command = [str(self.binary), "exec", "--skip-git-repo-check"]
            command += ["resume", "--last", prompt] if resume else [prompt]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
        # A noise reply that reaches the cap ends the run with this message; the prompt was computed.
        capped = "output token maximum" in result.stdout
        if result.returncode != 0 and not capped:
            raise RuntimeError(
                f"{self.name} failed ({result.returncode}): {result.stdout[-1000:]} {result.stderr[-2000:]}"
            )
        return time.perf_counter() - started


def project(work: Path) -> Path:
    """A small project, with the files both agents read into their prompts."""
    path = work / "project"
    path.mkdir()
    notes = "# A demo project\n\nKeep answers short. Run the tests with trial.\n"
    (path / "CLAUDE.md").write_text(notes)
    (path / "AGENTS.md").write_text(notes)
    (path / "main.py").write_text('print("hello")\n')
    subprocess.run(["git", "init", "-q"], cwd=path, check=False)
    return path


def runAgent(agent: Agent, binary: str, model: Path, config: str) -> list[dict[str, Any]]:
    work = agent.work
    direct = warm.Llama(binary, model, work, "direct", config)
    behind = warm.Llama(binary, model, work, "behind", config)
    for llama in (direct, behind):
        llama.args[llama.args.index("-c") + 1] = str(CONTEXT)
    where = project(work)
    direct.start()
    behind.start()
    proxy = warm.Bioproxy(work, behind, {})
    rows = []
    try:
        warm.waitFor(proxy.warm, "bioproxy's probe")
        for scenario, prompt in PROMPTS.items():
            if scenario == "resumed":
                time.sleep(PAUSE)  # the user pauses: bioproxy saves the conversation
                warm.waitFor(proxy.warm, "bioproxy's saves")
                before = proxy.restarts()
                for llama in (direct, behind):
                    llama.stop()
                    llama.start()
                warm.waitFor(lambda seen=before: proxy.restarts() > seen, "bioproxy to see the restart")
            if scenario == "restart":
                warm.waitFor(proxy.warm, "bioproxy's re-warm")
            logged = direct.log.stat().st_size, behind.log.stat().st_size
            resume = scenario == "resumed"
            aloneSeconds = agent.run(direct.url, prompt, where, work / "home-direct", resume)
            behindSeconds = agent.run(proxy.url, prompt, where, work / "home-behind", resume)
            warm.waitFor(proxy.warm, "bioproxy's warmups")
            alone, _ = computed(direct.log, logged[0])
            users, ours = computed(behind.log, logged[1])
            rows.append(
                {
                    "scenario": scenario,
                    "requests": f"{len(alone)} / {len(users)}",
                    "alone": sum(n for n, _ in alone),
                    "bioproxy": sum(n for n, _ in users),
                    "warmups": ours,
                    "alonePrefill": sum(t for _, t in alone),
                    "bioproxyPrefill": sum(t for _, t in users),
                    "aloneSeconds": aloneSeconds,
                    "bioproxySeconds": behindSeconds,
                }
            )
    finally:
        proxy.stop()
        direct.stop()
        behind.stop()
    return rows


def table(agent: str, config: str, model: str, rows: list[dict[str, Any]]) -> str:
    out = [
        f"#### {agent} ({config}, {model} model)",
        "",
        "| conversation | requests (alone / bioproxy) | llama-server alone: computed tokens "
        "| bioproxy: computed tokens | bioproxy's own warmups: computed tokens "
        "| llama-server alone: prefill s | bioproxy: prefill s | llama-server alone: run s | bioproxy: run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['scenario']} | {r['requests']} | {r['alone']} | {r['bioproxy']} | {r['warmups']} "
            f"| {r['alonePrefill']:.2f} | {r['bioproxyPrefill']:.2f} "
            f"| {r['aloneSeconds']:.1f} | {r['bioproxySeconds']:.1f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, required=True, help="the directory holding `claude` and `codex`")
    parser.add_argument("--agents", default="claude,codex")
    parser.add_argument("--config", default="default", choices=sorted(warm.CONFIGS))
    parser.add_argument("--model", choices=sorted(tinymodel.SIZES), default="tiny")
    parser.add_argument("--llama-server", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory and its logs")
    args = parser.parse_args()
    binary = warm.llamaServer(args.llama_server)
    with warm.workRoot("bioproxy-agents-bench-", args.keep) as root:
        model = tinymodel.write(root / f"{args.model}.gguf", size=args.model, context=CONTEXT)
        for name in args.agents.split(","):
            work = root / name
            work.mkdir()
            agent = Agent(name, args.bin / name, work)
            print(
                table(name, args.config, args.model, runAgent(agent, binary, model, args.config)), flush=True
            )


if __name__ == "__main__":
    main()
