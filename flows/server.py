"""The Prefect API a command runs against: the configured server, or one temporary server.

Without `PREFECT_API_URL`, Prefect would start a temporary ("ephemeral") server by itself,
give it 20 s to answer (too little on a busy machine: the run then dies with a traceback),
and leave it running when the command is killed with SIGTERM or SIGKILL. So every command
starts its own, once (never per task):
- on 127.0.0.1 only, with Prefect's own app and settings for ephemeral servers, and a
  database of its own in a temporary folder: two commands at once (or a command beside a
  `prefect server start` on the default database) would otherwise lock each other's SQLite
  file ("database is locked"); the temporary server's history goes with it;
- waiting for it as long as `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS` says, or
  `STARTUP_TIMEOUT_S` by default; a server that does not answer becomes one line saying what
  to do (start one with `prefect server start` and set `PREFECT_API_URL`);
- stopped when the command ends, however it ends: normally, on an error, on Ctrl+C, or on
  SIGTERM (turned into the same KeyboardInterrupt as Ctrl+C, see `stop_on_sigterm`); on
  Linux the kernel also stops it when the command dies by SIGKILL (PR_SET_PDEATHSIG).
Local Dask workers inherit `PREFECT_API_URL`, so they report to the same server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from runs.isolated import die_with_parent
from storage.errors import PipelineError

STARTUP_TIMEOUT_S = 300.0
TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def stop_on_sigterm() -> None:
    """SIGTERM (sent by `timeout`, job schedulers, `kill`) interrupts like Ctrl+C, so every
    `finally` runs and the temporary server stops."""
    if sys.platform != "win32":
        signal.signal(signal.SIGTERM, lambda signum, frame: signal.default_int_handler(signum, frame))


def startup_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return STARTUP_TIMEOUT_S
    try:
        return max(1.0, float(value))
    except ValueError:
        raise PipelineError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TemporaryServer:
    """A Prefect API server on 127.0.0.1 for the life of one command."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.home = Path(tempfile.mkdtemp(prefix="mmnews-prefect-server-"))
        self.log = self.home / "server.log"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float) -> None:
        import prefect

        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}"}
        env.pop("PREFECT_API_URL", None)
        parent = os.getpid()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
                 "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=(lambda: die_with_parent(parent)) if sys.platform.startswith("linux") else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PipelineError(f"the temporary Prefect server exited with code {self.process.returncode} "
                                    f"before answering ({self._last_line()}); {self._advice()}")
            if self._healthy():
                return
            time.sleep(0.2)
        raise PipelineError(f"the temporary Prefect server did not answer within {timeout:.0f} s (is the machine "
                            f"busy?); {self._advice()}, or wait longer with {TIMEOUT_ENV}=600")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _last_line(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "no output"

    @staticmethod
    def _advice() -> str:
        return ("start one server once in another terminal (`prefect server start`) and "
                "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, then run the command again")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.home, ignore_errors=True)


def _drain(timeout: float = 10.0) -> None:
    """Send the logs and events still queued for the API while the server still answers."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The API URL of the configured Prefect server, or of a temporary one started here and
    stopped on the way out. Yields the URL."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    if configured:
        yield str(configured)
        return
    server = TemporaryServer()
    try:
        server.start(startup_timeout())
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = server.api_url  # for child processes (local Dask workers)
        try:
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                try:
                    yield server.api_url
                finally:
                    _drain()
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
    finally:
        server.stop()
