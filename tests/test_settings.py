"""Client settings: refused at once when unusable, keys cleaned, proxies honoured,
an unclosed client named in a ResourceWarning."""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import kling_async
from kling_async import ConfigurationError, JWTCredentials, StaticToken
from kling_async._auth import resolve_credentials
from kling_async._proxies import DIRECT, EnvironmentProxies
from kling_async.testing import FakeKlingServer
from tests.helpers import API_KEY, FAST_POLL, make_client


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"timeout": -1}, "timeout must be a positive number"),
        ({"timeout": math.nan}, "timeout must be a positive number"),
        ({"timeout": math.inf}, "timeout must be a positive number"),
        ({"timeout": True}, "timeout must be a positive number"),
        ({"timeout": "30"}, "timeout must be a positive number"),
        ({"max_connections": 0}, "max_connections must be at least 1"),
        ({"max_connections": -5}, "max_connections must be at least 1"),
        ({"max_connections": 2.5}, "max_connections must be an integer"),
        ({"max_concurrency": 0}, "max_concurrency must be at least 1"),
        ({"base_url": "not a url"}, "base_url must be an http(s) URL with a host"),
        ({"base_url": "ftp://example.com"}, "base_url must be an http(s) URL"),
        ({"base_url": "api.example.com/kling"}, "base_url must be an http(s) URL"),
        ({"base_url": "https://"}, "base_url must be an http(s) URL"),
        ({"base_url": ""}, "base_url must be an http(s) URL"),
        ({"api_key": ""}, "api_key is empty"),
        ({"api_key": " \n"}, "api_key is empty"),
        ({"api_key": "two words"}, "api_key contains whitespace"),
        ({"access_key": "", "secret_key": "s"}, "access_key is empty"),
        ({"access_key": "a", "secret_key": "s\x00"}, "secret_key contains whitespace or control"),
    ],
)
def test_unusable_settings_are_refused_when_the_client_is_made(
    settings: dict[str, Any], words: str
) -> None:
    keys = {} if "access_key" in settings else {"api_key": "k"}
    with pytest.raises(ConfigurationError) as caught:
        kling_async.Client(**{**keys, **settings})
    assert words in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "two words" not in str(caught.value)  # a key is never echoed


def test_a_bad_base_url_from_the_environment_is_named_as_such(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KLING_BASE_URL", "api.example.com")
    with pytest.raises(ConfigurationError, match=r"^KLING_BASE_URL must be an http"):
        kling_async.Client("k")
    monkeypatch.setenv("KLING_BASE_URL", " https://api.example.com/kling/v1/ \n")
    assert kling_async.Client("k").base_url == "https://api.example.com/kling"


@pytest.mark.parametrize(
    ("credentials", "environ", "expected"),
    [
        ({"access_key": "ak", "secret_key": "s3cr3t-pair"}, {}, kling_async.OFFICIAL_BASE_URL),
        (
            {},
            {"KLING_ACCESS_KEY": "ak", "KLING_SECRET_KEY": "s3cr3t-pair"},
            kling_async.OFFICIAL_BASE_URL,
        ),
        ({"api_key": "k"}, {}, kling_async.DEFAULT_BASE_URL),
        ({}, {"KLING_API_KEY": "k"}, kling_async.DEFAULT_BASE_URL),
        (
            {"access_key": "ak", "secret_key": "s3cr3t-pair"},
            {"KLING_BASE_URL": "https://gateway.example.com/kling"},
            "https://gateway.example.com/kling",
        ),
    ],
)
def test_the_official_key_pair_goes_to_the_official_host_by_default(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    credentials: dict[str, Any],  # Any: keyword arguments of Client
    environ: dict[str, str],
    expected: str,
) -> None:
    """The JWT pair is the official API's secret: without a base URL it is never
    sent to a third-party gateway. The host in use is logged (the CLI's ``-v``)."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level("DEBUG", logger="kling_async"):
        client = kling_async.Client(**credentials)
    assert client.base_url == expected
    assert f"API root {expected}" in caplog.text
    assert "s3cr3t-pair" not in caplog.text


def test_good_settings_are_accepted() -> None:
    for settings in (
        {"timeout": 0.5},
        {"timeout": 30},
        {"max_connections": 1},
        {"base_url": "HTTPS://api.example.com"},
        {"base_url": "http://127.0.0.1:8080/kling"},
    ):
        kling_async.Client("k", **settings)


async def test_a_key_read_from_a_file_with_its_newline_works(
    server: FakeKlingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_client(server, api_key=f"  {API_KEY}\n") as client:
        await client.images.generate(prompt="p")
    monkeypatch.setenv("KLING_API_KEY", f"{API_KEY}\r\n")
    async with kling_async.Client(base_url=server.url, polling=FAST_POLL) as client:
        await client.images.generate(prompt="p")
    assert [r.authorization for r in server.requests_for("create")] == [f"Bearer {API_KEY}"] * 2


def test_keys_are_cleaned_and_blank_environment_variables_count_as_unset() -> None:
    assert resolve_credentials("tok\n", None, None, {}) == StaticToken("tok")
    pair = resolve_credentials(None, " a ", "s\n", {})
    assert isinstance(pair, JWTCredentials)
    assert (pair.access_key, pair.secret_key) == ("a", "s")
    assert resolve_credentials(None, None, None, {"KLING_API_KEY": " \n"}) is None
    env_pair = resolve_credentials(
        None, None, None, {"KLING_ACCESS_KEY": "a\n", "KLING_SECRET_KEY": "s\n"}
    )
    assert isinstance(env_pair, JWTCredentials)
    assert env_pair.secret_key == "s"
    with pytest.raises(ConfigurationError, match="KLING_API_KEY contains whitespace"):
        resolve_credentials(None, None, None, {"KLING_API_KEY": "a b"})
    # Credentials objects made directly are checked too, never sent broken.
    with pytest.raises(ConfigurationError, match="token contains whitespace"):
        StaticToken("tok\n")
    with pytest.raises(ConfigurationError, match="secret_key is empty"):
        JWTCredentials("a", "")


async def test_proxies_from_the_environment_are_honoured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The "proxy" is a second fake server: it answers absolute-form requests itself.
    async with FakeKlingServer(api_key=API_KEY) as proxy:
        for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.origin)
        monkeypatch.setenv("http_proxy", proxy.origin)
        # A host that does not resolve: only a proxy can answer for it.
        async with kling_async.Client(API_KEY, base_url="http://kling.invalid") as client:
            tasks = [task async for task in client.images.list(page_size=5)]
    assert tasks == []
    [listed] = proxy.requests_for("list")
    assert listed.query["pageSize"] == "5"


async def test_no_proxy_sends_its_hosts_directly_and_netrc_is_not_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async with (
        FakeKlingServer(api_key=API_KEY) as proxy,
        FakeKlingServer(api_key=API_KEY) as server,
    ):
        for name in ("HTTPS_PROXY", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.origin)
        monkeypatch.setenv("http_proxy", proxy.origin)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        # A .netrc login for the API host: aiohttp's trust_env would send it
        # beside the Authorization header, and refuse the request for it.
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login someone password secret\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        async with kling_async.Client(API_KEY, base_url=server.url) as client:
            assert [task async for task in client.images.list(page_size=5)] == []
    assert len(server.requests_for("list")) == 1
    assert proxy.requests_for("list") == []


def test_proxy_routes_are_decided_once_per_host_with_the_proxy_s_own_login() -> None:
    proxies = EnvironmentProxies(
        {"http": "http://user:pa%20ss@proxy.example:3128", "no": "cdn.example, .internal"}
    )
    route = proxies.route("http://api.example/v1/images/generations")
    assert route.proxy == "http://proxy.example:3128"  # no login in the URL aiohttp gets
    assert route.headers == {"Proxy-Authorization": "Basic dXNlcjpwYSBzcw=="}  # user:pa ss
    assert proxies.route("http://api.example/v1/images/generations/abc") is route
    assert "pa ss" not in repr(route)
    assert "dXNlcjpwYSBzcw" not in repr(route)
    assert proxies.route("http://cdn.example/a.png") == DIRECT
    assert proxies.route("http://x.internal/a.png") == DIRECT
    assert proxies.route("https://api.example/") == DIRECT  # no https proxy set
    assert EnvironmentProxies({}).route("http://api.example/") == DIRECT
    # A proxy without a scheme is an HTTP one, as requests and aiohttp read it.
    assert EnvironmentProxies({"http": "proxy.example:3128"}).route("http://a/").proxy == (
        "http://proxy.example:3128"
    )


async def test_an_unclosed_client_warns_naming_kling_async_and_where_it_was_made(
    server: FakeKlingServer,
) -> None:
    client = kling_async.Client(API_KEY, base_url=server.url)
    assert [task async for task in client.images.list()] == []  # opens the session
    session = client._transport._session
    assert session is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del client
        gc.collect()
    ours = [(w.category, str(w.message)) for w in caught if "kling_async" in str(w.message)]
    await session.close()  # what the user should have done, so aiohttp does not warn too
    [(category, message)] = ours
    assert issubclass(category, ResourceWarning)
    assert message.startswith("unclosed kling_async.Client <Client http://127.0.0.1:")
    assert "test_settings.py" in message
    assert "await client.close()" in message


def test_the_warning_names_the_line_that_made_the_client_even_in_a_subclass() -> None:
    class Mine(kling_async.Client):
        def __init__(self) -> None:
            super().__init__("k")

    class Service:
        def __init__(self) -> None:
            self.client = Mine()  # the line to name

    line = Service.__init__.__code__.co_firstlineno + 1
    assert Service().client._created_at.endswith(f"test_settings.py:{line}")
    assert kling_async.Client("k")._created_at.endswith(
        f"test_settings.py:{sys._getframe().f_lineno - 1}"
    )


async def test_a_closed_or_unused_client_does_not_warn(server: FakeKlingServer) -> None:
    async with make_client(server) as client:
        await client.images.generate(prompt="p")
    unused = make_client(server)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del client, unused
        gc.collect()
    assert [w for w in caught if "kling_async" in str(w.message)] == []


UNCLOSED = """
import asyncio, gc, sys
import kling_async
from kling_async.testing import FakeKlingServer

kept = []

async def main():
    async with FakeKlingServer(api_key="k", task_duration=0.05) as server:
        client = kling_async.Client("k", base_url=server.url)
        await (await client.images.generate(prompt="p"))
        if sys.argv[1] == "collected-while-running":
            del client
            gc.collect()
            await asyncio.sleep(0.05)
        else:
            kept.append(client)  # collected after the loop ended

asyncio.run(main())
kept.clear()
gc.collect()
"""


@pytest.mark.parametrize("when", ["collected-while-running", "collected-after-the-loop"])
@pytest.mark.parametrize("warnings_filter", ["ignore::ResourceWarning", "default"])
def test_an_unclosed_client_says_so_once_without_aiohttp_s_noise(
    when: str, warnings_filter: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-W", warnings_filter, "-c", UNCLOSED, when],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "Unclosed client session" not in done.stderr, done.stderr
    assert "Unclosed connector" not in done.stderr, done.stderr
    expected = 0 if warnings_filter.startswith("ignore") else 1
    assert done.stderr.count("ResourceWarning: unclosed kling_async.Client") == expected, (
        done.stderr
    )
