"""
The SDKs' own stream helpers through bioproxy to fakellama: the fake must
speak each stream as llama-server 11434 does, or the fast tests trust a
fake the real clients would reject (issue 29: the anthropic SDK's
messages.stream() raised a TypeError against it). The same check runs
against the real llama-server in tests/integration/test_clients.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from bioproxy.testing.fakellama import FakeLlama, FakeLlamaResource

from ..helpers import asyncTest, listen, sdkStreams
from ..stack import Bioproxy, templateText

R: Any = reactor


class StreamHelperTests(TestCase):
    timeout = 60

    @asyncTest
    async def test_anthropicAndResponsesStreams(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        url = listen(R, FakeLlamaResource(FakeLlama(R, saveDir=directory)), self)
        stack = Bioproxy(self, directory, url, {"@t0": templateText(0)})
        got = await threads.deferToThread(sdkStreams, stack.proxy, "@t0 what does this do?")
        self.assertEqual(got["anthropic_final"][0], "assistant")
        self.assertEqual(got["anthropic_final"][1], got["anthropic_text"])
        self.assertEqual(got["anthropic_final"][2], 4)
        self.assertEqual(got["responses_final"][0], "completed")
        self.assertEqual(got["responses_final"][1], got["responses_text"])
        kinds = got["responses_kinds"]
        self.assertEqual((kinds[0], kinds[-1]), ("response.created", "response.completed"))
        self.assertIn("response.output_text.delta", kinds)
