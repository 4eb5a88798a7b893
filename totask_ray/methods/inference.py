"""The inference method: a task's data is what a pre-processor on Ray Serve sees in its primary image.

Prepare resolves `pre_processor` (a plugin release id) on the platform, parses its config with
strict models, and runs the lifecycle (detect → capacity gate → dispatch → wait) on the Ray
cluster. A pre-processor this run started is torn down if the run then fails critically; one that
was already running is left alone.

The annotator downloads and decodes each task's primary image in the Data actor (async, bounded),
then calls the Serve application through a `DeploymentHandle` once per batch (measured on Ray 2.60:
~7,000 items/s that way against ~570 with one call per item), converts and validates each task's
detections, and writes them. A failed call is retried once; then that batch's tasks fail with the
reason and other batches go on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from totask_ray.action import ToTask
from totask_ray.annotation import detections_to_task_data
from totask_ray.cluster import ensure_ray
from totask_ray.errors import CriticalError
from totask_ray.methods.base import AnnotationMethod, PrepareInput
from totask_ray.methods.labels import LabelMapError, LabelMapping
from totask_ray.net.downloads import DownloadError
from totask_ray.net.images import ImageDecodeError, decode_image
from totask_ray.pipeline.annotator import Annotator, TaskFailed, safe_error
from totask_ray.pipeline.outcomes import Outcome, Stage
from totask_ray.pipeline.run import AnnotatorSpec
from totask_ray.pipeline.spec import RunSpec
from totask_ray.platform.errors import NotFoundError
from totask_ray.platform.models import Task

if TYPE_CHECKING:
    from totask_ray.serving.config import PreProcessorRelease

log = logging.getLogger("totask_ray")

EMPTY_RESULT = "empty inference result"


@dataclass
class InferencePlan:
    release: PreProcessorRelease
    config: dict[str, Any]
    params: dict[str, Any]  # the job's pre_processor_params as checked (aliases resolved, unknown out)
    convention: str = "batched"
    route: str | None = None
    body_model: str | None = None
    labels: LabelMapping | None = None

    @property
    def app_name(self) -> str:
        return self.release.app_name


class InferenceMethod(AnnotationMethod):
    """Prepare: resolve the release, bring the pre-processor up. Annotator: `InferenceAnnotator`."""

    name = "inference"

    def __init__(self, spec: RunSpec) -> None:
        self.options = spec.options
        self.plan: InferencePlan | None = None
        self._backend: Any = None
        self._dispatched: str | None = None

    def prepare(self, job: PrepareInput) -> None:
        from totask_ray.serving.capacity import CapacityError
        from totask_ray.serving.config import PreProcessorRelease, ReleaseConfigError, parse_release_config
        from totask_ray.serving.lifecycle import RayServeBackend, ensure_running

        release_id = job.params.pre_processor
        assert release_id is not None, "ToTaskParams requires pre_processor for the inference method"
        try:
            raw = job.platform.get_plugin_release(release_id)
        except NotFoundError:
            raise CriticalError(
                f"Pre-processor not found: plugin release {release_id} does not exist or this token cannot see it"
            ) from None
        try:
            config = parse_release_config(raw.config, source=f"plugin release {release_id}")
        except ReleaseConfigError as exc:
            raise CriticalError(f"Pre-processor not active: its release config is invalid: {exc}") from None
        release = PreProcessorRelease.from_config(config, id=raw.id)
        o = self.options
        convention = o.inference_convention or release.convention
        if release.requires_model and job.params.model is None:
            raise CriticalError(
                f"Pre-processor needs a model: release {release_id} ({release.app_name}) picks its model by "
                "`model`; set model to the model's id"
            )
        ensure_ray(o.ray_address, verbose=o.verbose_ray)
        spec = app_spec(release)
        from totask_ray.serving.resources import Resources

        reserved = Resources.from_required(release.config.actions.inference.required_resources).num_gpus
        checked_params = check_job_params(spec, job.params.pre_processor_params, reserved)
        try:
            labels = LabelMapping.build(
                job.project.classes,
                sorted(set(spec.labels.values())) if spec is not None else None,
                job.params.label_map,
                job.params.unmapped_labels,
            )
        except LabelMapError as exc:
            raise CriticalError(f"Labels do not map to the project: {exc}") from None
        route, body_model = synapse_route(release) if convention == "synapse" else (None, None)
        backend = self._backend = RayServeBackend()
        try:
            result = ensure_running(
                release, backend, poll_interval_s=o.serve_poll_interval_s, timeout_s=o.serve_ready_timeout_s,
                size_replicas=True, decode_cpus=o.actor_cpus,
            )  # fmt: skip
        except CapacityError as exc:  # refused before dispatch: nothing to undo
            raise CriticalError(f"Pre-processor not active: {exc}") from exc
        except RuntimeError as exc:  # dispatched (or tried to), then failed: this run owns what is there
            self._dispatched = release.app_name
            raise CriticalError(f"Pre-processor not active: {exc}") from exc
        if result.started:
            self._dispatched = release.app_name
        self.plan = InferencePlan(
            release,
            config.model_dump(mode="json", exclude_none=True),
            checked_params,
            convention=convention,
            route=route,
            body_model=body_model,
            labels=labels,
        )
        verb = "started" if result.started else "found running"
        log.info("pre-processor %s %s (%.1f s)", release.app_name, verb, result.elapsed_s)

    def rollback(self) -> None:
        """Delete a pre-processor this run dispatched; one that was already running is left alone."""
        if self._dispatched is not None and self._backend is not None:
            log.info("tearing down %s, which this run dispatched", self._dispatched)
            self._backend.delete(self._dispatched)
            self._dispatched = None

    def annotator(self, spec: RunSpec, stop_flag: Any = None) -> AnnotatorSpec:
        assert self.plan is not None, "prepare() runs before annotator()"
        return AnnotatorSpec(
            InferenceAnnotator,
            {
                "spec": spec,
                "stop_flag": stop_flag,
                "app_name": self.plan.app_name,
                "pre_processor_config": self.plan.config,
                "convention": self.plan.convention,
                "route": self.plan.route,
                "body_model": self.plan.body_model,
                "labels": self.plan.labels,
                "app_params": self.plan.params,
                "release": {
                    "code": self.plan.release.code,
                    "version": self.plan.release.version,
                    "config": self.plan.config,
                    "max_batch_size": self.plan.release.max_batch_size,
                },
            },
        )


def entrypoint_of(release: PreProcessorRelease) -> str | None:
    """`module:attr` the release deploys (`actions.deployment`, or `actions.inference` as the
    Synapse SDK writes it)."""
    target = release.deploy_target
    return target.entrypoint if target is not None else None


def app_spec(release: PreProcessorRelease) -> Any:
    """The app's `SPEC` (labels, declared params), read from its module without deploying it; None
    for an app that declares none (a Synapse-style app: only the common params are checked)."""
    from totask_ray.serving.interface import PreProcessorSpec

    entry = entrypoint_of(release)
    if not entry:
        return None
    try:
        module = importlib.import_module(entry.partition(":")[0])
    except Exception as exc:
        raise CriticalError(
            f"Pre-processor not active: its entrypoint module {entry.partition(':')[0]} cannot be imported here "
            f"({type(exc).__name__}); install the plugin where the job's driver runs"
        ) from None
    spec = getattr(module, "SPEC", None)
    return spec if isinstance(spec, PreProcessorSpec) else None


def cluster_gpus() -> float:
    from totask_ray.serving.capacity import read_cluster

    return sum(node.get("GPU", 0.0) for node in read_cluster().totals)


def check_job_params(spec: Any, params: dict[str, Any], gpus_per_replica: float | None) -> dict[str, Any]:
    """`pre_processor_params` checked against what the app declares, before anything is deployed:
    a bad value is a critical error naming the field; unknown keys get one warning."""
    from totask_ray.serving.interface import ParamsRefused, check_params

    try:
        checked = check_params(spec, params, gpus_available=cluster_gpus(), gpus_per_replica=gpus_per_replica)
    except ParamsRefused as exc:
        raise CriticalError(f"Invalid pre_processor_params: {exc}") from None
    if checked.ignored:
        log.warning(
            "pre_processor_params: %s not used by this pre-processor (ignored): %s",
            "this key is" if len(checked.ignored) == 1 else "these keys are",
            ", ".join(sorted(checked.ignored)),
        )
    return dict(checked.params)


def synapse_route(release: PreProcessorRelease) -> tuple[str, str | None]:
    """The method behind the app's `POST /` route (called through the handle, not the HTTP proxy)
    and, when it takes a pydantic model, that model's import path.

    Without a FastAPI app, a class's `infer(body)` is preferred to its `__call__`: totask-ray's
    shared deployment answers HTTP in `__call__`, which takes a starlette request that a handle
    cannot pass, and both go through `infer`. A builder entrypoint (`build_app(args)`, as
    totask-ray's apps are) names no class: it is built with the release's own args to find the one
    it deploys (binding only describes the app; nothing is deployed or loaded).
    """
    import inspect

    from pydantic import BaseModel
    from ray import serve

    entry = entrypoint_of(release)
    if not entry:
        raise CriticalError("Pre-processor not active: its release names no entrypoint to call")
    target = _import(entry)
    modules = [importlib.import_module(entry.partition(":")[0])]
    if callable(target) and not (inspect.isclass(target) or isinstance(target, serve.Deployment)):
        from totask_ray.serving.resources import deployment_args

        try:
            built = target(deployment_args(release.config).model_dump())
        except Exception as exc:
            raise CriticalError(
                f"Pre-processor not active: {entry} could not be built to find its route ({safe_error(exc)})"
            ) from None
        target = getattr(getattr(built, "_bound_deployment", None), "func_or_class", target)
    cls = getattr(target, "func_or_class", target)  # a @serve.deployment class or the bare class
    raw = getattr(cls, "__wrapped__", cls)  # the class under @serve.ingress
    own = inspect.getmodule(raw)
    if own is not None and own not in modules:
        modules.append(own)  # a builder's class may keep its ingress app in its own module
    # The FastAPI app: the SDK's `app` class attribute, or the module's app that @serve.ingress took
    candidates = [vars(raw).get("app"), *(v for m in modules for v in vars(m).values())]
    apps = [a for a in candidates if hasattr(a, "routes") and hasattr(a, "router")]
    app = next(iter(apps), None)
    if app is None:
        if isinstance(cls, type) and callable(getattr(cls, "infer", None)):
            return "infer", None  # totask-ray's deployment: infer(body) -> task data
        if isinstance(cls, type) and "__call__" in dir(cls):
            return "__call__", None  # a plain deployment: its __call__ takes the request body
        raise CriticalError(
            f"Pre-processor not active: {entry} has no FastAPI app with a POST / route for the synapse "
            "convention; use convention: batched for apps with predict(images, params)"
        )
    from ray.serve._private.http_util import _walk_fastapi_routes

    for route, _, prefix in _walk_fastapi_routes(app):
        path = f"{prefix}{getattr(route, 'path', '')}" or "/"
        if path in ("/", "") and "POST" in (getattr(route, "methods", None) or ()):
            name = route.endpoint.__name__
            method = getattr(raw, name, None)
            if method is None:
                continue  # a route of another class in the same module
            # Serve's ingress makes a route's parameters keyword-only: the body is passed by name
            params = [q for q in inspect.signature(method).parameters.values() if q.name != "self"]
            param = params[0].name if params else "body"
            body = params[0].annotation if params else None
            if isinstance(body, str):  # postponed annotations: resolve in the app's own module
                body = getattr(importlib.import_module(method.__module__), body.split("[")[0], None)
            if isinstance(body, type) and issubclass(body, BaseModel):
                return f"{name}:{param}", f"{body.__module__}:{body.__qualname__}"
            return f"{name}:{param}", None
    raise CriticalError(f"Pre-processor not active: {entry} has no POST / route")


@dataclass
class _Ready:
    """A task whose params are known (and, batched, whose image is decoded): waiting for the model."""

    task: Task
    url: str
    image: np.ndarray | None  # batched: decoded here; synapse: the app fetches `image_path` itself
    params: dict[str, Any]
    model: Any
    key: str


def split_request(returned: Any, default_model: Any) -> tuple[dict[str, Any], Any]:
    """`setup_inference_params`'s answer as (the app's params, the model): either the params
    themselves, or the Synapse SDK's request `{"model", "method", "json": {"image_path", ...}}`."""
    if not isinstance(returned, dict):
        raise TaskFailed(Stage.CONVERT, "setup_inference_params must return a dict of parameters")
    if isinstance(returned.get("json"), dict) and set(returned) <= {"model", "method", "json"}:
        method = str(returned.get("method", "post")).lower()
        if method != "post":
            raise TaskFailed(
                Stage.CONVERT, f"setup_inference_params asked for method '{method}'; only post is sent"
            )
        params = {k: v for k, v in returned["json"].items() if k != "image_path"}
        return params, returned.get("model", default_model)
    params = dict(returned)
    return params, params.pop("model", default_model)


def multiplexed_model_id(model: Any, config: Any) -> str:
    """Serve's multiplexed model id for `model`, made the way the Synapse agent makes it: a JWT
    `{"model", "token", "tenant"?}` signed HS256 with the backend URL, so an app built on the SDK's
    `BaseServeDeployment` can fetch the model from the platform itself."""
    if model is None:
        return ""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    token = config.access_token or config.user_token
    claims: dict[str, Any] = {"model": str(model), "token": token.get_secret_value() if token else ""}
    if config.tenant is not None:
        claims["tenant"] = config.tenant.get_secret_value()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(config.host.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def empty_response(response: Any) -> bool:
    """The Synapse SDK's rule: `None`, `{}` and `[]` fail the task; anything else reaches the hook
    (an object list that is empty is a result: the model saw nothing)."""
    return response is None or response == {} or response == []


class InferenceAnnotator(Annotator):
    """Inference method: fetch task → model → map labels → `convert_data_from_inference` → validate
    → PUT.

    Two calling conventions. *batched*: the image is downloaded and decoded here and the app's
    `predict(images, params)` is called once per batch (per distinct params); its detections are
    turned into task data here. *synapse*: the app's own route (`POST /` with `{"image_path": url,
    ...params}`) is called through its deployment handle, one request per task with all of a batch
    in flight, so the app's `@serve.batch` merges them, with Serve's multiplexed model id set from
    `model`; its response is the task's `inference_data`, as in Synapse.
    """

    empty_message = EMPTY_RESULT

    def __init__(
        self,
        spec: RunSpec,
        app_name: str,
        pre_processor_config: dict[str, Any],
        stop_flag: Any = None,
        convention: str = "batched",
        route: str | None = None,
        body_model: str | None = None,
        labels: LabelMapping | None = None,
        release: dict[str, Any] | None = None,
        app_params: dict[str, Any] | None = None,
    ):
        super().__init__(spec, stop_flag)
        from ray import serve

        self.app_name = app_name
        self.pre_processor_config = pre_processor_config
        self.convention = convention
        self.labels = labels
        self.handle = serve.get_app_handle(app_name)
        self._route, _, self._body_param = (route or "__call__").partition(":")
        self._body_model = _import(body_model) if body_model else None
        self._model_ids: dict[str, str] = {}
        self.action.context.inference = release
        self.empty_policy = spec.params.empty_result
        # the job's pre_processor_params as checked at prepare (aliases resolved, unknown keys out)
        self.app_params = dict(spec.params.pre_processor_params) if app_params is None else dict(app_params)
        self._custom_params = spec.action_cls.overrides("setup_inference_params")
        # Without an override every task gets the same params: compute them once, with the base hook.
        default = ToTask.setup_inference_params(
            self.action, "", None, {}, model_id=spec.params.model,
            pre_processor_params=dict(self.app_params),
            pre_processor_config=pre_processor_config, task_data=None,
        )  # fmt: skip
        self._default = split_request(default, spec.params.model)

    async def _ready(self) -> None:
        first = self._client is None
        await super()._ready()
        if first:
            # Initializing the handle starts its router finding the replicas while this first
            # batch is still fetching and decoding, not when its call is made (the first call
            # took 0.44-0.48 s with this, 0.64-0.68 without). Here, not in the constructor: an
            # actor that never gets a batch never starts its stop watch, so it must never hold
            # the router's long poll either (`release`).
            self.handle = self.handle.options()

    def release(self) -> None:
        from totask_ray.serving.handles import let_go

        let_go()

    async def run_batch(self, ids: list[int]) -> list[Outcome]:
        prepared = await asyncio.gather(*(self._isolated(tid, self._prepare, tid) for tid in ids))
        outcomes = [p for p in prepared if isinstance(p, Outcome)]
        ready = [p for p in prepared if isinstance(p, _Ready)]
        if self.convention == "synapse":
            results = await asyncio.gather(*(self._call_route(item) for item in ready))
            answered = list(zip(ready, results, strict=True))
        else:
            groups: dict[str, list[_Ready]] = {}
            for item in ready:
                groups.setdefault(item.key, []).append(item)
            answered = [
                pair
                for group in await asyncio.gather(*map(self._infer_group, groups.values()))
                for pair in group
            ]
        finishing = [
            self._isolated(item.task.id, self._finish, item, response, new_task=False)
            for item, response in answered
        ]
        outcomes.extend(await asyncio.gather(*finishing))
        return outcomes

    async def _prepare(self, task_id: int) -> _Ready | Outcome:
        task, unit = await self.fetch_task(task_id)
        skipped = self.skip_existing(task)
        if skipped is not None:
            return skipped
        primary = unit.primary_file()
        if primary is None or not primary.url:
            raise TaskFailed(Stage.LOCATE, "the data unit has no primary file with a URL")
        if self._custom_params:
            files = {name: f.model_dump() for name, f in unit.files.items()}
            try:
                returned = await self.call_hook(
                    self.action.setup_inference_params, primary.url, primary.name, files,
                    model_id=self.params.model, pre_processor_params=dict(self.app_params),
                    pre_processor_config=self.pre_processor_config, task_data=task.model_dump(),
                )  # fmt: skip
            except Exception as exc:
                raise TaskFailed(Stage.CONVERT, f"setup_inference_params raised {safe_error(exc)}") from exc
            params, model = split_request(returned, self.params.model)
        else:
            params, model = self._default
        try:
            key = json.dumps(params, sort_keys=True, default=str)
        except (TypeError, ValueError):
            raise TaskFailed(Stage.CONVERT, "the inference parameters are not JSON-serialisable") from None
        image = None
        if self.convention != "synapse":
            assert self._downloader is not None
            try:
                body = await self._downloader.fetch_image(primary.url, max_bytes=self.options.max_image_bytes)
            except DownloadError as exc:
                raise TaskFailed(Stage.CONVERT, safe_error(exc)) from exc
            loop = asyncio.get_running_loop()
            try:
                image = await loop.run_in_executor(self._threads, decode_image, body)
            except ImageDecodeError as exc:
                raise TaskFailed(Stage.CONVERT, exc.about("the primary file")) from None
        return _Ready(task, primary.url, image, params, model, key)

    async def _call(self, make: Any, what: str, problem: Any = None) -> Any:
        """One handle call, retried once; the answer, or a `TaskFailed` saying why not. `problem`
        (answer -> error text or None) marks an answer of the wrong shape as a failed attempt."""
        last_error = ""
        for attempt in (1, 2):
            response = make()
            try:
                answer = await asyncio.wait_for(response, timeout=self.options.inference_call_timeout_s)
                wrong = problem(answer) if problem is not None else None
                if wrong is None:
                    return answer
                last_error = wrong
            except TimeoutError:
                response.cancel()
                last_error = (
                    f"the pre-processor did not answer within {self.options.inference_call_timeout_s:g} s"
                )
            except Exception as exc:
                last_error = f"the pre-processor failed: {safe_error(exc)}"
            log.debug("%s attempt %d failed: %s", what, attempt, last_error)
        return TaskFailed(Stage.CONVERT, last_error)

    async def _call_route(self, item: _Ready) -> Any:
        body: Any = {"image_path": item.url, **item.params}
        if self._body_model is not None:
            try:
                body = self._body_model.model_validate(body)
            except Exception as exc:
                return TaskFailed(
                    Stage.CONVERT, f"the pre-processor refuses these parameters: {safe_error(exc)}"
                )
        handle = self.handle.options(multiplexed_model_id=self._model_id(item.model))
        method = getattr(handle, self._route)
        if self._body_param:
            answer = await self._call(lambda: method.remote(**{self._body_param: body}), "inference request")
        else:
            answer = await self._call(lambda: method.remote(body), "inference request")
        if hasattr(answer, "model_dump"):
            answer = answer.model_dump(mode="json")
        return answer

    def _model_id(self, model: Any) -> str:
        key = str(model)
        if key not in self._model_ids:
            self._model_ids[key] = multiplexed_model_id(model, self.spec.platform)
        return self._model_ids[key]

    async def _infer_group(self, group: list[_Ready]) -> list[tuple[_Ready, Any]]:
        """One `predict` call for the whole group; its detections as task data, one per task."""
        from totask_ray.serving.interface import (
            InferenceParams,
            PreProcessorOutputError,
            apply_params,
            detections_to_dicts,
            validate_output,
        )

        images = [item.image for item in group]
        params = group[0].params

        def problem(answer: Any) -> str | None:
            if isinstance(answer, list) and len(answer) == len(group):
                return None
            return (
                f"the pre-processor returned {type(answer).__name__} instead of one detection list per image "
                f"({len(group)})"
            )

        answer = await self._call(lambda: self.handle.predict.remote(images, params), "batch call", problem)
        if isinstance(answer, TaskFailed):
            return [(item, answer) for item in group]
        out: list[tuple[_Ready, Any]] = []
        for item, detections in zip(group, answer, strict=True):
            try:
                valid = validate_output([item.image], [detections])[0]
                kept = apply_params(valid, InferenceParams.model_validate(item.params))
            except PreProcessorOutputError as exc:
                out.append(
                    (item, TaskFailed(Stage.VALIDATE, f"the pre-processor's output is invalid: {exc}"))
                )
                continue
            except ValueError as exc:
                out.append(
                    (item, TaskFailed(Stage.CONVERT, f"invalid inference parameters: {safe_error(exc)}"))
                )
                continue
            out.append((item, detections_to_task_data(detections_to_dicts([kept])[0])))
        return out

    async def _finish(self, item: _Ready, response: Any) -> Outcome:
        if isinstance(response, TaskFailed):
            raise response
        if empty_response(response):
            raise TaskFailed(Stage.CONVERT, EMPTY_RESULT)
        if self.labels is not None:
            try:
                response = self.labels.apply(response)
            except LabelMapError as exc:
                raise TaskFailed(Stage.CONVERT, str(exc)) from exc
        try:
            data = await self.call_hook(
                self.action.convert_data_from_inference, response, item.task.model_dump()
            )
        except Exception as exc:
            raise TaskFailed(Stage.CONVERT, f"convert_data_from_inference raised {safe_error(exc)}") from exc
        return await self.validate_and_write(item.task, data, image_url=item.url, image=item.image)


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
