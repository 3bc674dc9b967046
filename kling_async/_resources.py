"""``client.images``: submit, fetch, list and re-attach to Kling image tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import attrs

from . import _request_bodies  # noqa: F401  (registers the new requests' wire bodies)
from ._endpoints import by_request_type, declaration_for, endpoint_named
from ._handle import USE_CLIENT_DEFAULT, TaskHandle, _UseClientDefault
from ._image_input import ImageFile, ImageInput, encode_image, read_image_file
from ._models import (
    AspectRatio,
    Endpoint,
    ExpandRequest,
    ImageGenerationRequest,
    ImageModel,
    ImageReference,
    MultiImageModel,
    MultiImageRequest,
    MultiShotRequest,
    OmniAspectRatio,
    OmniImageRequest,
    OmniModel,
    OmniResolution,
    Resolution,
    ResultType,
    SeriesAmount,
    Task,
    TaskRequest,
    TryOnModel,
    VirtualTryOnRequest,
    build_request,
    image_fields,
    unread_files,
)
from ._submissions import Submissions, new_external_task_id
from ._sync_endpoints import (
    COSTS,
    AccountCosts,
    ImageRecognition,
    Pacer,
    costs_request,
    parse_costs,
    parse_recognition,
    recognize_request,
)
from ._tracking import Tracker
from ._transport import Transport
from ._wire import (
    MAX_PAGE_NUMBER,
    MAX_PAGE_SIZE,
    get_request,
    list_request,
    parse_task,
    parse_task_list,
)

RequestT = TypeVar("RequestT", bound=TaskRequest)


def read_image_files(request: RequestT) -> RequestT:
    """``request`` with every image it was given as a file read and checked:
    the one step between building a request and sending it that does I/O.
    A file that cannot be used is a :class:`ValidationError` naming its field."""
    changes: dict[str, Any] = {}
    for name in image_fields(type(request)):
        value = getattr(request, name)
        if isinstance(value, ImageFile):
            changes[name] = read_image_file(value, name)
        elif isinstance(value, tuple) and any(isinstance(item, ImageFile) for item in value):
            changes[name] = tuple(
                read_image_file(item, f"{name}[{position}]")
                if isinstance(item, ImageFile)
                else item
                for position, item in enumerate(value)
            )
    return attrs.evolve(request, **changes) if changes else request


async def ready(request: RequestT) -> RequestT:
    """:func:`read_image_files`, off the event loop when there is a file to read."""
    if unread_files(request):
        return await asyncio.to_thread(read_image_files, request)
    return request


async def _build(cls: type[RequestT], fields: dict[str, Any]) -> RequestT:
    """Build and validate a request, then read its image files: off the event
    loop when images are given, as base64 of megabyte images costs CPU too."""
    if any(fields.get(name) is not None for name in image_fields(cls)):
        return await asyncio.to_thread(lambda: read_image_files(build_request(cls, fields)))
    return build_request(cls, fields)


def _keyword_fields(arguments: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in arguments.items() if name not in ("self", "request")}


def _fields(arguments: dict[str, Any]) -> dict[str, Any]:
    """The request fields among a keyword method's arguments (its ``locals()``),
    so the signature, typed for callers, is the one list of field names.

    An ``external_task_id`` is generated here when none is given, so the request
    is built once rather than built and then copied with the id.
    """
    fields = _keyword_fields(arguments)
    if fields.get("external_task_id") is None:
        fields["external_task_id"] = new_external_task_id()
    return fields


def _reject_fields_beside(request: TaskRequest, arguments: dict[str, Any], method: str) -> None:
    """A request model and keyword fields together is a mistake: the fields
    would be silently ignored, so say so before anything is sent."""
    given = [name for name, value in _keyword_fields(arguments).items() if value is not None]
    if given:
        raise TypeError(
            f"{method}() takes a {type(request).__name__} or keyword fields, not both; "
            f"got the request and {', '.join(given)} (use attrs.evolve(request, ...) to change it)"
        )


class Images:
    """Kling's image task APIs. Reach it as ``client.images``."""

    def __init__(self, transport: Transport, tracker: Tracker, submissions: Submissions) -> None:
        self._transport = transport
        self._tracker = tracker
        self._submissions = submissions

    async def generate(
        self,
        request: ImageGenerationRequest | None = None,
        /,
        *,
        prompt: str | None = None,
        model_name: ImageModel | None = None,
        negative_prompt: str | None = None,
        image: ImageInput | None = None,
        image_reference: ImageReference | None = None,
        image_fidelity: float | None = None,
        human_fidelity: float | None = None,
        element_ids: Iterable[int] | None = None,
        resolution: Resolution | None = None,
        n: int | None = None,
        aspect_ratio: AspectRatio | None = None,
        watermark: bool | None = None,
        callback_url: str | None = None,
        external_task_id: str | None = None,
    ) -> TaskHandle:
        """Submit a text-to-image task and return its handle once Kling accepted it.

        Pass an :class:`ImageGenerationRequest`, or its fields as keywords (an
        omitted field takes the model's default: ``kling-v3``, ``n=1``,
        ``aspect_ratio="16:9"``), not both (``TypeError``). Raises
        :class:`ValidationError` before sending anything if a field is invalid.
        """
        return await self._create(ImageGenerationRequest, request, locals())

    async def multi_image(
        self,
        request: MultiImageRequest | None = None,
        /,
        *,
        subject_images: Sequence[ImageInput] | None = None,
        prompt: str | None = None,
        model_name: MultiImageModel | None = None,
        scene_image: ImageInput | None = None,
        style_image: ImageInput | None = None,
        n: int | None = None,
        aspect_ratio: AspectRatio | None = None,
        watermark: bool | None = None,
        callback_url: str | None = None,
        external_task_id: str | None = None,
    ) -> TaskHandle:
        """Submit a multi-image-to-image task (1-4 subject images) and return its handle.

        Pass a :class:`MultiImageRequest` or its fields as keywords, not both
        (``TypeError``); images may be paths, bytes, URLs or base64. Raises
        :class:`ValidationError` before sending anything if a field is invalid.
        """
        return await self._create(MultiImageRequest, request, locals())

    async def omni_image(
        self,
        request: OmniImageRequest | None = None,
        /,
        *,
        prompt: str | None = None,
        model_name: OmniModel | None = None,
        images: Sequence[ImageInput] | None = None,
        element_ids: Iterable[int] | None = None,
        resolution: OmniResolution | None = None,
        result_type: ResultType | None = None,
        n: int | None = None,
        series_amount: SeriesAmount | None = None,
        aspect_ratio: OmniAspectRatio | None = None,
        watermark: bool | None = None,
        callback_url: str | None = None,
        external_task_id: str | None = None,
    ) -> TaskHandle:
        """Submit an omni-image task (Kling Image O1, or 3.0 Omni with
        ``model_name="kling-v3-omni"``) and return its handle.

        Refer to ``images`` in the prompt as ``<<<image_1>>>``...; a series
        (``result_type="series"``, 3.0 Omni) makes ``series_amount`` images (2-9
        or ``"auto"``), all in ``task.images`` (and ``task.series_images``).
        Pass an :class:`OmniImageRequest` or its fields as keywords, not both
        (``TypeError``). Raises :class:`ValidationError` before sending anything
        if a field, or a model/field combination Kling's capability map
        excludes, is invalid.
        """
        return await self._create(OmniImageRequest, request, locals())

    async def expand(
        self,
        request: ExpandRequest | None = None,
        /,
        *,
        image: ImageInput | None = None,
        up_expansion_ratio: float | None = None,
        down_expansion_ratio: float | None = None,
        left_expansion_ratio: float | None = None,
        right_expansion_ratio: float | None = None,
        prompt: str | None = None,
        n: int | None = None,
        watermark: bool | None = None,
        callback_url: str | None = None,
        external_task_id: str | None = None,
    ) -> TaskHandle:
        """Submit an outpainting task (``images/editing/expand``) and return its handle.

        The four ratios (0 to 2, multiples of the original's height for up and
        down, of its width for left and right) are required; the result may be
        at most 3 times the original's area. Pass an :class:`ExpandRequest` or
        its fields as keywords, not both (``TypeError``).
        """
        return await self._create(ExpandRequest, request, locals())

    async def multi_shot(
        self,
        request: MultiShotRequest | None = None,
        /,
        *,
        element_frontal_image: ImageInput | None = None,
        callback_url: str | None = None,
        external_task_id: str | None = None,
    ) -> TaskHandle:
        """Submit an AI multi-shot task (other angles of a subject from its
        front view) and return its handle; the finished task has three sets of
        three images, in ``task.images`` set by set."""
        return await self._create(MultiShotRequest, request, locals())

    async def virtual_try_on(
        self,
        request: VirtualTryOnRequest | None = None,
        /,
        *,
        human_image: ImageInput | None = None,
        cloth_image: ImageInput | None = None,
        model_name: TryOnModel | None = None,
        callback_url: str | None = None,
        external_task_id: str | None = None,
    ) -> TaskHandle:
        """Submit a Kolors virtual try-on task (a person, a garment) and return its handle."""
        return await self._create(VirtualTryOnRequest, request, locals())

    async def create(
        self, endpoint: Endpoint | str, request: TaskRequest | None = None, /, **fields: Any
    ) -> TaskHandle:
        """Submit a task to any declared ``endpoint`` (a member or its path under
        ``/v1/``): a request of its model, or the model's fields as keywords.

        The typed methods (:meth:`generate`, :meth:`omni_image`...) are this with
        their endpoint's fields spelled out for type checkers; an endpoint declared
        without one is reached here. Raises :class:`ValidationError` before
        sending anything if a field is invalid.
        """
        declaration = declaration_for(endpoint_named(endpoint))
        return await self._create(declaration.request_type, request, {**fields, "request": request})

    async def _create(
        self, cls: type[TaskRequest], request: TaskRequest | None, arguments: dict[str, Any]
    ) -> TaskHandle:
        """The one path every create method takes: build ``cls`` from the keyword
        ``arguments`` (a method's ``locals()``, so its signature is the one list
        of field names), or take ``request`` and refuse keywords beside it."""
        if request is None:
            request = await _build(cls, _fields(arguments))
        else:
            if not isinstance(request, cls):
                raise TypeError(f"expected a {cls.__name__}, got a {type(request).__name__}")
            _reject_fields_beside(request, arguments, by_request_type(cls).method)
        return await self.submit(request)

    async def recognize(self, image: ImageInput) -> ImageRecognition:
        """Find the subject, head, face and clothing in ``image`` (Kling's
        synchronous ``videos/image-recognize``): no task, the answer comes back
        at once, with the client's retries and typed errors."""
        encoded = encode_image(image, "image")
        if isinstance(encoded, ImageFile):
            encoded = await asyncio.to_thread(read_image_file, encoded, "image")
        return parse_recognition(await self._transport.send(recognize_request(encoded)))

    async def submit(self, request: TaskRequest) -> TaskHandle:
        """Submit any task request; the endpoint follows from its type.

        The create is sent with an ``external_task_id`` (generated when the
        request has none), so a retry after a lost response finds the task
        instead of creating and paying for it twice; after an ambiguous failure
        the task is looked up by that id. With a callback receiver on the client,
        a request without its own ``callback_url`` gets one. With
        ``Client(max_concurrency=...)`` the create first waits for ``n`` units of
        the concurrency quota, held until the task ends; a 1303 answer then
        queues the create again, under the same id, instead of failing.

        Every error raised carries the create's ``external_task_id``. Cancelling
        the call while the create is on the wire does not lose the task: it
        settles in the background, stays attached to the client, and is logged.
        """
        return await self._submissions.submit(await ready(request))

    async def run(
        self,
        request: TaskRequest,
        /,
        *,
        timeout: float | _UseClientDefault | None = USE_CLIENT_DEFAULT,
    ) -> Task:
        """Submit ``request`` and wait for the finished task, in one call
        (openai's ``create_and_poll``, replicate's ``run``)::

            task = await client.images.run(ImageGenerationRequest(prompt="a red fox"))

        The same as ``await (await client.images.submit(request)).wait(timeout)``,
        with the same errors: :class:`ValidationError` before anything is sent,
        the typed API error (carrying the ``external_task_id``) if the create is
        refused, :class:`TaskFailedError` if the task fails, and
        :class:`TaskTimeoutError` after ``timeout`` seconds (default: the
        client's ``PollPolicy.timeout``; ``None`` waits for ever), whose
        ``handle`` goes on following the task.
        """
        handle = await self.submit(request)
        return await handle.wait(timeout)

    async def get(self, task_id: str, *, endpoint: Endpoint | str = Endpoint.GENERATIONS) -> Task:
        """Fetch one task by its task_id or external_task_id."""
        endpoint = endpoint_named(endpoint)
        task = parse_task(await self._transport.send(get_request(endpoint, task_id)))
        state = self._tracker.find(endpoint, task.task_id)
        if state is not None:
            self._tracker.publish(state, task)
        return task

    async def list(
        self,
        *,
        endpoint: Endpoint | str = Endpoint.GENERATIONS,
        page_size: int = 30,
        limit: int | None = None,
    ) -> AsyncIterator[Task]:
        """Iterate over the account's tasks, newest first, fetching pages as needed.

        Stops after ``limit`` tasks, at the last page, or at Kling's page 1000.
        """
        endpoint = endpoint_named(endpoint)
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        yielded = 0
        for page in range(1, MAX_PAGE_NUMBER + 1):
            tasks = parse_task_list(
                await self._transport.send(list_request(endpoint, page, page_size))
            )
            for task in tasks:
                if limit is not None and yielded >= limit:
                    return
                yield task
                yielded += 1
            if len(tasks) < page_size:
                return

    def attach(
        self, task_id: str, *, endpoint: Endpoint | str = Endpoint.GENERATIONS
    ) -> TaskHandle:
        """A handle on an existing task, e.g. one submitted before a restart.

        Sends no request; the first wait polls it at once.
        """
        state = self._tracker.state(endpoint_named(endpoint), task_id)
        return TaskHandle(self._tracker, state)


class Account:
    """The account's resource packs. Reach it as ``client.account``."""

    def __init__(self, transport: Transport, pacer: Pacer | None = None) -> None:
        self._transport = transport
        #: Shared by a client and its ``with_options`` copies: one pace per account.
        self.pacer = pacer if pacer is not None else Pacer(COSTS.min_interval)

    async def costs(
        self,
        *,
        start_time: datetime | int,
        end_time: datetime | int,
        resource_pack_name: str | None = None,
    ) -> AccountCosts:
        """The resource packs active between ``start_time`` and ``end_time``
        (datetimes or Unix milliseconds), optionally the one named
        ``resource_pack_name``. Free to call; Kling asks for at most one call a
        second, so concurrent callers are spaced that far apart here.
        ``remaining_quantity`` lags up to 12 hours on Kling's side."""
        request = costs_request(start_time, end_time, resource_pack_name)

        async def paced() -> Any:
            async with self.pacer.turn():
                return await self._transport.exchange(request)

        # Each attempt waits its turn, retries and a re-signed JWT's included:
        # a retry is a request too.
        return parse_costs(await self._transport._retrying_resigned(paced))
