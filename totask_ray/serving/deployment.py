"""The Ray Serve side of every pre-processor app: one deployment body, one image fetch.

Each app (``serve_apps/<app>/app.py``) keeps only what is its own: the model (a
:class:`~totask_ray.serving.interface.PreProcessor`), its params and its constructor options. The
rest is here so that it is written once and audited once: the batch entry point for handles, the
Synapse-style route (``POST /``, and ``infer`` for handles: task data, as Synapse pre-processors
answer), ``@serve.batch`` merging of those requests, and above all the image fetch.

The Synapse-style route fetches a URL that a caller names, from inside the cluster. It therefore goes through
the same :class:`~totask_ray.net.downloads.Downloader` and :class:`~totask_ray.net.downloads.UrlPolicy`
as the workers' downloads: http and https only, no private, loopback or link-local address (checked
after DNS and again on every redirect) unless the host is allow-listed, a byte cap on every body, and
errors that name the host but never a signed URL's query. The allow-list reaches the replica through
the app's build args (``options: {allowed_hosts: [...], allow_private_urls: false}``).

There is one deployment, not one per app. Ray turns a ``@serve.deployment`` class into a
``Deployment`` object that cannot be subclassed, so a decorated base would force every app to copy a
subclass and its wiring; instead :class:`PreProcessorDeployment` is a plain class, decorated once
here, and an app binds its model class into it (the way Ray Data takes a callable class and its
constructor arguments). Its name comes from ``.options(name=...)``, so each app keeps its own.
``@serve.batch`` keeps its queue on the decorated function, shared by every instance in a process
and run with the first request's ``self``; the batcher is therefore made per instance in
``__init__``, which also gives it the replica's own batch size without ``set_max_batch_size``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from totask_ray.annotation import detections_to_task_data
from totask_ray.net import images
from totask_ray.net.downloads import Downloader, DownloadError, UrlPolicy, allowed_host
from totask_ray.net.redact import safe_error
from totask_ray.serving.batch_entry import DEFAULT_MAX_QUEUED_REQUESTS, BatchEntry
from totask_ray.serving.interface import Detection, PreProcessor, PreProcessorOutputError
from totask_ray.serving.params import InferenceParams
from totask_ray.serving.params_check import check_device
from totask_ray.serving.postprocess import detections_to_dicts
from totask_ray.serving.validation import validate_output

__all__ = [
    "DEPLOYMENT",
    "FetchOptions",
    "ImageFetcher",
    "ImageRequestError",
    "PreProcessorDeployment",
    "build_application",
    "client_error",
]


class ImageRequestError(ValueError):
    """The request names no usable image; its message is safe to send back to the caller."""


class FetchOptions(BaseModel):
    """The keys of the app's ``options`` that belong to the fetch, not to the model.

    Strict (unknown keys are the model's, so they are split off first, see :meth:`split`), so that a
    misspelt or mistyped allow-list fails the build instead of silently allowing nothing or anything.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_image_bytes: int = Field(images.MAX_IMAGE_BYTES, ge=1)
    download_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    allowed_hosts: tuple[str, ...] = ()
    allow_private_urls: bool = False

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        # "http://files:9000" would never match and allow nothing: refused, with what is expected
        return tuple(allowed_host(h) for h in hosts)

    @classmethod
    def split(cls, options: Mapping[str, Any] | None) -> tuple[FetchOptions, dict[str, Any]]:
        """(the fetch's options, the rest for the model's constructor)."""
        rest = dict(options or {})
        own = {key: rest.pop(key) for key in cls.model_fields if key in rest}
        return cls.model_validate(own), rest

    def policy(self) -> UrlPolicy:
        return UrlPolicy.for_platform(None, self.allowed_hosts, allow_private=self.allow_private_urls)


class ImageFetcher:
    """``image_path`` -> decoded image, under the project's URL policy; usable without Ray."""

    def __init__(self, options: FetchOptions) -> None:
        self.options = options
        self._downloader = Downloader(options.policy(), timeout_s=options.download_timeout_s)

    async def fetch(self, url: Any) -> np.ndarray:
        if not isinstance(url, str):
            raise ImageRequestError("image_path must be an http:// or https:// URL")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme not in ("http", "https"):
            # The downloader refuses these too; this keeps the message callers already match on.
            raise ImageRequestError(
                f"image_path must be an http:// or https:// URL, not {scheme or '(none)'}://"
            )
        body = await self._downloader.fetch_image(url, max_bytes=self.options.max_image_bytes)
        # Decoding a large image takes long enough to stall every other request on this loop.
        try:
            return await asyncio.to_thread(images.decode_image, body)
        except images.ImageDecodeError as exc:
            raise ImageRequestError(exc.about("image_path")) from None

    async def aclose(self) -> None:
        await self._downloader.aclose()


def client_error(exc: BaseException) -> str:
    """``Type: message`` on one line, short, and with every URL's query and credentials removed.

    What an HTTP caller sees must not hand back a signed URL's signature (it is a credential), nor
    a traceback or pydantic's multi-line report.
    """
    text = None
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(params)"
        text = f"invalid param {where!r}: {first['msg']}"
    elif isinstance(exc, json.JSONDecodeError):
        text = f'the request body is not JSON ({exc.msg}); send {{"image_path": url, ...params}}'
    return safe_error(exc, text=text)


def _status_for(exc: BaseException) -> int:
    # A model that returns garbage is the server's fault; a param it refuses, or an image_path
    # that cannot be fetched (refused by the policy, unreachable, not an image), is the caller's.
    if isinstance(exc, PreProcessorOutputError):
        return 500
    return 400 if isinstance(exc, (ValueError, TypeError, DownloadError)) else 500


def replica_cpus() -> int:
    """The CPUs Ray reserved for this replica, at least one: what the model may use for threads."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, round(cpus))


class PreProcessorDeployment(BatchEntry):
    """One replica = one model; model calls run one at a time on a worker thread.

    ``model_cls`` is the app's model class (or any factory of a :class:`PreProcessor`), called with the
    app's own ``options``: the fetch's keys are taken out first (see :class:`FetchOptions`). Apps do
    not construct this themselves: :func:`build_application` binds it from the app's build args.
    """

    def __init__(
        self,
        model_cls: Callable[..., PreProcessor],
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        fetch_options, model_options = FetchOptions.split(options)
        self.model = self.load_model(model_cls, model_options)
        self.labels = dict(self.model.spec.labels)
        self.max_batch_size = max_batch_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.model.spec.name)
        self._fetcher = ImageFetcher(fetch_options)
        self._http_batch = serve.batch(
            max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s
        )(self._infer_grouped)

    @staticmethod
    def load_model(model_cls: Callable[..., PreProcessor], options: dict[str, Any]) -> PreProcessor:
        """A model whose constructor takes ``threads`` gets the replica's reserved CPUs unless the
        options say otherwise: OpenCV and onnxruntime size their pools from the node's cores, and
        replicas sharing a node would oversubscribe it."""
        if "threads" in inspect.signature(model_cls).parameters:
            options.setdefault("threads", replica_cpus())
        model = model_cls(**options)
        if not isinstance(model, PreProcessor):
            raise TypeError(f"{model_cls!r} made a {type(model).__name__}, which has no spec and detect()")
        return model

    async def _run(self, images: list[np.ndarray], params: InferenceParams) -> list[list[Detection]]:
        """Model calls of ``model_config.batch_size`` images (the serve batch size when not given);
        a device the model cannot run on is refused here, as callers may not have checked it."""
        check_device(self.model.spec, params.device)
        size = params.batch_size or self.max_batch_size
        loop = asyncio.get_running_loop()
        out: list[list[Detection]] = []
        for i in range(0, len(images), size):
            chunk = images[i : i + size]
            dets = await loop.run_in_executor(self._pool, self.model.detect, chunk, params)
            out.extend(validate_output(chunk, dets, labels=self.labels))
        return out

    async def predict(self, images: list[Any], params: dict[str, Any] | None = None) -> list[Any]:
        """The batch entry point for handles: one list of detection dicts per image. ``images`` are
        arrays or encoded images (``batch_entry``: an image that does not decode answers
        ``{"error": ...}`` in its place); the annotators call :meth:`BatchEntry.predict_timed`."""
        p = InferenceParams.model_validate(params or {})
        return await self.answer(images, p)

    async def _infer_grouped(
        self, items: list[tuple[np.ndarray, str]]
    ) -> list[list[dict[str, Any]] | Exception]:
        """Requests merged into one batch may carry different params: each group runs once, and a
        group the model refuses fails only its own requests."""
        results: list[list[dict[str, Any]] | Exception] = [[] for _ in items]
        groups: dict[str, list[int]] = {}
        for idx, (_, key) in enumerate(items):
            groups.setdefault(key, []).append(idx)
        for key, idxs in groups.items():
            try:
                dets = await self._run([items[i][0] for i in idxs], InferenceParams.model_validate_json(key))
            except Exception as exc:
                for i in idxs:
                    results[i] = exc
                continue
            for i, d in zip(idxs, detections_to_dicts(dets), strict=True):
                results[i] = d
        return results

    async def infer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Synapse-style: ``{"image_path": url, ...params}`` -> task data, ``{"objects": [...]}``.

        The body of ``POST /``, and what the synapse calling convention calls through a deployment
        handle: both go through here, so they fetch alike and share the replica's ``@serve.batch``.
        The answer is in task-compatible format (what the Synapse user guide asks of a pre-processor,
        so the SDK template's ``convert_data_from_inference`` can write it as it is); an image with
        no detection is ``{"objects": []}``, a result. A request that cannot be served raises;
        :func:`_status_for` says whose fault it is.
        """
        if not isinstance(body, Mapping) or "image_path" not in body:
            raise ImageRequestError('expected a JSON object {"image_path": url, ...params}')
        params = {k: v for k, v in body.items() if k != "image_path"}
        InferenceParams.model_validate(params)
        image = await self._fetcher.fetch(body["image_path"])
        out = await self._http_batch((image, json.dumps(params, sort_keys=True)))
        if isinstance(out, Exception):
            raise out
        return detections_to_task_data(out)

    async def __call__(self, request: Request) -> Any:
        """:meth:`infer` over HTTP; a request that cannot be served answers ``{"error": "Type:
        message"}`` with 400 (the caller's fault) or 500 (the model's)."""
        try:
            return await self.infer(await request.json())
        except Exception as exc:
            return JSONResponse({"error": client_error(exc)}, status_code=_status_for(exc))


DEPLOYMENT = serve.deployment(PreProcessorDeployment)


def build_application(
    model_cls: Callable[..., PreProcessor],
    config_path: Path,
    args: Mapping[str, Any] | None = None,
    *,
    name: str,
) -> serve.Application:
    """What each app's ``build_app(args)`` returns: the shared deployment, named ``name``, around
    ``model_cls``; ``args`` as made by ``totask_ray.serving.resources.deployment_args``, or the app's
    own ``config.yaml`` without them.

    The fetch options are checked here too, so a bad allow-list fails the dispatch at once rather than
    a replica later (a replica whose constructor raises takes ~7 s to show as DEPLOY_FAILED).
    """
    from totask_ray.serving.config import load_release_config
    from totask_ray.serving.resources import DeploymentArgs, deployment_args

    parsed = (
        DeploymentArgs.model_validate(dict(args))
        if args
        else deployment_args(load_release_config(config_path))
    )
    FetchOptions.split(parsed.options)
    options = parsed.deployment_options()
    # issue 25: a bounded queue per caller unless the release sets one (callers back off on refusal)
    options.setdefault("max_queued_requests", DEFAULT_MAX_QUEUED_REQUESTS)
    return DEPLOYMENT.options(name=name, **options).bind(
        model_cls,
        max_batch_size=parsed.max_batch_size,
        batch_wait_timeout_s=parsed.batch_wait_timeout_s,
        options=parsed.options,
    )
