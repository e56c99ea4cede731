#!/usr/bin/env python3
"""
Take the README's screenshot of the dashboard: ``twistd swapproxy`` serving fake upstreams in a
few states (ready, loading, failed, stopped) and some requests, photographed by the browser
tier's headless Chromium (``tests/support/browser.py``).

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--dark] [--width 1280]

Needs what the browser tests need: ``apt-get install -y chromium chromium-driver`` and selenium.
Everything runs on loopback and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from swapproxy.testing.local import TWISTD, fake_command, free_port  # noqa: E402
from tests.support.browser import Browser, missing  # noqa: E402
from tests.support.live import config_yaml  # noqa: E402
from tests.support.processes import kill_all  # noqa: E402

MODELS = {
    "qwen2.5-7b-instruct": {
        "cmd": fake_command("--load-time", "1", "--stage-lines", "--tokens", "48", "--token-delay", "0.01"),
        "name": "Qwen 2.5 7B Instruct",
        "description": "general chat, 32k context",
        "aliases": ["qwen", "gpt-4o-mini"],
        "ttl": 900,
    },
    "llama-3.1-8b": {
        "cmd": fake_command("--load-time", "14", "--stage-lines"),
        "name": "Llama 3.1 8B",
        "description": "Q4_K_M, 8k context",
        "ttl": 300,
    },
    "mistral-small-24b": {
        "cmd": fake_command("--load-time", "1", "--stage-lines", "--exit-during-load", "1"),
        "name": "Mistral Small 24B",
    },
    "nomic-embed": {"cmd": fake_command(), "name": "nomic-embed-text v1.5", "aliases": ["embed"]},
    "whisper-large-v3": {"cmd": fake_command(), "name": "Whisper large v3", "description": "speech to text"},
}


def call(url: str, body: object | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:  # an error answer is an answer
        return json.loads(e.read() or b"null")


def running(base: str) -> dict[str, dict]:
    return {m["model"]: m for m in call(base + "/running")["running"]}  # type: ignore[index]


def wait_for(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "dashboard.png"))
    parser.add_argument("--dark", action="store_true")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=860)
    parser.add_argument("--view", default="models", choices=("models", "logs", "activity"))
    args = parser.parse_args()
    reason = missing()
    if reason:
        raise SystemExit(reason)

    work = tempfile.mkdtemp(prefix="swapproxy-screenshot-")
    config = os.path.join(work, "config.yaml")
    with open(config, "w") as f:
        f.write(config_yaml(MODELS, groups={"all": {"swap": False, "exclusive": False, "members": list(MODELS)}}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(os.path.join(work, "twistd.log"), "w")
    twistd = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "swapproxy", "-c", config, "-l", f"tcp:{port}:interface=127.0.0.1",
         "--state-dir", os.path.join(work, "state")],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    browser = None
    try:
        wait_for("swapproxy", lambda: _up(base))
        for model in ("qwen2.5-7b-instruct", "nomic-embed", "mistral-small-24b"):
            call(f"{base}/api/models/load/{model}", {})
        wait_for("the models", lambda: {"qwen2.5-7b-instruct", "nomic-embed"} <= {
            m for m, e in running(base).items() if e["state"] == "ready"})
        for n in range(6):
            model = "qwen" if n % 3 else "embed"
            call(base + "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}]})
        call(base + "/v1/chat/completions", {"model": "qwen", "messages": [], "fake_status": 400})
        browser = Browser(os.path.join(work, "browser"), args.width, args.height, dark=args.dark)
        browser.driver.get(f"{base}/ui/#{args.view}")
        call(f"{base}/api/models/load/llama-3.1-8b", {})
        wait_for("the load to be under way", lambda: ((running(base).get("llama-3.1-8b", {}).get("progress") or {})
                                                      .get("percent") or 0) >= 40, timeout=30)
        time.sleep(0.4)  # the page draws what the last event said
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        browser.screenshot(args.out)
        print(f"saved {args.out}")
    finally:
        if browser is not None:
            browser.quit()
        twistd.send_signal(signal.SIGTERM)
        try:
            twistd.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kill_all([psutil.Process(twistd.pid)])
        log.close()


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    main()
