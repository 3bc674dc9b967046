"""FakeKlingServer, driven over loopback with a plain aiohttp client (no SDK, no mocks).

A package, so that its modules (``test_auth``, ``test_callbacks``, ...) do not
clash with the SDK's test modules of the same names under pytest's default
import mode.
"""
