"""FakeKlingServer.inject(endpoint=...) names the synchronous endpoints too: a
fault aimed at image recognition or account costs hits that endpoint and no
other, so a user can test how their code meets its failures."""

from __future__ import annotations

import pytest

from kling_async import Client, ImageGenerationRequest, InvalidRequestError, TaskStatus
from kling_async._endpoints import SYNC_ENDPOINTS
from kling_async.testing import FakeKlingServer

URL = "https://example.com/a.png"
START, END = 1726124664368, 1727366400000


@pytest.mark.parametrize("endpoint", [sync.path for sync in SYNC_ENDPOINTS.values()])
def test_every_declared_synchronous_path_is_a_fault_endpoint(
    server: FakeKlingServer, endpoint: str
) -> None:
    for spelling in (endpoint, endpoint.removeprefix("/")):
        fault = server.inject("error", endpoint=spelling, code=1201)
        assert fault.endpoint == endpoint.removeprefix("/").removeprefix("v1/")


async def test_a_fault_on_image_recognition_hits_it_and_nothing_else(
    server: FakeKlingServer, client: Client
) -> None:
    server.inject("error", endpoint="/v1/videos/image-recognize", code=1201, times=None)
    task = await (await client.images.submit(ImageGenerationRequest(prompt="unaffected")))
    assert task.status is TaskStatus.SUCCEED
    costs = await client.account.costs(start_time=START, end_time=END)
    assert costs is not None
    with pytest.raises(InvalidRequestError):
        await client.images.recognize(URL)


async def test_a_fault_on_account_costs_hits_it_and_nothing_else(
    server: FakeKlingServer, client: Client
) -> None:
    server.inject("error", endpoint="/account/costs", code=1201, times=1)
    found = await client.images.recognize(URL)
    assert found.regions
    with pytest.raises(InvalidRequestError):
        await client.account.costs(start_time=START, end_time=END)


def test_an_unknown_endpoint_is_refused(server: FakeKlingServer) -> None:
    with pytest.raises(ValueError, match="unknown endpoint"):
        server.inject("error", endpoint="/v1/videos/text2video")
