from __future__ import annotations

from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from bioproxy.headers import appendForwarded, endToEnd


class EndToEndTests(TestCase):
    def test_dropsHopByHopAndNamedTokens(self) -> None:
        h = Headers(
            {
                b"Connection": [b"keep-alive, X-Private"],
                b"X-Private": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"Transfer-Encoding": [b"chunked"],
                b"TE": [b"trailers"],
                b"Trailer": [b"X"],
                b"Upgrade": [b"h2c"],
                b"Proxy-Authorization": [b"x"],
                b"Proxy-Connection": [b"keep-alive"],
                b"X-Kept": [b"a", b"b"],
                b"Content-Type": [b"application/json"],
            }
        )
        out = endToEnd(h)
        self.assertEqual(
            sorted(name.lower() for name, _ in out.getAllRawHeaders()), [b"content-type", b"x-kept"]
        )
        self.assertEqual(out.getRawHeaders(b"x-kept"), [b"a", b"b"])

    def test_dropExtra(self) -> None:
        out = endToEnd(Headers({b"Host": [b"x"], b"A": [b"1"]}), drop=frozenset({b"host"}))
        self.assertFalse(out.hasHeader(b"host"))
        self.assertTrue(out.hasHeader(b"a"))

    def test_forwardedAppends(self) -> None:
        h = Headers({b"X-Forwarded-For": [b"10.0.0.1"]})
        appendForwarded(h, "127.0.0.1", b"http")
        self.assertEqual(h.getRawHeaders(b"x-forwarded-for"), [b"10.0.0.1, 127.0.0.1"])
        self.assertEqual(h.getRawHeaders(b"x-forwarded-proto"), [b"http"])
