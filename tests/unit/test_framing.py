"""
The proxy port's framing against h11, the strict pure-Python parser, as a
reference (issue 26): the same bytes through bioproxy's server (llhttp,
by httptools) and through h11 must give the same requests, or the same
refusal. Where they may differ, DIFFERENCES says so and why; any other
disagreement fails.

Inputs are built from pieces, each tagged with what makes it unusual, so
a disagreement is allowed only when the input carries a listed tag.
"""

from __future__ import annotations

from typing import NamedTuple

import h11
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from .test_serve import Connection

Requests = list[tuple[bytes, bytes, bytes]]  # method, target, body of each request read


class Verdict(NamedTuple):
    requests: Requests
    refused: bool


# Where bioproxy and h11 may disagree, and why that is the right side.
DIFFERENCES = {
    # bioproxy refuses, h11 accepts:
    "bare-lf": "a line ended by LF alone: RFC 9112 section 2.2 lets a recipient accept it; a peer "
    "that splits on CRLF alone frames the message otherwise, so it is refused",
    "obs-fold": "a folded header line: RFC 9112 section 5.2 lets a server refuse it with 400; h11 unfolds it",
    "ctl-in-value": "a control byte in a header value: RFC 9110 section 5.5 does not allow it; h11 lets "
    "all but NUL, CR and LF through",
    "unregistered-method": "a method llhttp does not know (or in lower case): llama-server serves none",
    "content-length-list": "Content-Length as a list or repeated with one value: RFC 9110 section 8.6 "
    "lets a recipient accept it or refuse it; refused, as one header with one number is unambiguous",
    "length-and-chunked": "Content-Length beside Transfer-Encoding: RFC 9112 section 6.1 lets a server "
    "ignore the length or refuse; the pair is the classic smuggling input, so it is refused",
    "chunk-size-space": "whitespace after a chunk's size: not in RFC 9112's chunk-size grammar",
    "chunked-in-1.0": "Transfer-Encoding in an HTTP/1.0 request: RFC 9112 section 6.1 says treat it as faulty",
    "not-origin-form": "a target that is not a path (absolute, authority or asterisk form): bioproxy is "
    "no forward proxy, and llama-server routes paths",
    "other-version": "a version other than HTTP/1.0 and HTTP/1.1 (h11 reads any HTTP/d.d as 1.1): "
    "bioproxy serves these two, and says so",
    "upgrade-with-body": "a body on a request that asks to Upgrade: llhttp would not read it; bioproxy "
    "switches no protocol",
    # bioproxy accepts, h11 refuses:
    "leading-empty-line": "an empty line before the request line: RFC 9112 section 2.2 says a server "
    "SHOULD ignore at least one",
    "spaces-before-version": "more than one space between the target and the version: llhttp reads the "
    "target and version unambiguously; nothing about the body's framing changes",
}

ISSUE_INPUTS = [
    # Issue 26, item 4: each was framed by bioproxy's own parser, and is refused by h11.
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=\ny\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\r\nabcde\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nGET /x HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\x0c\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \x0c3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\x0b\r\n\r\nabc",
    # Item 8: control bytes, names that are not tokens, an empty target, Host missing or twice.
    b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX\x01A: ab\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX(A): ab\r\n\r\n",
    b"GET  HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x00\r\n\r\n",
]
# Refused by bioproxy, though h11 lets them through (DIFFERENCES: ctl-in-value, bare-lf).
ISSUE_INPUTS_H11_ACCEPTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
]


def viaBioproxy(raw: bytes, pieces: int = 1) -> Verdict:
    c = Connection(maxBody=1 << 20)
    step = max(1, len(raw) // pieces)
    for i in range(0, len(raw), step):
        c.send(raw[i : i + step])
    statuses = [status for status, _, _ in c.responses() if status != 100]
    return Verdict(list(c.renderer.seen), any(s >= 400 for s in statuses))


def viaH11(raw: bytes) -> Verdict:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(raw)
    out: Requests = []
    request: list[bytes] = []
    try:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                request = [event.method, event.target, b""]
            elif isinstance(event, h11.Data):
                request[2] += event.data
            elif isinstance(event, h11.EndOfMessage):
                out.append((request[0], request[1], request[2]))
                connection.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                connection.send(h11.EndOfMessage())
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    break
                connection.start_next_cycle()
    except h11.RemoteProtocolError:
        return Verdict(out, True)
    return Verdict(out, False)


# -- inputs built from tagged pieces

Piece = tuple[bytes, frozenset[str]]


def piece(raw: bytes, *tags: str) -> Piece:
    return raw, frozenset(tags)


METHODS = [piece(b"GET"), piece(b"POST"), piece(b"DELETE"), piece(b"FOO", "unregistered-method")]
METHODS.append(piece(b"post", "unregistered-method"))
TARGETS = [
    piece(b"/v1/models"),
    piece(b"/v1/chat/completions?x=1"),
    piece(b"/a%2Fb"),
    piece(b"*", "not-origin-form"),
    piece(b"http://h/v1/models", "not-origin-form"),
    piece(b"/a\x01b"),
    piece(b"/a\x7fb"),
    piece(b""),
]
VERSIONS = [
    piece(b"HTTP/1.1"),
    piece(b"HTTP/1.0"),
    piece(b"HTTP/2.0", "other-version"),
    piece(b"HTTP/1.2", "other-version"),
    piece(b"http/1.1"),
]
HEADERS = [
    piece(b"X-A: v"),
    piece(b"X-A:  v w  "),
    piece(b"X-A:"),
    piece(b"X-A: \xe9t\xe9"),
    piece(b"X-A: a\x01b", "ctl-in-value"),
    piece(b"X-A: a\x7fb", "ctl-in-value"),
    piece(b"X-A: a\x00b"),
    piece(b"X-A : v"),
    piece(b"X(A): v"),
    piece(b" X-A: v", "obs-fold"),
    piece(b"X-A: v\r\n folded", "obs-fold"),
    piece(b"Connection: close"),
    piece(b"Connection: keep-alive"),
    piece(b"Expect: 100-continue"),
]
HOSTS = [piece(b"Host: p"), piece(b"Host: p\r\nHost: q"), piece(b"")]


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, frozenset[str]]:
    """One request, or two pipelined, and the tags of what is unusual in them."""
    raw, tags = b"", frozenset[str]()
    for _ in range(draw(st.integers(1, 2))):
        one, more = draw(request())
        raw, tags = raw + one, tags | more
    return raw, tags


@st.composite
def request(draw: st.DrawFn) -> tuple[bytes, frozenset[str]]:
    tags: set[str] = set()

    def take(choices: list[Piece]) -> bytes:
        # The first choice is well-formed: most pieces of most requests are.
        raw, more = choices[0] if draw(st.integers(0, 3)) else draw(st.sampled_from(choices))
        tags.update(more)
        return raw

    eol = b"\r\n"
    if draw(st.integers(0, 9)) == 0:
        eol = b"\n"
        tags.add("bare-lf")
    lead = b""
    if draw(st.integers(0, 9)) == 0:
        lead = b"\r\n"
        tags.add("leading-empty-line")
    method, target = take(METHODS), take(TARGETS)
    space = b" "
    if draw(st.integers(0, 9)) == 0:
        space = b"  "
        tags.add("spaces-before-version")
    version = take(VERSIONS)
    lines = [method + b" " + target + space + version, take(HOSTS)]
    lines += [take(HEADERS) for _ in range(draw(st.integers(0, 2)))]
    body = draw(st.binary(max_size=12))
    framing = draw(
        st.sampled_from(["none", "length", "length", "chunked", "chunked", "lengths", "list", "both", "gzip"])
    )
    encoded = b""
    if framing == "length" or (framing == "none" and body):
        lines.append(b"Content-Length: %d" % len(body))
        encoded = body
    elif framing in ("lengths", "list"):
        tags.add("content-length-list")
        if framing == "list":
            lines.append(b"Content-Length: %d, %d" % (len(body), len(body)))
        else:
            lines += [b"Content-Length: %d" % len(body)] * 2
        encoded = body
    elif framing in ("chunked", "both", "gzip"):
        lines.append(b"Transfer-Encoding: " + (b"gzip, chunked" if framing == "gzip" else b"chunked"))
        if framing == "both":
            lines.append(b"Content-Length: %d" % len(body))
            tags.add("length-and-chunked")
        if version == b"HTTP/1.0":
            tags.add("chunked-in-1.0")
        encoded = draw(chunks(body, eol, tags))
    if body and any(b"upgrade" in line.lower() for line in lines):
        tags.add("upgrade-with-body")
    if draw(st.integers(0, 9)) == 0:
        lines.append(b"Connection: upgrade\r\nUpgrade: h2c")
        if encoded:
            tags.add("upgrade-with-body")
    head = eol.join(line for line in lines if line)
    return lead + head + eol + eol + encoded, frozenset(tags)


@st.composite
def chunks(draw: st.DrawFn, body: bytes, eol: bytes, tags: set[str]) -> bytes:
    out, i = b"", 0
    while i < len(body):
        n = draw(st.integers(1, len(body) - i))
        size = b"%x" % n
        variant = draw(st.sampled_from(["plain", "plain", "plain", "ext", "space", "long", "short"]))
        if variant == "ext":
            size += b";a=b"
        elif variant == "space":
            size += b" "
            tags.add("chunk-size-space")
        data = body[i : i + n]
        if variant == "long":
            data += b"zz"  # bytes after the chunk's data: refused by both
        elif variant == "short":
            data = data[:-1]
        out += size + eol + data + eol
        i += n
    trailer = draw(st.sampled_from([b"", b"", b"X-T: 1" + eol, b"GET /x HTTP/1.1" + eol]))
    return out + b"0" + eol + trailer + eol


class DifferentialTests(SynchronousTestCase):
    def assertAgree(self, raw: bytes, tags: frozenset[str], pieces: int = 1) -> None:
        ours, theirs = viaBioproxy(raw, pieces), viaH11(raw)
        if ours == theirs:
            return
        # Both refusing after the same requests is agreement, whatever each answered before.
        if ours.refused and theirs.refused and ours.requests == theirs.requests:
            return
        listed = tags & DIFFERENCES.keys()
        self.assertTrue(listed, f"bioproxy {ours} and h11 {theirs} disagree on {raw!r}")

    @settings(max_examples=1500, deadline=None)
    @given(requests(), st.integers(1, 7))
    def test_sameAsH11(self, request: tuple[bytes, frozenset[str]], pieces: int) -> None:
        raw, tags = request
        self.assertAgree(raw, tags, pieces)

    def test_issueInputsAreRefused(self) -> None:
        for raw in ISSUE_INPUTS:
            self.assertTrue(viaH11(raw).refused, raw)
            self.assertEqual(viaBioproxy(raw), Verdict([], True), raw)
            self.assertEqual(viaBioproxy(raw, pieces=5), Verdict([], True), raw)
        for raw in ISSUE_INPUTS_H11_ACCEPTS:
            self.assertEqual(viaBioproxy(raw), Verdict([], True), raw)

    def test_everyListedDifferenceIsReached(self) -> None:
        """Each difference is one h11 and bioproxy do have, not a tag that excuses nothing."""
        examples = {
            "bare-lf": b"GET / HTTP/1.1\nHost: p\n\n",
            "obs-fold": b"GET / HTTP/1.1\r\nHost: p\r\nX-A: v\r\n folded\r\n\r\n",
            "ctl-in-value": b"GET / HTTP/1.1\r\nHost: p\r\nX-A: a\x01b\r\n\r\n",
            "unregistered-method": b"FOO / HTTP/1.1\r\nHost: p\r\n\r\n",
            "content-length-list": b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 1, 1\r\n\r\na",
            "chunk-size-space": b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1 \r\na\r\n0\r\n\r\n",
            "length-and-chunked": b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
            "chunked-in-1.0": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
            "not-origin-form": b"GET http://h/ HTTP/1.1\r\nHost: p\r\n\r\n",
            "upgrade-with-body": b"POST / HTTP/1.1\r\nHost: p\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: 1\r\n\r\na",
            "other-version": b"GET / HTTP/1.2\r\nHost: p\r\n\r\n",
            "leading-empty-line": b"\r\nGET / HTTP/1.1\r\nHost: p\r\n\r\n",
            "spaces-before-version": b"GET /  HTTP/1.1\r\nHost: p\r\n\r\n",
        }
        self.assertEqual(examples.keys(), DIFFERENCES.keys())
        for tag, raw in examples.items():
            ours, theirs = viaBioproxy(raw), viaH11(raw)
            self.assertNotEqual(ours.refused, theirs.refused, tag)
