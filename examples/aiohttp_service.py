"""An aiohttp web service that generates images with Kling, answered by Kling's callback.

What it shows
-------------
* ``POST /generate`` with ``{"prompt": "...", "n": 2}`` submits a text-to-image task
  and answers once the task has ended: ``{"task_id", "status", "images": [url, ...]}``.
* The task is resolved by Kling's callback, not by polling. A
  :class:`kling_async.CallbackReceiver` is mounted in the same app under
  ``/kling/callbacks``; the client gives every task its own unguessable callback URL
  there, and polls only as a slow safety net for callbacks that never come.
* The client (and, offline, the fake Kling server) lives exactly as long as the app:
  it is opened in a ``cleanup_ctx`` and closed on shutdown.
* Errors become HTTP answers: an invalid field is 400 naming the field, a failed
  task is 422 with Kling's reason, a Kling error is 502 with its code and
  request_id, and a wait that runs out is 504 with the task id (the task keeps
  running; nothing is lost).

Run it
------
::

    python examples/aiohttp_service.py --mock --demo   # start, send itself one request, print it
    python examples/aiohttp_service.py                 # serve on 127.0.0.1:8080
    curl -s 127.0.0.1:8080/generate -d '{"prompt": "a lighthouse at dusk", "n": 2}'

With no Kling credentials in the environment (``KLING_API_KEY``, or
``KLING_ACCESS_KEY`` and ``KLING_SECRET_KEY``), or with ``--mock``, the service
runs an offline simulation: an embedded ``kling_async.testing.FakeKlingServer`` on
127.0.0.1 plays Kling, callbacks included, and says so on stderr.

Against the real API, Kling must be able to reach the callback URL. Pass the public
URL the receiver is reachable at (through your load balancer or a tunnel)::

    KLING_API_KEY=... python examples/aiohttp_service.py \\
        --public-url https://images.example.com/kling/callbacks

(or set ``KLING_CALLBACK_URL``). Only the last two path segments of a callback URL
matter to the receiver, so a proxy may map it to any path. Without it the URL is
made from the bound host and port, which Kling cannot reach from the internet:
then the polling safety net answers instead, about 30 s after a task ends. Several
instances behind one load balancer must share ``KLING_CALLBACK_SECRET``, which keys
the per-task callback tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

import kling_async
from kling_async.testing import FakeKlingServer

#: Where the callback receiver is mounted in the app.
CALLBACK_PATH = "/kling/callbacks"
ENV_CALLBACK_URL = "KLING_CALLBACK_URL"
OFFLINE_NOTICE = (
    "aiohttp_service: OFFLINE SIMULATION - no Kling credentials are set (or --mock was "
    "given), so tasks run on a fake Kling server on 127.0.0.1 and the images are "
    "placeholder PNGs. Set KLING_API_KEY (or KLING_ACCESS_KEY and KLING_SECRET_KEY) to use Kling."
)


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """How the service reaches Kling and where Kling reaches it.

    ``callback_url`` is the receiver's public URL: every task gets a callback URL
    under it. ``mock`` runs an embedded fake Kling server instead of the real API.
    ``api_key`` and ``base_url`` default to the environment (``KLING_API_KEY`` or
    the key pair, ``KLING_BASE_URL``). ``wait_timeout`` bounds how long a request
    waits for its task before answering 504.
    """

    callback_url: str
    mock: bool = False
    api_key: str | None = None
    base_url: str | None = None
    wait_timeout: float = 300.0
    polling: kling_async.PollPolicy | None = None
    mock_task_seconds: float = 1.5


SETTINGS = web.AppKey("settings", ServiceSettings)
RECEIVER = web.AppKey("receiver", kling_async.CallbackReceiver)
CLIENT = web.AppKey("client", kling_async.Client)


def create_app(settings: ServiceSettings) -> web.Application:
    """The service: ``POST /generate`` plus the callback receiver at :data:`CALLBACK_PATH`."""
    app = web.Application()
    app[SETTINGS] = settings
    # aiohttp freezes the router before startup, so the receiver's sub-app must be
    # mounted now. Building the receiver does no I/O and opens nothing; the client
    # it feeds is made, and everything closed, in kling_lifetime.
    receiver = kling_async.CallbackReceiver(settings.callback_url)
    app[RECEIVER] = receiver
    app.add_subapp(CALLBACK_PATH, receiver.aiohttp_app())
    app.router.add_post("/generate", generate)
    app.cleanup_ctx.append(kling_lifetime)
    return app


async def kling_lifetime(app: web.Application) -> AsyncIterator[None]:
    """Open the Kling client on startup; close it, the receiver and any fake on shutdown."""
    settings, receiver = app[SETTINGS], app[RECEIVER]
    async with contextlib.AsyncExitStack() as stack:
        api_key, base_url = settings.api_key, settings.base_url
        if settings.mock:
            print(OFFLINE_NOTICE, file=sys.stderr)
            if not is_loopback(settings.callback_url):
                print(
                    "aiohttp_service: the fake server only calls back to loopback URLs; "
                    f"{settings.callback_url} gets no callbacks, so polling will answer",
                    file=sys.stderr,
                )
            fake = await stack.enter_async_context(
                FakeKlingServer(
                    task_duration=settings.mock_task_seconds,
                    processing_delay=settings.mock_task_seconds / 4,
                )
            )
            api_key, base_url = "offline-simulation", fake.url
        stack.push_async_callback(receiver.close)  # closed after the client, before the fake
        app[CLIENT] = await stack.enter_async_context(
            kling_async.Client(
                api_key, base_url=base_url, callbacks=receiver, polling=settings.polling
            )
        )
        yield


async def generate(request: web.Request) -> web.Response:
    """``POST /generate {"prompt": str, "n": int}``: submit, wait, answer with the images."""
    try:
        body = await request.json()
    except ValueError:
        return _problem(400, "the body must be a JSON object", field=None)
    if not isinstance(body, dict):
        return _problem(400, "the body must be a JSON object", field=None)
    client, settings = request.app[CLIENT], request.app[SETTINGS]
    handle: kling_async.TaskHandle | None = None
    try:
        # The SDK checks every field (types included) before sending anything.
        handle = await client.images.generate(prompt=body.get("prompt"), n=body.get("n"))
        task = await handle.wait(timeout=settings.wait_timeout)
    except kling_async.ValidationError as error:
        return _problem(400, error.rule, field=error.field)
    except kling_async.TaskFailedError as error:
        return _problem(
            422,
            error.task.status_message or "the task failed",
            task_id=error.task.task_id,
            status=error.task.status.value,
        )
    except kling_async.TaskTimeoutError as error:
        status = error.handle.status
        return _problem(
            504,
            f"the task did not finish within {error.timeout:g}s; it is still running",
            task_id=error.handle.task_id,
            status=status.value if status else None,
        )
    except kling_async.APIError as error:
        return _problem(
            502,
            error.message,
            code=error.code,
            request_id=error.request_id,
            task_id=handle.task_id if handle else None,
        )
    except kling_async.TransportError as error:
        return _problem(502, f"Kling could not be reached: {error}")
    return web.json_response(
        {
            "task_id": task.task_id,
            "status": task.status.value,
            "images": [image.url for image in task.images],
        }
    )


def _problem(http_status: int, message: str, /, **details: Any) -> web.Response:
    return web.json_response({"error": message, **details}, status=http_status)


# --- running it ---------------------------------------------------------------------


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log without callback tokens: a callback URL is the credential
    that lets a request speak for its task, so it stays out of log files."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = request.path
        if path.startswith(CALLBACK_PATH + "/"):
            path = CALLBACK_PATH + "/<redacted>"
        self.logger.info(
            '%s "%s %s" %d %.1f ms',
            request.remote,
            request.method,
            path,
            response.status,
            time * 1000,
        )


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (so the fake server will call it back)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket bound now, so the port (and the callback URL) is known
    before the app starts, even for port 0."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def local_callback_url(sock: socket.socket) -> str:
    """The receiver's URL on the address ``sock`` is bound to."""
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:  # 0.0.0.0 or ::
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{CALLBACK_PATH}"


def has_credentials() -> bool:
    """Whether the environment names Kling credentials the client can use."""
    return bool(
        os.environ.get("KLING_API_KEY")
        or (os.environ.get("KLING_ACCESS_KEY") and os.environ.get("KLING_SECRET_KEY"))
    )


async def demo(settings: ServiceSettings, sock: socket.socket) -> int:
    """Serve on ``sock``, send one ``POST /generate`` to ourselves, print the answer."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        request = {"prompt": "a lighthouse at dusk, oil painting", "n": 2}
        print(f"aiohttp_service: POST /generate {json.dumps(request)}", file=sys.stderr)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://{host}:{port}/generate", json=request) as response,
        ):
            answer = await response.json()
        print(json.dumps(answer, indent=2))
        return 0 if response.status == 200 else 1
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="An aiohttp service that generates images with Kling, resolved by callback."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (default 8080)")
    parser.add_argument(
        "--public-url",
        default=os.environ.get(ENV_CALLBACK_URL),
        help=f"the callback receiver's URL as Kling reaches it [env: {ENV_CALLBACK_URL}]; "
        f"default: http://HOST:PORT{CALLBACK_PATH}",
    )
    parser.add_argument("--mock", action="store_true", help="use an embedded fake Kling server")
    parser.add_argument(
        "--demo", action="store_true", help="serve on a free loopback port, request once, exit"
    )
    parser.add_argument(
        "--wait-timeout", type=float, default=300.0, help="seconds a request waits for its task"
    )
    arguments = parser.parse_args(argv)
    mock = arguments.mock or not has_credentials()

    sock = bind("127.0.0.1", 0) if arguments.demo else bind(arguments.host, arguments.port)
    callback_url = arguments.public_url or local_callback_url(sock)
    settings = ServiceSettings(
        callback_url=callback_url, mock=mock, wait_timeout=arguments.wait_timeout
    )
    if not mock and not arguments.public_url:
        print(
            "aiohttp_service: no --public-url, so Kling cannot reach the callback URL; "
            "tasks will be answered by the polling safety net",
            file=sys.stderr,
        )
    if arguments.demo:
        return asyncio.run(demo(settings, sock))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = sock.getsockname()[:2]
    print(
        f"aiohttp_service: POST http://{host}:{port}/generate; Kling calls back at {callback_url}",
        file=sys.stderr,
    )
    web.run_app(create_app(settings), sock=sock, print=None, access_log_class=AccessLogger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
