"""Authorization: any bearer token, a static key, or a Kling JWT checked against the clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import jwt

from .helpers import GEN, SECRET, Api


async def test_any_bearer_token_without_configured_credentials(api: Api) -> None:
    status, _, _ = await api.list(GEN)
    assert status == 200
    status, payload, _ = await api.call("GET", f"/v1/{GEN}", headers={})
    assert (status, payload["code"]) == (401, 1001)
    status, payload, _ = await api.call("GET", f"/v1/{GEN}", headers={"Authorization": "Basic abc"})
    assert (status, payload["code"]) == (401, 1002)
    status, payload, _ = await api.call("GET", f"/v1/{GEN}", headers={"Authorization": "Bearer "})
    assert (status, payload["code"]) == (401, 1002)


async def test_static_api_key(serve: Callable[..., Awaitable[Api]]) -> None:
    api = await serve(api_key="right")
    status, payload, _ = await api.list(GEN, headers=None)
    assert (status, payload["code"]) == (401, 1002)
    status, _, _ = await api.call("GET", f"/v1/{GEN}", headers={"Authorization": "Bearer right"})
    assert status == 200
    assert api.server.requests[-1].authorization == "Bearer right"


async def test_jwt_auth_outcomes(serve: Callable[..., Awaitable[Api]]) -> None:
    now = [1_700_000_000.0]
    api = await serve(access_key="ak", secret_key=SECRET, clock=lambda: now[0])

    def token(secret: str = SECRET, **claims: Any) -> dict[str, str]:
        payload = {"iss": "ak", "exp": int(now[0]) + 1800, "nbf": int(now[0]) - 5, **claims}
        signed = jwt.encode(payload, secret, algorithm="HS256", headers={"typ": "JWT"})
        return {"Authorization": f"Bearer {signed}"}

    async def code(headers: dict[str, str]) -> tuple[int, int]:
        status, payload, _ = await api.call("GET", f"/v1/{GEN}", headers=headers)
        return status, payload["code"]

    good = token()
    assert await code(good) == (200, 0)
    assert await code(token(secret="t" * 40)) == (401, 1002)
    assert await code(token(iss="someone-else")) == (401, 1002)
    assert await code({"Authorization": "Bearer not.a.jwt"}) == (401, 1002)
    assert await code(token(nbf=int(now[0]) + 60)) == (401, 1003)
    now[0] += 1801  # the clock moves on and the good token expires
    assert await code(good) == (401, 1004)
