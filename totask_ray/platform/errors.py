"""A small, safe error hierarchy for platform calls.

Messages name the method, the path (never its query string, which may carry a signature) and the
status; they never carry a token, a signed URL or a stack trace. The original exception stays on
`__cause__` for logs.
"""

from __future__ import annotations


class PlatformError(Exception):
    """Anything that went wrong talking to the platform."""


class PlatformConnectionError(PlatformError):
    """The platform could not be reached or did not answer in time (after retries)."""


class PlatformResponseError(PlatformError):
    """The platform answered with something that is not what the contract says."""


class PlatformHTTPError(PlatformError):
    """The platform answered with an error status (after retries, where they apply)."""

    def __init__(self, method: str, path: str, status_code: int, detail: str = ""):
        self.method = method
        self.path = path
        self.status_code = status_code
        self.detail = detail
        text = f"{method} {path} failed with HTTP {status_code}"
        super().__init__(f"{text}: {detail}" if detail else text)


class AuthenticationError(PlatformHTTPError):
    """401/403: the token or tenant is wrong; retrying will not help."""


class NotFoundError(PlatformHTTPError):
    """404: the object does not exist (or is not visible to this token)."""


class ValidationFailed(PlatformHTTPError):
    """400/422: the platform refused the request's content."""


class RateLimited(PlatformHTTPError):
    """429 after every retry."""


class ServerError(PlatformHTTPError):
    """5xx after every retry."""


def http_error(method: str, path: str, status_code: int, detail: str) -> PlatformHTTPError:
    cls: type[PlatformHTTPError]
    if status_code in (401, 403):
        cls = AuthenticationError
    elif status_code == 404:
        cls = NotFoundError
    elif status_code in (400, 422):
        cls = ValidationFailed
    elif status_code == 429:
        cls = RateLimited
    elif status_code >= 500:
        cls = ServerError
    else:
        cls = PlatformHTTPError
    return cls(method, path, status_code, detail)


class PlatformFilterError(PlatformError):
    """The job's task filters cannot be expressed on this platform; never ignored."""
