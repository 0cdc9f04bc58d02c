"""A real Cockpit for the browser tests: a private cockpit-ws on 127.0.0.1, a throwaway login
user (password through PAM, administrative access through sudo), the page installed in that
user's ~/.local/share/cockpit, and headless Chromium driven by Selenium.

Everything here is started by the test and torn down by it, also when the test fails: the
cockpit-ws process group (its sessions and bridges with it), the user and its home, the browser.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

from tests.support.helpers import ROOT

COCKPIT_WS = "/usr/lib/cockpit/cockpit-ws"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PAGE_FRAME = "cockpit1:localhost/virtbackup"


def missing() -> Optional[str]:
    """Why these tests can't run here (None when they can)."""
    for path in (COCKPIT_WS, CHROMIUM, CHROMEDRIVER, "/usr/bin/sudo"):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (scripts/setup-host.sh installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed in the venv"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pids_of(uid: int) -> List[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


class LoginUser:
    """A throwaway user in group sudo with a random password; removed with its home."""

    def __init__(self) -> None:
        self.name = f"vbtest{secrets.token_hex(3)}"
        self.password = secrets.token_urlsafe(12)
        self.home = Path("/home") / self.name
        self.uid: Optional[int] = None

    def create(self) -> "LoginUser":
        subprocess.run(["useradd", "-m", "-G", "sudo", "-s", "/bin/bash", self.name], check=True)
        subprocess.run(["chpasswd"], input=f"{self.name}:{self.password}\n", text=True, check=True)
        self.uid = int(subprocess.run(["id", "-u", self.name], capture_output=True, text=True,
                                      check=True).stdout)
        return self

    def install_page(self) -> Path:
        """scripts/install-cockpit.sh into the user's own Cockpit package directory."""
        dest = self.home / ".local/share/cockpit/virtbackup"
        subprocess.run([str(ROOT / "scripts/install-cockpit.sh"), str(dest)], check=True, capture_output=True)
        subprocess.run(["chown", "-R", f"{self.name}:{self.name}", str(self.home / ".local")], check=True)
        return dest

    def remove(self) -> None:
        """Kill what still runs as the user (by pid), then remove it and its home. Never raises."""
        if self.uid is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in _pids_of(self.uid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, sig)
                time.sleep(0.3)
        subprocess.run(["userdel", "-r", "-f", self.name], capture_output=True, check=False)


class CockpitWS:
    """cockpit-ws without TLS on 127.0.0.1:PORT, in a process group of its own."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "CockpitWS":
        out = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen([COCKPIT_WS, "--no-tls", "--address", "127.0.0.1", "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cockpit-ws exited with {self.proc.returncode}: {self.log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.1)
        raise RuntimeError("cockpit-ws did not listen within 20 s")

    def stop(self) -> None:
        """SIGTERM to the whole group (ws, its sessions and bridges), SIGKILL if it lingers."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


class Browser:
    """Headless Chromium logged in to Cockpit, with the Backups page's frame selected."""

    def __init__(self, ws: CockpitWS, user: LoginUser, shots: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.ws = ws
        self.user = user
        self.shots = shots
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1440,1100", "--lang=en-US"):
            opts.add_argument(arg)
        self.driver: Any = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.driver.set_page_load_timeout(60)

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.driver.quit()

    def login(self, admin: bool = True) -> None:
        """Password login; with `admin`, administrative access asked for up front (the login page
        sends X-Superuser from this localStorage key, as when the user chose it once before)."""
        d = self.driver
        d.get(self.ws.url + "/")
        fields = ("login-user-input", "login-password-input")
        self.wait(lambda: all(d.find_element("id", i).is_displayed() for i in fields), what="the login form")
        d.execute_script("localStorage.setItem(arguments[0], arguments[1])", f"superuser:{self.user.name}",
                         "any" if admin else "none")
        d.find_element("id", "login-user-input").send_keys(self.user.name)
        d.find_element("id", "login-password-input").send_keys(self.user.password)
        d.find_element("id", "login-button").click()
        self.wait(lambda: d.get_cookie("cockpit") and d.find_elements("css selector", "iframe"), timeout=60,
                  what="the login to complete")

    def turn_on_admin(self) -> None:
        """The shell's "Limited access" button and its password dialog, as a user does it."""
        d = self.driver
        d.switch_to.default_content()
        self.wait(lambda: [e for e in self.all("button.ct-locked") if "Limited access" in e.text],
                  what="the Limited access button")[0].click()
        self.wait(lambda: self.all(".pf-c-modal-box input[type=password]"),
                  what="the password dialog")[0].send_keys(self.user.password)
        self.wait(lambda: [e for e in self.all(".pf-c-modal-box button") if e.text == "Authenticate"],
                  what="the Authenticate button")[0].click()
        self.wait(lambda: not self.all(".pf-c-modal-box"), what="the dialog to close")
        d.switch_to.frame(d.find_element("css selector", f"iframe[name='{PAGE_FRAME}']"))

    def open_page(self) -> None:
        d = self.driver
        d.switch_to.default_content()
        d.get(self.ws.url + "/virtbackup")
        frame = self.wait(lambda: d.find_elements("css selector", f"iframe[name='{PAGE_FRAME}']"), timeout=60)[0]
        d.switch_to.frame(frame)
        self.wait_loaded()

    def shell_menu(self) -> List[str]:
        """The entries of Cockpit's navigation menu (the page's frame stays selected)."""
        d = self.driver
        d.switch_to.default_content()
        try:
            names: List[str] = [a.text.strip() for a in self.all("nav a") if a.text.strip()]
        finally:
            d.switch_to.frame(d.find_element("css selector", f"iframe[name='{PAGE_FRAME}']"))
        return names

    def wait(self, cond: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = cond()
            except Exception:  # noqa: BLE001 - stale elements while the page re-renders
                last = None
            if last:
                return last
            time.sleep(0.2)
        self.shot("timeout")
        raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")

    def wait_loaded(self, timeout: float = 90) -> None:
        d = self.driver
        self.wait(lambda: d.find_element("tag name", "body").get_attribute("data-loaded") == "yes",
                  timeout, "the page to load")

    def wait_idle(self, timeout: float = 180) -> None:
        d = self.driver
        self.wait(lambda: d.find_element("tag name", "body").get_attribute("data-busy") == "no"
                  and d.find_element("tag name", "body").get_attribute("data-loaded") == "yes",
                  timeout, "the page to finish its action")

    def css(self, selector: str) -> Any:
        return self.driver.find_element("css selector", selector)

    def all(self, selector: str) -> List[Any]:
        found: List[Any] = self.driver.find_elements("css selector", selector)
        return found

    def click(self, selector: str) -> None:
        self.wait(lambda: self.css(selector).is_enabled(), what=f"{selector} to be enabled")
        self.css(selector).click()

    def text(self, selector: str) -> str:
        value: str = self.css(selector).text
        return value

    def shot(self, name: str) -> Path:
        """A screenshot of the whole Cockpit window (shell and page), kept as a test artefact."""
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.driver.switch_to.default_content()
        try:
            self.driver.save_screenshot(str(path))
        finally:
            frames = self.driver.find_elements("css selector", f"iframe[name='{PAGE_FRAME}']")
            if frames:
                self.driver.switch_to.frame(frames[0])
        print(f"screenshot: {path}")
        return path


@contextlib.contextmanager
def session(workdir: Path, shots: Path, admin: bool = True) -> Iterator[Browser]:
    """A logged-in browser on a private cockpit-ws (with administrative access unless `admin`
    is false), torn down whatever happens."""
    user = LoginUser()
    ws = CockpitWS(workdir / "cockpit-ws.log")
    browser: Optional[Browser] = None
    try:
        user.create()
        user.install_page()
        ws.start()
        browser = Browser(ws, user, shots)
        browser.login(admin)
        yield browser
    finally:
        if browser is not None:
            browser.quit()
        ws.stop()
        user.remove()
