"""Credentials: where the ``Authorization`` header comes from.

A gateway hands out a static bearer token. Kling's official API hands out an
access key and a secret key instead, from which the client signs a short-lived
HS256 JWT (``iss`` = access key, ``exp`` = now + 30 min, ``nbf`` = now - 5 s) and
signs it again before it expires, or when Kling says it expired (1004) or is not
yet valid (1003, a clock skew symptom).

Secrets are kept out of every ``repr``; nothing here logs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs

from ._exceptions import ConfigurationError

__all__ = ["Credentials", "JWTCredentials", "StaticToken"]

ENV_API_KEY = "KLING_API_KEY"
ENV_ACCESS_KEY = "KLING_ACCESS_KEY"
ENV_SECRET_KEY = "KLING_SECRET_KEY"

MISSING_CREDENTIALS = (
    f"no Kling credentials: pass Client(api_key=...) or Client(access_key=..., secret_key=...), "
    f"or set {ENV_API_KEY} (a gateway token) or {ENV_ACCESS_KEY} and {ENV_SECRET_KEY} "
    "(the official API's key pair); to try it with no key, use kling_async.Client.offline()"
)


def _unusable(value: str) -> str | None:
    """Why ``value`` cannot be a key or token, or ``None`` if it can be one."""
    if not value:
        return "is empty"
    if any(character.isspace() or not character.isprintable() for character in value):
        # Never sent: aiohttp would refuse the header with a bare ValueError.
        return "contains whitespace or control characters"
    return None


def _secret(_instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"{attribute.name} must be a string")
    reason = _unusable(value)
    if reason is not None:
        raise ConfigurationError(f"{attribute.name} {reason}")


def _cleaned(value: str, name: str) -> str:
    """A key as given, without surrounding whitespace: a key pasted or read from
    a file often ends in a newline. Never echoes the key itself."""
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string, got {type(value).__name__}")
    cleaned = value.strip()
    reason = _unusable(cleaned)
    if reason is not None:
        raise ConfigurationError(f"{name} {reason}; leave it out to read it from the environment")
    return cleaned


class Credentials(Protocol):
    """Something that yields the ``Authorization`` header value."""

    def authorization(self) -> str:
        """The header value to send now, e.g. ``"Bearer abc"``."""

    def resign(self) -> bool:
        """Discard the current token so the next call signs a new one.

        Returns whether that can help: a static token cannot be renewed.
        """


@attrs.define
class StaticToken:
    """A fixed bearer token, as a gateway issues."""

    token: str = attrs.field(repr=False, validator=_secret)

    def authorization(self) -> str:
        return f"Bearer {self.token}"

    def resign(self) -> bool:
        return False


@attrs.define
class JWTCredentials:
    """Signs Kling JWTs from an access key and a secret key (needs ``PyJWT``:
    the ``jwt`` extra), caching each token until shortly before
    it expires."""

    access_key: str = attrs.field(repr=False, validator=_secret)
    secret_key: str = attrs.field(repr=False, validator=_secret)
    lifetime: float = 1800.0
    #: Sign a new token this long before the old one expires, so a request
    #: that is slow to reach Kling does not arrive with an expired token.
    renew_before: float = 300.0
    clock: Callable[[], float] = attrs.field(default=time.time, repr=False)
    _token: str | None = attrs.field(default=None, init=False, repr=False)
    _expires_at: float = attrs.field(default=0.0, init=False, repr=False)

    def authorization(self) -> str:
        now = self.clock()
        if self._token is None or now >= self._expires_at - self.renew_before:
            self._token, self._expires_at = self._sign(now)
        return f"Bearer {self._token}"

    def resign(self) -> bool:
        self._token = None
        return True

    def _sign(self, now: float) -> tuple[str, float]:
        try:
            import jwt
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ConfigurationError(
                "signing Kling tokens from an access key needs PyJWT, the jwt extra: "
                "pip install '.[jwt]' in the kling-async checkout, or pip install PyJWT"
            ) from None
        expires_at = now + self.lifetime
        payload = {"iss": self.access_key, "exp": int(expires_at), "nbf": int(now) - 5}
        token = jwt.encode(
            payload, self.secret_key, algorithm="HS256", headers={"alg": "HS256", "typ": "JWT"}
        )
        return token, expires_at


def resolve_credentials(
    api_key: str | None,
    access_key: str | None,
    secret_key: str | None,
    environ: Mapping[str, str] = os.environ,
) -> Credentials | None:
    """Pick credentials from explicit arguments first, then the environment.

    Surrounding whitespace is removed from every key (a trailing newline from a
    file is the usual case); an explicit key that is then empty, or has
    whitespace inside, raises :class:`ConfigurationError`. A blank environment
    variable counts as unset.

    Returns ``None`` when there are none at all: that is reported at the first
    request (with :data:`MISSING_CREDENTIALS`), so building a client never fails
    for lack of a key, e.g. in tests that point it at a fake server later.
    """
    if api_key is not None and (access_key is not None or secret_key is not None):
        raise ConfigurationError("give either api_key or access_key and secret_key, not both")
    if api_key is not None:
        return StaticToken(_cleaned(api_key, "api_key"))
    if access_key is not None or secret_key is not None:
        if access_key is None or secret_key is None:
            raise ConfigurationError("access_key and secret_key must be given together")
        return JWTCredentials(
            _cleaned(access_key, "access_key"), _cleaned(secret_key, "secret_key")
        )
    env_token = environ.get(ENV_API_KEY, "").strip()
    if env_token:
        return StaticToken(_cleaned(env_token, ENV_API_KEY))
    env_access = environ.get(ENV_ACCESS_KEY, "").strip()
    env_secret = environ.get(ENV_SECRET_KEY, "").strip()
    if env_access or env_secret:
        if not (env_access and env_secret):
            raise ConfigurationError(f"set both {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}, or neither")
        return JWTCredentials(
            _cleaned(env_access, ENV_ACCESS_KEY), _cleaned(env_secret, ENV_SECRET_KEY)
        )
    return None
