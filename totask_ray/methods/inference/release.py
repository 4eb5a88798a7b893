"""What a plugin release deploys, read without deploying it: its entrypoint, its app's `SPEC`,
and (synapse convention) the method behind its `POST /` route."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from totask_ray.errors import CriticalError
from totask_ray.pipeline.annotator import safe_error

if TYPE_CHECKING:
    from totask_ray.serving.config import PreProcessorRelease


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
    target = import_attr(entry)
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


def import_attr(path: str) -> Any:
    """The object a `module:attr` path names."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
