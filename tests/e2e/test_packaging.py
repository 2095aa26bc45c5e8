"""A non-editable install ships the twistd plugin: build the wheel, install it, ask twistd."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from ..helpers import asyncTest

ROOT = Path(__file__).resolve().parents[2]


class WheelTests(TestCase):
    timeout = 300

    @asyncTest
    async def test_wheelInstallListsPlugin(self) -> None:
        work = Path(self.mktemp()).absolute()
        work.mkdir()
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(ROOT)],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        [wheel] = (work / "dist").glob("bioproxy-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        self.assertIn("twisted/plugins/bioproxy_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertIn("bioproxy/testing/fakellama.py", names)
        self.assertIn("bioproxy/py.typed", names)  # the embedding API is typed
        metadata = (
            zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        )
        self.assertIn("License-Expression: MIT", metadata)
        self.assertIn("Project-URL: Go original, https://github.com/okuvshynov/bioproxy", metadata)

        target = work / "site"
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        # Only the installed copy is importable: run from elsewhere, with the
        # dependencies of this environment behind it.
        env = {**os.environ, "PYTHONPATH": str(target)}
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [
                "-c",
                "import bioproxy, sys; from twisted.scripts.twistd import run; "
                "assert bioproxy.__file__.startswith(sys.argv[1]), bioproxy.__file__; run()",
                str(target),
                "--help",
            ],
            env=env,
            path=str(work),
        )
        self.assertIn(b"bioproxy", out, err)
        # The `bioproxy` command is in the wheel's entry points, and runs.
        entryPoints = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        self.assertIn("bioproxy = bioproxy.cli:main", zipfile.ZipFile(wheel).read(entryPoints).decode())
        script = target / "bin" / "bioproxy"
        self.assertTrue(script.exists(), sorted(p.name for p in (target / "bin").iterdir()))
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [str(script), "--version"], env=env, path=str(work)
        )
        self.assertEqual((code, out.decode().split()[0]), (0, "bioproxy"), err)
