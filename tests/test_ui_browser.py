"""
The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium) against ``twistd swapproxy`` serving fake upstreams.

Without Chromium these tests are skipped on a developer's machine, and fail where
``SWAPPROXY_REQUIRE_BROWSER`` is set (``.ci/run`` sets it after installing the browser): a tier
that cannot run must never pass quietly in CI. A failing test leaves a screenshot of the page
in its temporary directory (``_trial_temp/.../failure.png``).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from swapproxy.testing.local import fake_command, free_port
from tests.support.browser import REQUIRE_VARIABLE, Browser, in_thread, missing
from tests.support.live import config_yaml, make_client, post_chat, write_config
from tests.support.processes import TwistdProcess, freeze, spawn_twistd, wait_for_http, wait_until

log = Logger()

KEY = "sk-dashboard-test"

#: The models of these tests: one that loads for a few seconds printing llama-server's lines,
#: one whose load fails, one that is ready at once.
MODELS = {
    "slowpoke": {
        "cmd": fake_command("--load-time", "3", "--stage-lines", "--model", "slowpoke"),
        "name": "Slow Poke 7B",
        "description": "takes its time",
    },
    "broken": {"cmd": fake_command("--load-time", "1", "--stage-lines", "--exit-during-load", "1")},
    "quick": {"cmd": fake_command(), "aliases": ["fast"]},
}

Test = Callable[["DashboardTestCase"], Coroutine[Any, Any, None]]


def screenshot_on_failure(test: Test) -> Test:
    """
    On failure, save what the browser showed as ``failure.png`` in the test's temporary directory.
    """

    @functools.wraps(test)
    async def run(self: DashboardTestCase) -> None:
        try:
            await test(self)
        except BaseException as e:
            if self.browser is not None:
                path = os.path.abspath(os.path.join(self.mktemp(), "failure.png"))
                try:
                    await in_thread(self.browser.screenshot, path)
                    e.add_note(f"screenshot of the page: {path}")
                    log.error("screenshot of the page: {path}", path=path)
                except Exception as error:
                    e.add_note(f"no screenshot: {error}")
            raise

    return run


class DashboardTestCase(TestCase):
    """
    A swapproxy (``twistd``) and a browser, both stopped when the test ends.
    """

    timeout = 120

    def setUp(self) -> None:
        self.browser: Browser | None = None
        reason = missing()
        if reason is not None:
            if os.environ.get(REQUIRE_VARIABLE):
                self.fail(f"the browser tier must run here ({REQUIRE_VARIABLE} is set), but {reason}")
            raise SkipTest(reason)
        self.client, _ = make_client(self)
        self.state_dir = os.path.abspath(self.mktemp())

    async def start_swapproxy(self, **top: Any) -> TwistdProcess:
        """
        ``twistd swapproxy`` with `MODELS` (and ``top``-level keys), on a free loopback port.
        """
        if not hasattr(self, "config"):
            self.config = write_config(self, config_yaml(MODELS, **top))
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
        process = spawn_twistd(self, self.config, self.port, state_dir=self.state_dir)
        await wait_for_http(self.client, self.url + "/health", process)
        return process

    async def open_browser(self, path: str = "/ui/", header: tuple[str, str] | None = None) -> Browser:
        browser = await in_thread(Browser, os.path.abspath(self.mktemp()))
        self.browser = browser
        self.addCleanup(in_thread, browser.quit)
        if header is not None:
            await in_thread(browser.send_header, *header)
        await in_thread(browser.driver.get, self.url + path)
        return browser

    async def until(self, condition: Callable[[Any], Any], what: str, timeout: float = 20.0) -> Any:
        assert self.browser is not None
        return await in_thread(self.browser.wait, condition, what, timeout)

    async def page_is_live(self) -> None:
        await self.until(lambda d: self.text(d, "connection") == "Live", "the page to connect")

    # -- reading the page (on the browser's thread) ---------------------------------------------

    @staticmethod
    def text(driver: Any, element_id: str) -> str:
        from selenium.webdriver.common.by import By

        return str(driver.find_element(By.ID, element_id).text)

    @staticmethod
    def row(driver: Any, model_id: str) -> Any:
        """
        The models table's row of ``model_id``: the row whose header cell names it.
        """
        from selenium.webdriver.common.by import By

        rows = driver.find_elements(By.XPATH, f"//table[@class='models']//tr[th//*[text()='{model_id}']]")
        return rows[0] if rows else None

    def state(self, driver: Any, model_id: str) -> str | None:
        from selenium.webdriver.common.by import By

        row = self.row(driver, model_id)
        return None if row is None else str(row.find_element(By.XPATH, "td[@data-label='State']").text)

    async def click(self, label: str) -> None:
        """
        Click the button whose accessible name is ``label``.
        """
        from selenium.webdriver.common.by import By

        def click(driver: Any) -> bool:
            buttons = driver.find_elements(By.XPATH, f"//button[@aria-label='{label}' or normalize-space()='{label}']")
            if not buttons or not buttons[0].is_enabled():
                return False
            buttons[0].click()
            return True

        await self.until(click, f"an enabled button {label!r}")


class ModelsViewTests(DashboardTestCase):
    """
    The models view: what is loaded, loading, failed; the buttons.
    """

    @screenshot_on_failure
    async def test_lists_the_models(self) -> None:
        await self.start_swapproxy()
        await self.open_browser("/")  # / leads to the dashboard
        await self.page_is_live()
        for model_id in MODELS:
            await self.until(lambda d, m=model_id: self.state(d, m) == "stopped", f"{model_id} listed as stopped")
        row = await in_thread(lambda: self.row(self.browser.driver, "slowpoke").text)
        self.assertIn("Slow Poke 7B", row)
        self.assertIn("takes its time", row)
        self.assertIn("fast", await in_thread(lambda: self.row(self.browser.driver, "quick").text))
        self.assertEqual(await in_thread(self.browser.errors), [])

    @screenshot_on_failure
    async def test_load_shows_progress_then_unload(self) -> None:
        """
        Load starts the model; its progress bar goes through at least three percentages before
        it shows ready; Unload stops it.
        """
        await self.start_swapproxy()
        browser = await self.open_browser()
        await self.page_is_live()
        await self.until(lambda d: self.state(d, "slowpoke") == "stopped", "slowpoke listed")
        # Every value the bar shows, as the page draws it.
        await in_thread(
            browser.driver.execute_script,
            """
            window.seenPercents = [];
            const record = () => {
              const bar = document.querySelector('tr[data-model="slowpoke"] progress');
              if (bar && bar.isConnected && bar.hasAttribute("value") && window.seenPercents.at(-1) !== bar.value) {
                window.seenPercents.push(bar.value);
              }
            };
            new MutationObserver(record).observe(document.getElementById("model-rows"),
              {subtree: true, childList: true, attributes: true});
            """,
        )
        await self.click("Load slowpoke")
        await self.until(lambda d: self.state(d, "slowpoke") in ("starting", "loading"), "slowpoke loading")
        await self.until(lambda d: self.state(d, "slowpoke") == "ready", "slowpoke ready", timeout=30)
        seen = await in_thread(browser.driver.execute_script, "return window.seenPercents")
        self.assertGreaterEqual(len(set(seen)), 3, f"the bar showed {seen}")
        self.assertEqual(seen, sorted(seen))
        self.assertTrue(all(0 <= percent < 100 for percent in seen), seen)
        running = await self.running()
        self.assertEqual([m["model"] for m in running], ["slowpoke"])

        await self.click("Unload slowpoke")
        await self.until(lambda d: self.state(d, "slowpoke") == "stopped", "slowpoke stopped")
        await wait_until(lambda: self.running_is_empty(), what="no model running")

    async def running(self) -> list[dict[str, Any]]:
        response = await self.client.get(self.url + "/running")
        return list((await response.json())["running"])

    async def running_is_empty(self) -> bool:
        return not await self.running()

    @screenshot_on_failure
    async def test_failure_reason(self) -> None:
        """
        A model that fails to load shows why, with the lines it printed last.
        """
        await self.start_swapproxy()
        await self.open_browser()
        await self.page_is_live()
        await self.click("Load broken")
        await self.until(lambda d: self.state(d, "broken") == "failed", "broken to fail")
        text = await in_thread(lambda: self.row(self.browser.driver, "broken").text)
        self.assertIn("process exited with exit code 1 while starting", text)
        self.assertIn("error: failed to load model 'fake.gguf'", text)


    @screenshot_on_failure
    async def test_hung_model(self) -> None:
        """
        A model that freezes shows ``unhealthy`` and why while it is being killed, and the
        reason stays on its row once it has stopped.
        """
        await self.start_swapproxy(healthCheckInterval=0.5, unloadTimeout=4)
        await self.open_browser()
        await self.page_is_live()
        await self.click("Load quick")
        await self.until(lambda d: self.state(d, "quick") == "ready", "quick ready")
        [entry] = await self.running()
        pid = int(entry["pid"])

        freeze(self, pid)
        await self.until(lambda d: self.state(d, "quick") == "unhealthy", "quick found hung")
        text = await in_thread(lambda: self.row(self.browser.driver, "quick").text)
        self.assertIn("stopped responding: its health check (/health) failed 3 times in a row", text)
        await self.until(lambda d: self.state(d, "quick") == "stopped", "quick killed", timeout=30)
        text = await in_thread(lambda: self.row(self.browser.driver, "quick").text)
        self.assertIn("stopped responding", text)
        self.assertEqual(await in_thread(self.browser.errors), [])


class PeerModelsTests(DashboardTestCase):
    """
    The models of a peer (another ``twistd swapproxy``) on the models view: the state the peer
    reports, its load progress, and whether it can be reached.
    """

    @staticmethod
    def peer_row(driver: Any, model_id: str) -> Any:
        from selenium.webdriver.common.by import By

        rows = driver.find_elements(By.XPATH, f"//table[@class='peers']//tr[th//*[text()='{model_id}']]")
        return rows[0] if rows else None

    def peer_state(self, driver: Any, model_id: str) -> str | None:
        from selenium.webdriver.common.by import By

        row = self.peer_row(driver, model_id)
        return None if row is None else str(row.find_element(By.XPATH, "td[@data-label='State']").text)

    async def stream_chat(self, model: str) -> tuple[int, bytes]:
        response = await self.client.post(
            self.url + "/v1/chat/completions",
            data=json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={b"content-type": [b"application/json"]},
        )
        return response.code, await response.content()

    @screenshot_on_failure
    async def test_peer_models_with_state_and_progress(self) -> None:
        remote_port = free_port()
        remote_url = f"http://127.0.0.1:{remote_port}"
        remote_config = write_config(self, config_yaml(
            {"bigmodel": {"cmd": fake_command("--load-time", "4", "--stage-lines", "--model", "bigmodel")}},
            sendLoadingState=True))
        remote = spawn_twistd(self, remote_config, remote_port, state_dir=os.path.abspath(self.mktemp()))
        await wait_for_http(self.client, remote_url + "/health", remote)
        self.config = write_config(self, config_yaml(
            MODELS, peers={"box": {"proxy": remote_url, "models": ["bigmodel", "missing"]}}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        await self.start_swapproxy()
        browser = await self.open_browser()
        await self.page_is_live()
        await self.until(lambda d: self.peer_state(d, "box/bigmodel") == "stopped", "box/bigmodel listed as stopped")
        await self.until(lambda d: self.peer_state(d, "box/missing") == "not offered by the peer",
                         "box/missing listed as not offered")
        # Read-only: the peer loads and unloads its own models.
        buttons = await in_thread(lambda: self.peer_row(browser.driver, "box/bigmodel").find_elements("tag name", "button"))
        self.assertEqual(buttons, [])
        self.assertIsNone(await in_thread(self.row, browser.driver, "box/bigmodel"), "not among the local models")
        await in_thread(
            browser.driver.execute_script,
            """
            window.peerPercents = [];
            const record = () => {
              const bar = document.querySelector('tr[data-model="box/bigmodel"] progress');
              if (bar && bar.isConnected && bar.hasAttribute("value") && window.peerPercents.at(-1) !== bar.value) {
                window.peerPercents.push(bar.value);
              }
            };
            new MutationObserver(record).observe(document.getElementById("peer-rows"),
              {subtree: true, childList: true, attributes: true});
            """,
        )
        # A streaming request through this swapproxy loads the model on the peer.
        chat = Deferred.fromCoroutine(self.stream_chat("box/bigmodel"))
        await self.until(lambda d: self.peer_state(d, "box/bigmodel") in ("starting", "loading"), "box/bigmodel loading")
        await self.until(lambda d: self.peer_state(d, "box/bigmodel") == "ready", "box/bigmodel ready", timeout=30)
        status, body = await chat
        self.assertEqual(status, 200)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"), body[-200:])
        seen = await in_thread(browser.driver.execute_script, "return window.peerPercents")
        self.assertTrue(seen, "the peer's progress was shown")
        self.assertEqual(seen, sorted(seen))
        text = await in_thread(lambda: self.peer_row(browser.driver, "box/bigmodel").text)
        self.assertIn("box", text)

        remote.signal(signal.SIGTERM)
        self.assertEqual(await remote.ended, 0)
        await self.until(lambda d: self.peer_state(d, "box/bigmodel") == "unreachable", "box unreachable")
        text = await in_thread(lambda: self.peer_row(browser.driver, "box/bigmodel").text)
        self.assertIn("box: unreachable", text)
        self.assertEqual(await in_thread(self.browser.errors), [])


class LogsAndActivityTests(DashboardTestCase):
    @screenshot_on_failure
    async def test_logs_show_what_a_model_printed(self) -> None:
        await self.start_swapproxy()
        browser = await self.open_browser("/ui/#logs")
        await self.page_is_live()
        response = await self.client.post(self.url + "/api/models/load/slowpoke")
        self.assertEqual(response.code, 202)
        await response.content()

        def choose(driver: Any) -> bool:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import Select

            select = Select(driver.find_element(By.ID, "log-source"))
            if "slowpoke" not in [option.text for option in select.options]:
                return False
            select.select_by_visible_text("slowpoke")
            return True

        await self.until(choose, "slowpoke among the logs")
        await self.until(
            lambda d: "llama_context: constructing llama_context" in self.text(d, "log-lines"),
            "a line slowpoke printed",
            timeout=30,
        )
        lines = await in_thread(self.text, browser.driver, "log-lines")
        self.assertNotIn("[INFO] swapproxy", lines)  # the model's log, not swapproxy's

    @screenshot_on_failure
    async def test_activity_row_survives_a_restart(self) -> None:
        """
        A request appears in the activity table as it ends; when swapproxy restarts, the page
        says it lost the connection, comes back by itself, and the request is still listed.
        """
        process = await self.start_swapproxy()
        await self.open_browser("/ui/#activity")
        await self.page_is_live()
        status, _ = await post_chat(self.client, self.url, "fast", fake_tokens=5)
        self.assertEqual(status, 200)

        def quick_row(driver: Any) -> str | None:
            rows = [row.text for row in driver.find_elements("xpath", "//tbody[@id='activity-rows']/tr")]
            return next((row for row in rows if "quick" in row), None)

        row = await self.until(quick_row, "the request's row")
        self.assertIn("/v1/chat/completions", row)
        self.assertIn("200", row)

        process.signal(signal.SIGTERM)
        await process.ended
        await self.until(lambda d: "lost" in self.text(d, "lost"), "the page to say the connection was lost")
        await self.start_swapproxy()
        await self.page_is_live()
        self.assertEqual(await in_thread(self.text, self.browser.driver, "lost"), "")
        row = await self.until(quick_row, "the request's row after the restart")
        self.assertIn("/v1/chat/completions", row)


    @screenshot_on_failure
    async def test_logs_are_bounded(self) -> None:
        """
        A log that grows by 20,000 lines at once, then by hundreds a frame, keeps the page at its
        bound: the newest lines, the oldest dropped.
        """
        await self.start_swapproxy()
        browser = await self.open_browser("/ui/#logs")
        await self.page_is_live()
        shown = await in_thread(
            browser.driver.execute_async_script,
            """
            const done = arguments[arguments.length - 1];
            (async () => {
              const { LogsView, MAX_LINES } = await import("./logs.js");
              const container = document.createElement("div");
              const view = new LogsView({
                container, select: document.createElement("select"),
                follow: document.createElement("input"), clear: document.createElement("button"),
              });
              const frame = () => new Promise((next) => requestAnimationFrame(() => requestAnimationFrame(next)));
              let i = 0;
              for (; i < 20000; i++) view.add({ source: "proxy", data: `line ${i}\n` });
              await frame();
              // Then as a fast printer does: a few hundred lines a frame.
              for (let batch = 0; batch < 5; batch++) {
                for (const end = i + 400; i < end; i++) view.add({ source: "proxy", data: `line ${i}\n` });
                await frame();
              }
              const lines = [...container.children].map((line) => line.textContent);
              done([MAX_LINES, lines.length, lines[0], lines.at(-1)]);
            })().catch((error) => done(String(error)));
            """,
        )
        limit, count, first, last = shown
        self.assertEqual((count, first, last), (limit, f"line {22000 - limit}", "line 21999"))


class KeyTests(DashboardTestCase):
    @screenshot_on_failure
    async def test_no_key_no_data(self) -> None:
        """
        With ``apiKeys``, a browser without the key gets no page and no data; with it (as the
        password of the Basic prompt) it gets both.
        """
        await self.start_swapproxy(apiKeys=[KEY])
        browser = await self.open_browser()
        source = await in_thread(lambda: browser.driver.page_source)
        # (Chromium shows nothing while its Basic prompt would be up: headless, nobody answers it.)
        self.assertNotIn("model-rows", source)
        for model_id in MODELS:
            self.assertNotIn(model_id, source)
        # What the page would read, asked from the browser (on the one page that is open).
        await in_thread(browser.driver.get, self.url + "/health")
        answers = await in_thread(
            browser.driver.execute_async_script,
            """
            const done = arguments[arguments.length - 1];
            Promise.all(["/api/events?activity", "/running", "/api/activity", "/ui/app.js"].map(
              // (Without credentials: with them, Chromium would wait for its Basic prompt.)
              (path) => fetch(path, {credentials: "omit"}).then(async (r) => [r.status, await r.text()])
            )).then(done);
            """,
        )
        self.assertEqual([status for status, _ in answers], [401, 401, 401, 401])
        self.assertFalse(any(model_id in body for _, body in answers for model_id in MODELS))

        credentials = base64.b64encode(f"me:{KEY}".encode()).decode()
        await in_thread(browser.send_header, "Authorization", f"Basic {credentials}")
        await in_thread(browser.driver.get, self.url + "/ui/")
        await self.page_is_live()
        await self.until(lambda d: self.state(d, "quick") == "stopped", "the models, with the key")
