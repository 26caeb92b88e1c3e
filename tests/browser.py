"""A headless Chromium driven by selenium, for the browser tests (the chat page, the eval report).

Debian's `chromium` and `chromium-driver` packages (`.ci/run` installs them when missing) are
used as they are: the driver path is given, so selenium-manager downloads nothing, and the
flags keep Chrome from reaching any other host by itself (updates, sync, field trials).
Tests that need it skip, saying why, when either binary is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # gitignored: screenshots of a test run
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,860")


def start_browser():
    """A fresh Chromium with an empty profile; the caller quits it."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} absent: the browser tests need Debian's chromium and "
                    "chromium-driver (`apt-get install -y chromium chromium-driver`; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="alpaca-jax-chrome-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.profile_dir = profile
    return driver


def quit_browser(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def wait_for(predicate, timeout: float = 60.0, what: str = "the page"):
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def requested_urls(driver) -> list[str]:
    """Every URL the page asked the network for since the last call (the performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


_LOCAL_SCHEMES = ("data", "about", "blob", "chrome")  # never a network request


def foreign_requests(urls: list[str], host: str | None) -> list[str]:
    """The URLs that went to another host than `host` (None: a file:// page, which may read
    files only)."""
    def local(url: str) -> bool:
        parts = urlsplit(url)
        if parts.scheme in _LOCAL_SCHEMES:
            return True
        if parts.scheme == "file":
            return not parts.hostname
        return host is not None and parts.hostname == host
    return [u for u in urls if not local(u)]


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path
