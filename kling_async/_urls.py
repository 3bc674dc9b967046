"""What counts as a URL: one check for image URLs, callback URLs and ``base_url``.

URL schemes are case-insensitive (RFC 3986 §3.1), so ``HTTPS://host/a.png`` is
an https URL, not a file name.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# "<scheme>://" with a scheme of two or more characters, so that a Windows path
# such as C:/images/a.png is not taken for a URL of scheme "c".
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://")


def url_scheme(text: str) -> str | None:
    """The lower-cased scheme if ``text`` starts with ``<scheme>://``, else ``None``."""
    match = _SCHEME.match(text)
    return match.group(1).lower() if match else None


def is_http_url(value: object) -> bool:
    """Whether ``value`` is an http(s) URL with a host (any case of the scheme)."""
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. a malformed port or IPv6 address
        return False


def redacted_url(value: object) -> str:
    """A URL as reprs and messages show it: scheme and host only. A callback
    URL's path carries the token that authorises its callbacks."""
    if not isinstance(value, str):
        return repr(value)
    try:
        parts = urlsplit(value)
        host = parts.netloc.rpartition("@")[2]  # never the user:password part
    except ValueError:
        return "a string that is not a URL"
    if not parts.scheme and not host:
        return "a string that is not a URL"
    hidden = "/..." if parts.path.strip("/") or parts.query or parts.fragment else ""
    return repr(f"{parts.scheme}://{host}{hidden}")
