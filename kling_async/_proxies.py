"""Which proxy a request goes through: the environment's, decided once per host.

aiohttp's ``trust_env=True`` asks the environment for a proxy, and ``.netrc`` for
credentials, on a worker thread for every single request: two thread hops per
create, which cut the SDK's creates per second to a quarter on loopback. Here the
environment is read once, when the client's session starts, and each host's
answer is kept. ``.netrc`` is not read: every request to Kling carries its own
``Authorization`` (aiohttp refuses a netrc login beside it), and result URLs on
a CDN must get no credentials at all.
"""

from __future__ import annotations

import base64
import logging
import urllib.request
from collections.abc import Mapping
from typing import Final

import attrs
from yarl import URL

logger = logging.getLogger("kling_async")

#: Hosts whose route is remembered; past this the memory starts afresh (result
#: URLs come from a handful of CDN hosts, so this is never reached in practice).
MAX_REMEMBERED_HOSTS: Final = 256


@attrs.frozen
class ProxyRoute:
    """The ``proxy`` and ``proxy_headers`` arguments of one aiohttp request."""

    proxy: str | None = None
    #: ``Proxy-Authorization`` when the proxy's URL has a login: kept out of reprs.
    headers: Mapping[str, str] | None = attrs.field(default=None, repr=False)


DIRECT: Final = ProxyRoute()


class EnvironmentProxies:
    """``HTTP_PROXY``, ``HTTPS_PROXY`` and ``NO_PROXY`` (either case) as read once,
    as requests and httpx honour them; :meth:`route` gives a URL's route."""

    def __init__(self, proxies: Mapping[str, str] | None = None) -> None:
        self._proxies = dict(
            urllib.request.getproxies_environment() if proxies is None else proxies
        )
        self._routes: dict[tuple[str, str | None, int | None], ProxyRoute] = {}

    def route(self, url: str) -> ProxyRoute:
        """The route of a request to ``url``: through the proxy the environment
        sets for its scheme, unless ``NO_PROXY`` names its host."""
        if not self._proxies:
            return DIRECT
        parsed = URL(url)
        key = (parsed.scheme, parsed.host, parsed.port)
        route = self._routes.get(key)
        if route is None:
            if len(self._routes) >= MAX_REMEMBERED_HOSTS:
                self._routes.clear()
            route = self._routes[key] = self._decide(parsed)
        return route

    def _decide(self, url: URL) -> ProxyRoute:
        proxy = self._proxies.get(url.scheme)
        if proxy is None or (
            url.host is not None
            # The stdlib's NO_PROXY matching, on the proxies read once (typeshed
            # leaves this long-standing urllib function out).
            and urllib.request.proxy_bypass_environment(url.host, self._proxies)  # type: ignore[attr-defined]
        ):
            return DIRECT
        proxy_url = URL(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_url.scheme != "http":
            # aiohttp speaks to proxies in plain HTTP only (its own trust_env
            # skips the others the same way).
            logger.warning(
                "%s proxies are not supported, ignoring %s",
                proxy_url.scheme,
                proxy_url.with_user(None),  # no proxy password in the logs
            )
            return DIRECT
        headers = None
        if proxy_url.user is not None:
            login = f"{proxy_url.user}:{proxy_url.password or ''}".encode()
            headers = {"Proxy-Authorization": "Basic " + base64.b64encode(login).decode("ascii")}
        return ProxyRoute(str(proxy_url.with_user(None)), headers)
