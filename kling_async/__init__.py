"""kling_async: an asyncio-first SDK for the Kling image-generation API.

::

    import kling_async

    async with kling_async.Client() as client:
        handle = await client.images.generate(prompt="a red fox", n=2)
        task = await handle
        print([image.url for image in task.images])

Everything public is importable from this package; the submodules are private.
"""

from ._auth import Credentials, JWTCredentials, StaticToken
from ._batch import Batch, BatchCost, BatchItem, BatchRequests, BatchResult
from ._budget import Budget, BudgetState, Spend, SpendGrouping, UnitBudget, spend_of
from ._callbacks import CallbackReceiver, UpdateHook
from ._client import Client
from ._config import DEFAULT_BASE_URL, OFFICIAL_BASE_URL, PollPolicy, RetryPolicy
from ._download import DownloadSource
from ._endpoints import (
    EndpointDeclaration,
    QuotaUnits,
    ResultKind,
    SyncEndpoint,
    UnitsRule,
    declaration_for,
    declarations,
)
from ._exceptions import (
    APIError,
    AuthenticationError,
    BudgetExceededError,
    ClientClosedError,
    ConcurrencyLimitError,
    ConfigurationError,
    ContentPolicyError,
    EventLoopError,
    InvalidRequestError,
    JournalError,
    JournalInUseError,
    KlingError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    TaskFailedError,
    TaskNotFoundError,
    TaskTimeoutError,
    TransportError,
    UnknownPriceError,
    ValidationError,
)
from ._handle import USE_CLIENT_DEFAULT, TaskHandle
from ._image_input import ImageFile, ImageInput, WireImage
from ._journal import Journal
from ._ledger import EntryState, Ledger, LedgerEntry, MemoryLedger
from ._limiter import ConcurrencyLimiter, Limiter
from ._logging import configure_from_environment as _configure_logging
from ._models import (
    AspectRatio,
    BalanceDeduction,
    Cost,
    Endpoint,
    ExpandRequest,
    ImageGenerationRequest,
    ImageModel,
    ImageReference,
    ImageResult,
    ImageTaskRequest,
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
    TaskStatus,
    TryOnModel,
    VirtualTryOnRequest,
    request_from_mapping,
)
from ._pricing import DEFAULT_PRICES, Estimate, Price, PriceTable
from ._sync_endpoints import AccountCosts, ImageRecognition, RecognizedRegion, ResourcePack
from ._version import __version__

_configure_logging()

__all__ = [
    "APIError",
    "AccountCosts",
    "AspectRatio",
    "AuthenticationError",
    "BalanceDeduction",
    "Cost",
    "Batch",
    "BatchItem",
    "BatchRequests",
    "BatchCost",
    "BatchResult",
    "Budget",
    "BudgetExceededError",
    "BudgetState",
    "CallbackReceiver",
    "Client",
    "ClientClosedError",
    "ConcurrencyLimitError",
    "ConcurrencyLimiter",
    "ConfigurationError",
    "ContentPolicyError",
    "Credentials",
    "DEFAULT_BASE_URL",
    "DEFAULT_PRICES",
    "DownloadSource",
    "Endpoint",
    "EndpointDeclaration",
    "EntryState",
    "Estimate",
    "EventLoopError",
    "ExpandRequest",
    "ImageFile",
    "ImageGenerationRequest",
    "ImageInput",
    "ImageModel",
    "MultiImageModel",
    "ImageRecognition",
    "ImageReference",
    "ImageResult",
    "ImageTaskRequest",
    "InvalidRequestError",
    "JournalError",
    "JournalInUseError",
    "JWTCredentials",
    "Journal",
    "KlingError",
    "Ledger",
    "LedgerEntry",
    "Limiter",
    "MemoryLedger",
    "MultiImageRequest",
    "MultiShotRequest",
    "NotFoundError",
    "OFFICIAL_BASE_URL",
    "OmniAspectRatio",
    "OmniImageRequest",
    "OmniModel",
    "OmniResolution",
    "PermissionDeniedError",
    "PollPolicy",
    "Price",
    "Spend",
    "SpendGrouping",
    "PriceTable",
    "QuotaExceededError",
    "QuotaUnits",
    "RateLimitError",
    "RecognizedRegion",
    "Resolution",
    "ResourcePack",
    "ResultKind",
    "ResultType",
    "RetryPolicy",
    "SeriesAmount",
    "ServerError",
    "StaticToken",
    "SyncEndpoint",
    "Task",
    "TaskFailedError",
    "TaskHandle",
    "TaskNotFoundError",
    "TaskRequest",
    "TaskStatus",
    "TaskTimeoutError",
    "TransportError",
    "TryOnModel",
    "USE_CLIENT_DEFAULT",
    "UnitsRule",
    "UnitBudget",
    "UnknownPriceError",
    "UpdateHook",
    "ValidationError",
    "VirtualTryOnRequest",
    "WireImage",
    "__version__",
    "declaration_for",
    "declarations",
    "request_from_mapping",
    "spend_of",
]


def _present_as_public() -> None:
    """Give every exported class and function the module users import it from,
    so reprs, tracebacks and docs say ``kling_async.Task``, not a private path
    (as httpx and openai-python do). A class's own annotations are resolved
    first: they are strings here, looked up in the module it names."""
    import contextlib
    import inspect
    import sys
    import typing

    import attrs

    namespace = globals()
    for name in __all__:
        thing = namespace[name]
        if not isinstance(thing, type) and not callable(thing):
            continue
        home = getattr(thing, "__module__", "")
        if not home.startswith("kling_async._"):
            continue
        if isinstance(thing, type):
            if attrs.has(thing):
                attrs.resolve_types(thing)
            own = inspect.get_annotations(thing)
            with contextlib.suppress(NameError, TypeError):  # names seen only by type checkers
                hints = typing.get_type_hints(thing, vars(sys.modules[home]), include_extras=True)
                thing.__annotations__ = {key: hints[key] for key in own}
        with contextlib.suppress(AttributeError, TypeError):  # a typing alias, say
            thing.__module__ = "kling_async"


_present_as_public()
