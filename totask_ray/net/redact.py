"""What may be shown of a URL or an error: a signed URL's query is its signature, a credential, and
an error that reaches a user (a report, a log, an HTTP answer) is one line with no URL query in it."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """The URL without credentials, query or fragment: safe to show in a message or a log."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<invalid url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# Any scheme: a signed s3:// or gs:// URL carries its signature in the query as an https:// one does.
_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"<>()\[\]{}]+", re.IGNORECASE)
MAX_ERROR_CHARS = 500


def redact_text(text: str) -> str:
    """`text` with every URL in it (quoted by httpx, aiohttp, a plugin) made safe by `redact_url`."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def first_line(exc: BaseException) -> str:
    """The first line of the exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def safe_error(
    exc: BaseException, *, text: str | None = None, bare: tuple[type[BaseException], ...] = ()
) -> str:
    """An exception as one short line a user may see: ``Type: message``, its URLs without their
    queries or credentials (a signed URL's signature is a credential), never a traceback.

    `text` replaces the message (a caller that words some errors itself); an exception of a type in
    `bare` wrote its message for users already and is shown without its type's name.
    """
    message = str(exc).strip() if text is None else text.strip()
    message = redact_text(message.splitlines()[0]) if message else ""
    if isinstance(exc, bare):
        out = message
    else:
        out = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return out[:MAX_ERROR_CHARS]
