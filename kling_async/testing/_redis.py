"""A throwaway ``redis-server`` on loopback, for tests and benchmarks of the
scale-out code (``kling_async.contrib.redis``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "find_redis_server"]

_START_TIMEOUT = 10.0


def find_redis_server() -> str | None:
    """The ``redis-server`` executable on this machine, if there is one."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in (
        "/usr/bin/redis-server",
        "/usr/sbin/redis-server",
        "/usr/local/bin/redis-server",
    ):
        if Path(candidate).exists():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """``redis-server`` on 127.0.0.1 and a free port, with nothing saved to disk
    (or, with ``appendonly=True``, an AOF fsynced every second, as production
    should run it); a context manager (or :meth:`start` / :meth:`stop`).
    :meth:`pause`, :meth:`resume` and :meth:`restart` play the faults a
    deployment meets: a stalled server, a restart on the same port.

    ::

        with RedisServer() as server:
            redis = redis.asyncio.Redis.from_url(server.url)

    Raises :class:`FileNotFoundError` when no ``redis-server`` is installed
    (``apt-get install redis-server``).
    """

    def __init__(self, executable: str | None = None, *, appendonly: bool = False) -> None:
        self.executable = executable
        self.appendonly = appendonly
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._folder: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        executable = self.executable or find_redis_server()
        if executable is None:
            raise FileNotFoundError(
                "no redis-server on this machine (apt-get install redis-server)"
            )
        self._folder = tempfile.TemporaryDirectory(prefix="kling-redis-")
        for _attempt in range(3):  # another program may take the port first
            self.port = _free_port()
            if self._launch(executable):
                return
        raise RuntimeError("redis-server did not start")

    def _launch(self, executable: str) -> bool:
        assert self._folder is not None
        self._process = subprocess.Popen(
            [
                executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "everysec",
                "--dir", self._folder.name,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if self._wait_ready():
            return True
        self._kill()
        return False

    def pause(self) -> None:
        """Stop the server's process (SIGSTOP): connections hang, as in a stall."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Stop the server and start it again on the same port and folder: what
        it kept is what its persistence settings kept (nothing, by default)."""
        executable = self.executable or find_redis_server()
        assert executable is not None
        self._kill()
        if not self._launch(executable):
            raise RuntimeError("redis-server did not start again")

    def _wait_ready(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return True
            time.sleep(0.05)
        return False

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a paused server cannot stop
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self) -> None:
        """Stop the server and remove its folder. Idempotent."""
        self._kill()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
