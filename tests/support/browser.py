"""
A headless Chromium driven by Selenium through Debian's ``chromedriver``, for the dashboard's
browser tests (``tests/test_ui_browser.py``) and its screenshot (``scripts/dashboard_screenshot.py``).

Selenium's calls block, so tests run them on a thread (`in_thread`), leaving the reactor free to
read the output of the swapproxy they test. Chromium runs with a fresh profile, no network of its
own (no updates, no sync, no QUIC), and is killed with every process it started when the test ends.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from tests.support.processes import kill_all, survivors

T = TypeVar("T")

#: Set (by ``.ci/run``) where the browser tier must run: a missing browser fails it instead of skipping it.
REQUIRE_VARIABLE = "SWAPPROXY_REQUIRE_BROWSER"

HOW_TO_INSTALL = (
    "the dashboard's browser tests need Chromium, its driver and Selenium: "
    "apt-get install -y chromium chromium-driver, and pip install -e '.[test]' (selenium)"
)

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromedriver() -> str | None:
    return shutil.which("chromedriver")


def missing() -> str | None:
    """
    Why the browser tier cannot run here, or ``None`` when it can.
    """
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"selenium is not installed; {HOW_TO_INSTALL}"
    if chromium() is None:
        return f"no chromium on PATH; {HOW_TO_INSTALL}"
    if chromedriver() is None:
        return f"no chromedriver on PATH; {HOW_TO_INSTALL}"
    return None


class Browser:
    """
    One headless Chromium window.

    :param profile: a new, empty directory for the browser's profile and the driver's log.
    :param width: the window's width in CSS pixels (a phone is about 400).
    :param dark: ask for the dark colour scheme (``prefers-color-scheme: dark``).
    """

    def __init__(self, profile: str, width: int = 1280, height: int = 900, dark: bool = False) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        os.makedirs(profile, exist_ok=True)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium() or "chromium"
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={os.path.join(profile, 'chromium')}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.service = Service(chromedriver() or "chromedriver", log_output=os.path.join(profile, "chromedriver.log"))
        self.driver = webdriver.Chrome(options=options, service=self.service)
        self._driver_pid = self.service.process.pid
        if dark:
            self.driver.execute_cdp_cmd(
                "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
            )

    def send_header(self, name: str, value: str) -> None:
        """
        Send this header with every request from now on (the page's, and its event stream's).
        """
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {name: value}})

    def wait(self, condition: Callable[[Any], T], what: str, timeout: float = 20.0) -> T:
        """
        Wait until ``condition(driver)`` is true (it is asked every 50 ms); returns its value.

        :raises AssertionError: naming ``what`` when it is still false after ``timeout`` seconds.
        """
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.wait import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(condition)
        except TimeoutException:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}") from None

    def errors(self) -> list[str]:
        """
        The errors the page's console showed since the last call (failed loads, uncaught exceptions).
        """
        return [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]

    def screenshot(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.driver.save_screenshot(path)

    def quit(self) -> None:
        """
        Close the browser and kill whatever is left of it and its driver.
        """
        try:
            leftovers = psutil.Process(self._driver_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            leftovers = []
        try:
            self.driver.quit()
        except Exception:
            pass
        self.service.stop()
        kill_all(survivors(leftovers, grace=5.0))
        try:
            kill_all([psutil.Process(self._driver_pid)])
        except psutil.NoSuchProcess:
            pass


def in_thread(f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    """
    Run a blocking browser call on the reactor's thread pool.
    """
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)
