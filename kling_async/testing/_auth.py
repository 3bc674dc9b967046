"""The fake's check of the ``Authorization`` header: a static token or a Kling JWT."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

import attrs

from ._http import Reply, error


@attrs.frozen(kw_only=True)
class Authenticator:
    """Decides whether a request's bearer token is accepted, as Kling would.

    With ``api_key`` the token must equal it. With ``access_key`` and
    ``secret_key`` (instead, or as well) it may be an HS256 JWT signed with
    ``secret_key`` whose ``iss`` is ``access_key`` and whose ``nbf``/``exp`` hold
    at ``clock()`` (Unix seconds). With neither, any non-empty bearer token passes.
    """

    api_key: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    clock: Callable[[], float] = time.time

    def require_library(self) -> None:
        """Raise :class:`RuntimeError` if JWTs are to be checked and PyJWT is missing,
        so the server refuses to start rather than refuse every request."""
        if self.access_key is None:
            return
        try:
            import jwt  # noqa: F401
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise RuntimeError(
                "JWT auth in FakeKlingServer needs PyJWT, the jwt extra: "
                "pip install '.[jwt]' in the kling-async checkout, or pip install PyJWT"
            ) from None

    def check(self, header: str | None) -> Reply | None:
        """``None`` when ``header`` (the ``Authorization`` value) is accepted, else
        the 100x error to answer."""
        if not header:
            return error(1001, "authorization is empty: send 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return error(1002, "authorization is invalid: expected 'Bearer <token>'")
        if self.api_key is None and self.access_key is None:
            return None
        # Constant time, as a real server compares secrets.
        if self.api_key is not None and hmac.compare_digest(token.encode(), self.api_key.encode()):
            return None
        if self.access_key is not None:
            return self._check_jwt(token)
        return error(1002, "authorization is invalid: unknown token")

    def _check_jwt(self, token: str) -> Reply | None:
        import jwt

        assert self.secret_key is not None
        try:
            claims = jwt.decode(
                token,
                self.secret_key,
                algorithms=["HS256"],
                # Times are checked below against the injectable clock instead.
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError as failure:
            return error(1002, f"authorization is invalid: {failure}")
        if claims.get("iss") != self.access_key:
            return error(1002, "authorization is invalid: unknown access key (iss)")
        expires, not_before = claims.get("exp"), claims.get("nbf")
        if isinstance(expires, bool) or not isinstance(expires, (int, float)):
            return error(1002, "authorization is invalid: the token has no numeric exp")
        if not_before is not None and (
            isinstance(not_before, bool) or not isinstance(not_before, (int, float))
        ):
            return error(1002, "authorization is invalid: nbf must be numeric")
        now = self.clock()
        if not_before is not None and now < not_before:
            return error(1003, "authorization is not yet valid (nbf is in the future)")
        if now >= expires:
            return error(1004, "authorization has expired (exp is in the past)")
        return None
