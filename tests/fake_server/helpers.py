"""Helpers of the fake server's tests: request bodies, a thin HTTP client, waiting."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from kling_async.testing import FakeKlingServer, encode_png

GEN = "images/generations"
MULTI = "images/multi-image2image"
AUTH = {"Authorization": "Bearer test-token"}
IMAGE_URL = "https://example.com/subject.png"
SECRET = "s" * 40
Json = dict[str, Any]


def png_b64(width: int = 400, height: int = 400) -> str:
    return base64.b64encode(encode_png(width, height)).decode()


def jpeg_b64(width: int, height: int) -> str:
    """A JPEG header (SOI + SOF0): enough for Kling's header-only checks."""
    frame = struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return base64.b64encode(b"\xff\xd8\xff\xc0" + frame + b"\xff\xd9").decode()


def gen_body(**fields: Any) -> Json:
    return {"model_name": "kling-v3", "prompt": "a red fox", **fields}


def multi_body(**fields: Any) -> Json:
    return {
        "model_name": "kling-v2",
        "subject_image_list": [{"subject_image": IMAGE_URL}],
        **fields,
    }


class Api:
    """A thin HTTP helper: every call returns (HTTP status, parsed JSON, headers)."""

    def __init__(self, session: aiohttp.ClientSession, server: FakeKlingServer) -> None:
        self.session = session
        self.server = server

    async def call(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> tuple[int, Any, Any]:
        async with self.session.request(
            method, self.server.url + path, headers=AUTH if headers is None else headers, **kwargs
        ) as response:
            body = await response.read()
            parsed = json.loads(body) if response.content_type == "application/json" else body
            return response.status, parsed, response.headers

    async def create(self, endpoint: str, body: Any, **kwargs: Any) -> tuple[int, Any, Any]:
        return await self.call("POST", f"/v1/{endpoint}", json=body, **kwargs)

    async def get(self, endpoint: str, ident: str, **kwargs: Any) -> tuple[int, Any, Any]:
        return await self.call("GET", f"/v1/{endpoint}/{ident}", **kwargs)

    async def list(
        self, endpoint: str, *, headers: dict[str, str] | None = None, **params: Any
    ) -> tuple[int, Any, Any]:
        return await self.call("GET", f"/v1/{endpoint}", params=params, headers=headers)

    async def task_id(self, endpoint: str = GEN, **fields: Any) -> str:
        body = gen_body(**fields) if endpoint == GEN else multi_body(**fields)
        status, payload, _ = await self.create(endpoint, body)
        assert status == 200, payload
        return str(payload["data"]["task_id"])

    async def wait_status(
        self, endpoint: str, ident: str, *wanted: str, timeout: float = 3
    ) -> Json:
        deadline = time.monotonic() + timeout
        while True:
            _, payload, _ = await self.get(endpoint, ident)
            if payload["data"]["task_status"] in wanted:
                return dict(payload["data"])
            assert time.monotonic() < deadline, payload
            await asyncio.sleep(0.01)


def assert_envelope(payload: Any, code: int) -> None:
    assert set(payload) == {"code", "message", "request_id", "data"}
    assert payload["code"] == code
    assert isinstance(payload["message"], str)
    uuid.UUID(payload["request_id"])


class Receiver:
    """A loopback HTTP endpoint collecting callback payloads."""

    def __init__(self) -> None:
        self.payloads: list[Json] = []
        self.status = 200
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.payloads.append(await request.json())
        return web.Response(status=self.status)

    def statuses(self) -> list[str]:
        return [payload["task_status"] for payload in self.payloads]
