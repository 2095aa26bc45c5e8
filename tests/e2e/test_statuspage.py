"""
The status page in a real headless browser (Debian's chromium and
chromium-driver, selenium from PyPI; `make test` installs them as root):
what it renders from a running bioproxy, with admin_token set.

BIOPROXY_SCREENSHOT=path saves what the browser shows (the README's picture).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from twisted.internet import reactor, threads
from twisted.trial.unittest import SkipTest, TestCase

from bioproxy.heads import templateHead
from bioproxy.router import rendezvous
from bioproxy.testing.fakellama import FakeLlama, FakeLlamaResource, FakeRouter

from ..helpers import asyncTest, listen, membersSettled, until
from ..stack import Bioproxy, templateText
from .test_cli import bioproxy

R: Any = reactor
TOKEN = "s3cret"


def browser() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise SkipTest("selenium is not installed") from None
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        raise SkipTest("chromium and chromium-driver are missing (Debian packages; make test installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


_READ_PAGE = """
const rows = id => Array.from(document.querySelectorAll("#" + id + " tbody tr")).map(
  tr => Array.from(tr.querySelectorAll("td")).map(td => td.innerText.trim()));
const text = id => document.getElementById(id).innerText.trim();
return {templates: rows("templates"), slots: rows("slots"), requests: rows("requests"),
        backend: text("backend"), ready: text("ready"), model: text("model"), error: text("error"),
        width: document.documentElement.scrollWidth};
"""


def rendered(url: str, screenshot: str | None) -> dict[str, Any]:
    """In a thread (selenium blocks): open the page and read what it rendered once it has data."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        driver.get(url)

        def loaded(d: Any) -> bool:
            requests = d.find_elements(By.CSS_SELECTOR, "#requests tbody tr")
            return bool(requests) and "up" in d.find_element(By.ID, "backend").text

        WebDriverWait(driver, 20).until(loaded)

        if screenshot:
            driver.save_screenshot(screenshot)
        # Read in one script: the page renders again every 2 s, and elements
        # read one by one (slowly, on loaded cores) can be replaced midway.
        page: dict[str, Any] = driver.execute_script(_READ_PAGE)
        return page
    finally:
        driver.quit()


class StatusPageTests(TestCase):
    timeout = 120

    @asyncTest
    async def test_rendersTemplatesSlotsAndRequests(self) -> None:
        browser().quit()  # skips here, before anything starts, when there is no browser
        directory = Path(self.mktemp()).absolute()
        (directory / "slots").mkdir(parents=True)
        llama = FakeLlama(R, slots=2, unified=False, saveDir=directory / "slots")
        stack = Bioproxy(
            self,
            directory,
            listen(R, FakeLlamaResource(llama), self),
            {"@code": templateText(1), "@debug": templateText(2)},
            admin_token=TOKEN,
        )
        stack.headers = {}
        await stack.allWarm()
        await stack.chat("@code what does this do?")
        system = {"role": "system", "content": "You review Python. " * 40}
        for _ in range(2):  # a variant: the template behind a system prompt, learned on its first use
            await stack.chat(
                "@code and this?", messages=[system, {"role": "user", "content": "@code and this?"}]
            )
        page = await threads.deferToThread(
            rendered, f"{stack.admin}/?token={TOKEN}", os.environ.get("BIOPROXY_SCREENSHOT")
        )
        self.assertEqual(page["error"], "")
        self.assertIn("up", page["backend"])
        self.assertEqual(page["ready"], "ready")
        self.assertIn("a restored cache file reuses any shared prefix", page["model"])
        templates = {row[0]: row for row in page["templates"]}
        # The variant by its template and what precedes it: roles and sizes, never text.
        self.assertEqual(set(templates), {"@code", "@debug", "@code after system 760 B"})
        for row in templates.values():
            self.assertIn(row[1], ("warm in a slot", "on disk", "warm in llama-server's RAM cache"), row)
        self.assertEqual(templates["@code"][3], "1")  # one hit
        self.assertGreater(int(templates["@code"][6]), 0, "tokens saved")
        self.assertEqual([row[0] for row in page["slots"]], ["0", "1"])
        chat = [row for row in page["requests"] if row[1] == "POST /v1/chat/completions"][-1]  # the first
        self.assertRegex(chat[0], r"^\d\d:\d\d:\d\d$")
        self.assertEqual((chat[2], chat[3], chat[4]), ("200", "@code", "warm in a slot"))
        self.assertGreater(int(chat[5]), 0, "cached tokens shown")
        self.assertRegex(chat[9], r"^[0-9a-f]{16}$")
        self.assertLessEqual(page["width"], 1280, "the page fits a 1,280 px window")

    @asyncTest
    async def test_twoBackendsEightTemplates(self) -> None:
        """
        Issue 27: every backend's templates and slots, not the first's.
        Each template is warm on one backend (warm_on 1) and used once
        there; the page, /templates and `bioproxy status` say where, and
        count its hit, whichever backend it is on.
        """
        browser().quit()
        directory = Path(self.mktemp()).absolute()
        urls = []
        for name in ("a", "b"):
            (directory / name).mkdir(parents=True)
            llama = FakeLlama(R, slots=2, unified=False, saveDir=directory / name)
            urls.append(listen(R, FakeLlamaResource(llama), self))
        prefixes = {f"@t{i}": templateText(i) for i in range(8)}
        stack = Bioproxy(self, directory, urls[0], prefixes, admin_token=TOKEN, backends=urls)
        stack.headers = {"Authorization": f"Bearer {TOKEN}"}
        router = stack.service.getServiceNamed("proxy").factory.resource.dispatcher
        await until(R, lambda: membersSettled(router.members), timeout=60, what="warmups on both backends")
        for prefix in prefixes:
            await stack.chat(f"{prefix} what does this do?")
        # A warmup a user's request preempted leaves its slot unknown until it runs again.
        await until(R, lambda: membersSettled(router.members), timeout=60, what="warmups after the requests")
        listing = await (await stack.http.get(stack.admin + "/templates", headers=stack.headers)).json()
        home = {t["prefix"]: t["warmest_backend"] for t in listing["templates"]}
        # Each where rendezvous hashing puts it: spread over both (all on one
        # only when the hash says so, as it does for 1 in 128 pairs of ports).
        library = stack.service.getServiceNamed("templates").library
        hashed = {
            p: rendezvous(templateHead(library.templates[p]).key, router.members)[0].name for p in prefixes
        }
        self.assertEqual(home, hashed)
        stack.headers = {}
        page = await threads.deferToThread(rendered, f"{stack.admin}/?token={TOKEN}", None)
        self.assertEqual(page["error"], "")
        for url in urls:
            self.assertIn(f"{url}: up", page["backend"])
            self.assertIn(f"at {url}:", page["model"])
        rows = {row[0]: row for row in page["templates"]}
        self.assertEqual(set(rows), set(prefixes))
        for prefix, row in rows.items():
            state, where = row[1].split(" at ")
            # Two slots each, four templates each: two in slots, two a restore away.
            self.assertIn(state, ("warm in a slot", "on disk"), row)
            self.assertEqual(where, home[prefix])
            self.assertEqual(row[3], "1", f"its one hit, on {where}: {row}")
        slots = [row[0] for row in page["slots"]]
        self.assertEqual(slots, [f"{url} {i}" for url in urls for i in (0, 1)])
        for row in page["slots"]:
            self.assertNotEqual(row[2], "unknown", row)
        out, err, code = await bioproxy("status", "--admin", stack.admin, "--token", TOKEN, cwd=directory)
        self.assertEqual(code, 0, err)
        for prefix in prefixes:
            self.assertRegex(out, rf"{prefix}\s+(warm in a slot|on disk)\s+{home[prefix]}\s+1\s")
        for url in urls:
            self.assertEqual(sum(1 for line in out.splitlines() if line.startswith(url)), 2, out)

    @asyncTest
    async def test_routerModeShowsEachModel(self) -> None:
        """
        Issue 28: behind llama-server's router (fakellama's FakeRouter, one
        model loaded at a time), the page shows each model where the
        backends are: the router up, the model that is loaded up and
        warm, the other not loaded and why.
        """
        browser().quit()
        directory = Path(self.mktemp()).absolute()
        directory.mkdir(parents=True)
        models = {name: FakeLlama(R, slots=2, saveDir=directory) for name in ("alpha", "beta")}
        url = listen(R, FakeRouter(models, modelsMax=1), self)
        stack = Bioproxy(self, directory, url, {"@t0": templateText(0)}, admin_token=TOKEN, models=["alpha"])
        stack.headers = {"Authorization": f"Bearer {TOKEN}"}
        watch = stack.service.getServiceNamed("models")
        await until(R, lambda: len(watch.units) == 2, timeout=30, what="a unit per model")
        await stack.chat("@t0 what does this do?", model="alpha")
        alpha = watch.units[f"{url}#alpha"]
        await until(R, lambda: membersSettled([alpha]), timeout=30, what="alpha's warmups")
        stack.headers = {}
        page = await threads.deferToThread(rendered, f"{stack.admin}/?token={TOKEN}", None)
        self.assertEqual(page["error"], "")
        self.assertIn(f"{url}: up", page["backend"])
        self.assertIn(f"{url}#alpha: up", page["backend"])
        self.assertIn(f"{url}#beta: down (the router has not loaded this model", page["backend"])
        self.assertIn(f"at {url}#alpha:", page["model"])
        rows = {row[0]: row for row in page["templates"]}
        self.assertEqual(rows["@t0"][1], f"warm in a slot at {url}#alpha", rows)
        self.assertEqual({row[0].rsplit(" ", 1)[0] for row in page["slots"]}, {f"{url}#alpha", f"{url}#beta"})

    @asyncTest
    async def test_refusedWithoutTheToken(self) -> None:
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        llama = FakeLlama(R)
        stack = Bioproxy(self, directory, listen(R, FakeLlamaResource(llama), self), {}, admin_token=TOKEN)
        response = await stack.http.get(stack.admin + "/", headers={"Accept": "text/html"})
        self.assertEqual(response.code, 401)
        response = await stack.http.get(stack.admin + f"/?token={TOKEN}", headers={"Accept": "text/html"})
        self.assertEqual(response.code, 200)
        self.assertIn(b"<title>bioproxy</title>", await response.content())
        # The query token opens the page only, not the data behind it.
        response = await stack.http.get(stack.admin + f"/status?token={TOKEN}")
        self.assertEqual(response.code, 401)
