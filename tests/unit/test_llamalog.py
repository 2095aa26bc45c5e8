"""Reading llama-server's trace lines for the copies it made into its RAM cache."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from bioproxy.testing.llamalog import ramCopies

# As llama-server 11434 writes them at -lv 5.
SAVED = b"0.00.911.256 I srv   prompt_save:  - saving prompt with length 764, total state size = 0.382 MiB\n"
SKIPPED = b"0.00.911.257 I srv         alloc:  - prompt is already in the cache, skipping\n"
TOO_BIG = b"0.00.911.258 W srv         alloc:  - prompt state size 9.1 MiB exceeds cache size limit 8.0 MiB, skipping\n"


class RamCopiesTests(SynchronousTestCase):
    def test_copiesAndGivenUp(self) -> None:
        self.assertEqual(ramCopies(b""), 0)
        self.assertEqual(ramCopies(SAVED * 3), 3)
        self.assertEqual(ramCopies(SAVED * 3 + SKIPPED), 2)
        self.assertEqual(ramCopies(SAVED * 2 + SKIPPED + SAVED + TOO_BIG), 1)
