"""Data units, their files, and the media they point to.

A file's `url` is a signed link to `/media/` (valid `MEDIA_URL_TTL_S`), so a worker can fetch the
picture with a plain GET and no token; the task endpoints expand data units through the same
`Serializer`, so a file looks the same wherever it is shown.
"""

from __future__ import annotations

import hmac
import mimetypes
import os
import time

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from ..rest import ApiError, base_url, fields_expand, found, not_found
from ..state import PlatformState, platform_of
from ..store import TASK_FIELDS

MEDIA_URL_TTL_S = 3600


class Serializer:
    """Turns store rows into response objects for one request (one base URL, one expiry)."""

    def __init__(self, state: PlatformState, request: Request):
        self.state = state
        self.base = base_url(request)
        self.expires = int(time.time()) + MEDIA_URL_TTL_S

    def files(self, files: list[dict]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for f in files:
            name = f["specification_name"]
            if name in out:
                continue
            url = (
                f["url"] if f["url"] is not None else self.state.media_url(self.base, f["path"], self.expires)
            )
            out[name] = {
                "url": url,
                "is_primary": f["is_primary"],
                "file_name_original": f["file_name_original"],
                "file_type": f["file_type"],
            }
        return out

    def data_unit(self, du_id: int, expand_files: bool) -> dict | None:
        row = self.state.store.data_unit_with_files(du_id)
        if row is None:
            return None
        du, files = row
        du["files"] = self.files(files) if expand_files else [f["id"] for f in files]
        return du

    def task(self, task: dict, fields: list[str] | None, expand: set[str]) -> dict:
        keys = TASK_FIELDS if fields is None else [f for f in fields if f in TASK_FIELDS]
        out = {k: task[k] for k in keys}
        if "data_unit" in out and "data_unit" in expand and task["data_unit"] is not None:
            out["data_unit"] = self.data_unit(task["data_unit"], expand_files=True)
        return out


async def get_data_unit(request: Request) -> Response:
    _, expand = fields_expand(request)
    ser = Serializer(platform_of(request), request)
    return JSONResponse(found(ser.data_unit(request.path_params["id"], expand_files="files" in expand)))


async def media(request: Request) -> Response:
    st = platform_of(request)
    scope = request.scope
    rel: str = scope["path"][len("/media/") :]
    raw = scope.get("raw_path") or b""
    raw_l = raw.lower()
    # Refuse what could leave the media dir before resolving anything, encoded or not.
    if (
        not rel
        or any(bad in raw_l for bad in (b"%2e", b"%2f", b"%5c", b"%00"))
        or "\x00" in rel
        or "\\" in rel
        or rel.startswith("/")
        or any(seg in ("", ".", "..") for seg in rel.split("/"))
    ):
        raise not_found()
    full = os.path.realpath(os.path.join(st.media_root, rel))
    if os.path.commonpath([full, st.media_root]) != st.media_root or full == st.media_root:
        raise not_found()
    qp = request.query_params
    allowed = False
    if "signature" in qp or "expires" in qp:
        try:
            expires = int(qp.get("expires", ""))
        except ValueError:
            expires = -1
        sig = qp.get("signature", "")
        if expires < time.time():
            if st.header_token_ok(scope["headers"]):
                allowed = True
            else:
                raise ApiError(403, {"detail": "This signed URL has expired."})
        elif hmac.compare_digest(sig, st.sign(rel, expires)):
            allowed = True
    if not allowed and not st.header_token_ok(scope["headers"]):
        raise ApiError(403, {"detail": "Signature does not match; use the URL as given or send the token."})
    if not os.path.isfile(full):
        raise not_found()
    return FileResponse(full, media_type=_media_type(full))


def _media_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    known = {".json": "application/json", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
    return known.get(ext) or mimetypes.guess_type(path)[0] or "application/octet-stream"
