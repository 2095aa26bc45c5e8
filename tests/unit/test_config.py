"""Config merging and validation, including the original's config.json."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from bioproxy import config
from bioproxy.config import Config, ConfigError, load, merge, validate

ROOT = Path(__file__).resolve().parents[2]

# Keys whose merge is plain "last layer wins"; the endpoint keys are tested apart.
_PLAIN = {
    "backend_url": st.sampled_from(["http://a:1", "http://b:2", "https://c"]),
    "warmup_check_interval": st.integers(1, 100),
    "max_body_bytes": st.integers(1, 10**9),
    "admin_token": st.text("abc", min_size=1, max_size=3),
}
layers = st.fixed_dictionaries({}, optional=_PLAIN)


class MergeTests(TestCase):
    @given(st.lists(layers, max_size=4))
    def test_lastLayerWins(self, stack: list[dict[str, object]]) -> None:
        merged = merge(*stack)
        for key in _PLAIN:
            setters = [layer[key] for layer in stack if key in layer]
            if setters:
                self.assertEqual(merged[key], setters[-1])
            else:
                self.assertNotIn(key, merged)

    @given(
        fileListen=st.booleans(),
        flagPort=st.one_of(st.none(), st.integers(1, 65535)),
        flagListen=st.booleans(),
    )
    def test_endpointPrecedence(self, fileListen: bool, flagPort: int | None, flagListen: bool) -> None:
        fileLayer: dict[str, object] = {"proxy_port": 7000}
        if fileListen:
            fileLayer["listen"] = "unix:/tmp/from-file.sock"
        flags: dict[str, object] = {}
        if flagPort is not None:
            flags["proxy_port"] = flagPort
        if flagListen:
            flags["listen"] = "tcp:9999"
        endpoint = validate(merge(fileLayer, flags)).proxy_endpoint
        if flagListen:
            self.assertEqual(endpoint, "tcp:9999")
        elif flagPort is not None:
            self.assertEqual(endpoint, f"tcp:{flagPort}:interface=127.0.0.1")
        elif fileListen:
            self.assertEqual(endpoint, "unix:/tmp/from-file.sock")
        else:
            self.assertEqual(endpoint, "tcp:7000:interface=127.0.0.1")


class LoadTests(TestCase):
    def write(self, name: str, text: str) -> str:
        path = Path(self.mktemp())
        path.mkdir()
        (path / name).write_text(text)
        return str(path / name)

    def test_defaults(self) -> None:
        c = load(home=Path(self.mktemp()))
        self.assertEqual(c, Config())
        self.assertEqual(c.proxy_endpoint, "tcp:8088:interface=127.0.0.1")
        self.assertEqual(c.admin_endpoint, "tcp:8089:interface=127.0.0.1")
        self.assertEqual(c.backend_url, "http://localhost:8081")
        self.assertEqual(c.max_body_bytes, 32 * 1024 * 1024)

    def test_originalConfigJsonLoadsUnchanged(self) -> None:
        original = {
            "proxy_host": "localhost",
            "proxy_port": 8088,
            "admin_host": "localhost",
            "admin_port": 8089,
            "backend_url": "http://localhost:8081",
            "warmup_check_interval": 30,
            "prefixes": {"@code": "/templates/code.txt"},
        }
        c = load(self.write("config.json", json.dumps(original, indent=2)))
        self.assertEqual(c.prefixes, {"@code": "/templates/code.txt"})
        self.assertEqual(c.warmup_check_interval, 30.0)

    def test_examplesLoad(self) -> None:
        for name in ("config.yaml", "config.json"):
            c = load(str(ROOT / "examples" / name))
            self.assertEqual(set(c.prefixes), {"@code", "@debug"})

    def test_defaultFileFoundAndYamlAccepted(self) -> None:
        home = Path(self.mktemp())
        (home / ".config/bioproxy").mkdir(parents=True)
        (home / ".config/bioproxy/config.yaml").write_text("proxy_port: 9000\n")
        self.assertEqual(load(home=home).proxy_port, 9000)
        (home / ".config/bioproxy/config.json").write_text('{"proxy_port": 9001}')
        self.assertEqual(load(home=home).proxy_port, 9001)

    def test_flagsBeatFile(self) -> None:
        path = self.write("c.yaml", "proxy_port: 9000\nbackend_url: http://file:1\n")
        c = load(path, {"backend_url": "http://flag:2"})
        self.assertEqual((c.proxy_port, c.backend_url), (9000, "http://flag:2"))
        self.assertEqual(c.source, str(Path(path).resolve()))

    def test_backendApiKeySources(self) -> None:
        """The setting, else its file beside the config, else the environment; a bad file stops start-up."""
        self.assertEqual(Config(backend_api_key="k1").backendApiKey({}), "k1")
        path = self.write("c.yaml", "backend_api_key_file: key.txt\n")
        (Path(path).parent / "key.txt").write_text("k2\n")
        self.assertEqual(load(path).backendApiKey({config.API_KEY_VARIABLE: "k3"}), "k2")
        self.assertEqual(Config().backendApiKey({config.API_KEY_VARIABLE: "k3"}), "k3")
        self.assertIsNone(Config().backendApiKey({}))
        (Path(path).parent / "key.txt").write_text("\n")
        with self.assertRaises(ConfigError) as e:
            load(path)
        self.assertIn("backend_api_key_file", str(e.exception))

    def test_statePath(self) -> None:
        """The setting, beside the config when relative; else systemd's StateDirectory=; else none."""
        path = self.write("c.yaml", "state_file: learned.json\n")
        self.assertEqual(load(path).statePath({}), Path(path).absolute().parent / "learned.json")
        self.assertEqual(
            Config().statePath({"STATE_DIRECTORY": "/var/lib/bioproxy"}), Path("/var/lib/bioproxy/state.json")
        )
        self.assertIsNone(Config().statePath({}))

    def test_missingNamedFile(self) -> None:
        with self.assertRaises(ConfigError) as e:
            load("/no/such/file.yaml")
        self.assertIn("does not exist", str(e.exception))

    def test_errorsNameTheKey(self) -> None:
        bad = {
            "nope": 1,
            "proxy_port": "80",
            "admin_port": 70000,
            "backend_url": "localhost:8081",
            "warmup_check_interval": 0,
            "max_body_bytes": True,
            "prefixes": {"has space": "x"},
            "listen": "tcp:x",
            "admin_listen": "nosuchtype:1",
        }
        for key, value in bad.items():
            with self.assertRaises(ConfigError) as e:
                validate({key: value})
            self.assertIn(repr(key), str(e.exception))

    def test_systemdEndpointOutsideSystemd(self) -> None:
        self.patch(config.os, "environ", {})
        with self.assertRaises(ConfigError) as e:
            validate({"listen": "systemd:domain=INET:index=0"})
        self.assertIn("systemd", str(e.exception))

    def test_ipv6Host(self) -> None:
        self.assertEqual(validate({"proxy_host": "::1"}).proxy_endpoint, r"tcp6:8088:interface=\:\:1")


class BackendsTests(TestCase):
    """Issue 16, item 1: several backends, in the config or by repeated --backend."""

    def test_oneBackendForm(self) -> None:
        specs = validate({"backend_url": "http://a:1", "slots": 3, "backend_api_key": "k"}).backendSpecs()
        self.assertEqual(specs, [config.BackendSpec("http://a:1", "k", 3)])

    def test_urlsAndMappings(self) -> None:
        c = validate(
            {
                "backend_api_key": "shared",
                "slots": 2,
                "backends": ["http://a:1/", {"url": "http://b:2", "api_key": "own", "slots": 4, "weight": 2}],
            }
        )
        self.assertEqual(
            c.backendSpecs(),
            [config.BackendSpec("http://a:1", "shared", 2), config.BackendSpec("http://b:2", "own", 4, 2.0)],
        )

    def test_badBackends(self) -> None:
        for value, words in (
            ("http://a:1", "list"),
            (["ftp://a"], "backends[0]"),
            ([{"api_key": "k"}], "backends[0]"),
            ([{"url": "http://a:1", "port": 3}], "unknown key 'port'"),
            ([{"url": "http://a:1", "weight": 0}], "backends[0].weight"),
            ([{"url": "http://a:1", "slots": -1}], "backends[0].slots"),
            (["http://a:1", "http://a:1/"], "listed twice"),
        ):
            with self.assertRaises(ConfigError) as caught:
                validate({"backends": value})
            self.assertIn(words, str(caught.exception), value)

    def test_warmOn(self) -> None:
        self.assertEqual(validate({}).warm_on, 1)
        self.assertIsNone(validate({"warm_on": "all"}).warm_on)
        self.assertEqual(validate({"warm_on": 2}).warm_on, 2)
        for bad in (0, "two", True, 1.5):
            self.assertRaises(ConfigError, validate, {"warm_on": bad})

    def test_models(self) -> None:
        """The models templates are warmed for behind llama-server's router, and per template."""
        config = validate({"models": ["alpha", "beta"], "template_models": {"@code": ["beta"]}})
        self.assertEqual(
            (config.models, dict(config.template_models)), (("alpha", "beta"), {"@code": ("beta",)})
        )
        self.assertEqual((validate({}).models, dict(validate({}).template_models)), ((), {}))
        for key, bad, words in (
            ("models", "alpha", "list of model names"),
            ("models", [""], "list of model names"),
            ("template_models", ["alpha"], "mapping of template prefix"),
            ("template_models", {"@code": "alpha"}, "template_models.@code"),
        ):
            with self.assertRaises(ConfigError) as caught:
                validate({key: bad})
            self.assertIn(words, str(caught.exception), (key, bad))

    def test_repeatedFlag(self) -> None:
        from bioproxy.tap import Options

        path = Path(self.mktemp())
        path.write_text(json.dumps({"backends": ["http://file:1", "http://file:2"]}))
        options = Options()
        options.parseOptions(["--config", str(path), "--backend", "http://a:1", "-b", "http://b:2"])
        self.assertEqual([s.url for s in options.config.backendSpecs()], ["http://a:1", "http://b:2"])
        options = Options()
        options.parseOptions(["--config", str(path), "--backend", "http://c:3"])
        self.assertEqual([s.url for s in options.config.backendSpecs()], ["http://c:3"])


class BacklogTests(TestCase):
    def test_listeningEndpointsGetABacklog(self) -> None:
        """Issue 26, item 13: Twisted's 50 drops a burst of connections that arrives while bioproxy is busy."""
        from bioproxy.config import LISTEN_BACKLOG, withBacklog

        for description in (
            "tcp:8088:interface=127.0.0.1",
            "tcp6:8088:interface=\\:\\:1",
            "unix:/run/b.sock",
        ):
            self.assertEqual(withBacklog(description), f"{description}:backlog={LISTEN_BACKLOG}")
        for kept in ("tcp:8088:backlog=10", "systemd:domain=INET:index=0"):
            self.assertEqual(withBacklog(kept), kept)
