from __future__ import annotations

from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from bioproxy.headers import RawHeaders, appendForwarded, endToEnd


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


class RawHeadersTests(TestCase):
    def test_namesAreCaseInsensitiveAndValuesKeepTheirOrder(self) -> None:
        h = RawHeaders()
        h.addRawHeader(b"X-A", b"1")
        h.addRawHeader(b"x-a", b"2")
        self.assertEqual(h.getRawHeaders(b"X-a"), [b"1", b"2"])
        self.assertTrue(h.hasHeader(b"X-A"))
        h.removeHeader(b"X-A")
        self.assertIsNone(h.getRawHeaders(b"x-a"))

    def test_aValueCannotSplitAHeader(self) -> None:
        h = RawHeaders()
        for value in (b"a\r\nX-Injected: 1", b"a\nb", b"a\rb"):
            self.assertRaises(ValueError, h.setRawHeaders, b"x-template", [value])
        self.assertFalse(h.hasHeader(b"x-template"))

    def test_twistedHeadersAndCopies(self) -> None:
        h = RawHeaders()
        h.setRawHeaders(b"Content-Type", [b"application/json"])
        copy = h.copy()
        copy.setRawHeaders(b"content-type", [b"text/plain"])
        self.assertEqual(h.twisted().getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(endToEnd(copy).getRawHeaders(b"content-type"), [b"text/plain"])
