"""An object store behind a URI (s3://, gs://, abfs://, hdfs://, or any fsspec scheme): what the run's
report (`run/report_store.py`) and its ledger (`ledger/place.py`) both need, in one place.

Object stores have no append, so both write whole objects (a PUT is all or nothing). Credentials
come from the environment, as every AWS tool reads them (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION, AWS_PROFILE, and AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an
S3-compatible server, which pyarrow's S3 filesystem reads itself), never from a job file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from totask_ray.net.redact import redact_url, safe_error

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


class StoreOpenError(Exception):
    """No filesystem for a URI; the message says why and what to use instead (no "Cannot open ..."
    prefix: the caller says what it was opening)."""


def is_object_uri(location: str | os.PathLike[str]) -> bool:
    """A URI other than ``file://``: objects in a store, not a local file."""
    text = os.fspath(location)
    return bool(_URI.match(text)) and not text.lower().startswith("file://")


def is_uri(text: str) -> bool:
    return bool(_URI.match(text))


def describe(location: str | os.PathLike[str]) -> str:
    """A location as a message may show it: a URI without credentials or query, a path as it is."""
    text = os.fspath(location)
    return redact_url(text) if is_uri(text) else text


def open_filesystem(uri: str) -> tuple[Any, str]:
    """The pyarrow filesystem for `uri` and the path on it: pyarrow's own (s3, gs, abfs, hdfs), else
    fsspec's, when installed. Not cached: it reads the credentials from the environment, which a
    notebook may change between runs."""
    import pyarrow
    from pyarrow.fs import FileSystem, FSSpecHandler, PyFileSystem

    try:
        return FileSystem.from_uri(uri)
    except pyarrow.ArrowInvalid as exc:
        unknown = safe_error(exc)
    except (OSError, ValueError) as exc:
        raise StoreOpenError(safe_error(exc)) from None
    try:
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError:
        raise StoreOpenError(
            f"pyarrow does not know its scheme ({unknown}) and fsspec is not installed; use s3://, gs://, "
            "abfs:// or hdfs://, or install fsspec and its filesystem for that scheme"
        ) from None
    except (ValueError, OSError) as exc:
        raise StoreOpenError(
            f"neither pyarrow nor fsspec knows this store ({safe_error(exc)}); check the URI's scheme"
        ) from None
    return PyFileSystem(FSSpecHandler(fs)), path


def store_hint(fs: Any) -> str:
    """What to check when a store refuses: its credentials and where they come from."""
    if fs.type_name == "s3":
        return (
            "; check that the bucket exists and that AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE), AWS_REGION and, for an S3-compatible server, AWS_ENDPOINT_URL are set"
        )
    return "; check the URI and this machine's credentials for that store"


def put_object(fs: Any, path: str, chunks: Iterable[bytes]) -> int:
    """Write one object whole from `chunks`; its size (0: nothing came, nothing was written)."""
    stream = None
    size = 0
    try:
        for chunk in chunks:
            if stream is None:
                stream = _open_output(fs, path)
            stream.write(chunk)
            size += len(chunk)
    finally:
        if stream is not None:
            stream.close()
    return size


def _open_output(fs: Any, path: str) -> Any:
    try:
        return fs.open_output_stream(path)
    except FileNotFoundError:  # a store with folders (a local disk, fsspec's local or memory ones)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return fs.open_output_stream(path)
