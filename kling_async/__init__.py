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
from ._batch import Batch, BatchResult
from ._callbacks import CallbackReceiver
from ._client import Client
from ._config import DEFAULT_BASE_URL, OFFICIAL_BASE_URL, PollPolicy, RetryPolicy
from ._exceptions import (
    APIError,
    AuthenticationError,
    ClientClosedError,
    ConcurrencyLimitError,
    ConfigurationError,
    ContentPolicyError,
    EventLoopError,
    InvalidRequestError,
    KlingError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    TaskFailedError,
    TaskTimeoutError,
    TransportError,
    ValidationError,
)
from ._handle import TaskHandle
from ._image_input import ImageInput
from ._journal import Journal
from ._ledger import EntryState, Ledger, LedgerEntry, MemoryLedger
from ._limiter import ConcurrencyLimiter, Limiter
from ._logging import configure_from_environment as _configure_logging
from ._models import (
    BalanceDeduction,
    Endpoint,
    ImageGenerationRequest,
    ImageResult,
    MultiImageRequest,
    Task,
    TaskRequest,
    TaskStatus,
    request_from_mapping,
)
from ._version import __version__

_configure_logging()

__all__ = [
    "DEFAULT_BASE_URL",
    "OFFICIAL_BASE_URL",
    "APIError",
    "AuthenticationError",
    "BalanceDeduction",
    "Batch",
    "BatchResult",
    "CallbackReceiver",
    "Client",
    "ClientClosedError",
    "ConcurrencyLimitError",
    "ConcurrencyLimiter",
    "ConfigurationError",
    "ContentPolicyError",
    "Credentials",
    "Endpoint",
    "EntryState",
    "EventLoopError",
    "ImageGenerationRequest",
    "ImageInput",
    "ImageResult",
    "InvalidRequestError",
    "JWTCredentials",
    "Journal",
    "KlingError",
    "Ledger",
    "LedgerEntry",
    "Limiter",
    "MemoryLedger",
    "MultiImageRequest",
    "NotFoundError",
    "PermissionDeniedError",
    "PollPolicy",
    "QuotaExceededError",
    "RateLimitError",
    "RetryPolicy",
    "ServerError",
    "StaticToken",
    "Task",
    "TaskFailedError",
    "TaskHandle",
    "TaskRequest",
    "TaskStatus",
    "TaskTimeoutError",
    "TransportError",
    "ValidationError",
    "__version__",
    "request_from_mapping",
]
