"""Checking ``pre_processor_params`` at prepare, and the messages that refuse them.

:func:`check_params` checks a job's params once, before anything is deployed, against what the
pre-processor declares (its ``PreProcessorSpec``): a bad value is refused with a message safe to show
a user (:class:`ParamsRefused`, naming the key, the problem and what is allowed); a key the app does
not read is reported, not refused. :func:`app_options` is the same check as an app runs it on its own
keys in a replica, where params may not have passed :func:`check_params`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from totask_ray.serving.interface import PreProcessorSpec
from totask_ray.serving.params import CommonParams, InferenceParams

__all__ = [
    "PARAMS_PATH",
    "CheckedParams",
    "ParamsRefused",
    "app_options",
    "check_device",
    "check_params",
]

PARAMS_PATH = "pre_processor_params"
_MAX_SHOWN = 40


class ParamsRefused(ValueError):
    """``pre_processor_params`` the pre-processor cannot honour; the message is safe to show a user."""


@dataclass(frozen=True)
class CheckedParams:
    """What :func:`check_params` made of ``pre_processor_params``.

    ``params`` is what to send the app: for a declared app the known keys under their canonical
    names (``threshold`` becomes ``confidence_threshold``), for an undeclared one the keys exactly
    as given (a third-party app reads its own spelling). ``ignored`` names, as dotted paths, every
    key a declared app does not read; they are left out of ``params``. ``inference`` is the typed
    view of what is sent (``inference.batch_size``, ``inference.device``; what
    :func:`~totask_ray.serving.postprocess.apply_params`
    takes).
    """

    params: dict[str, Any]
    ignored: tuple[str, ...]
    inference: InferenceParams
    app: str | None = None

    @property
    def warning(self) -> str | None:
        """One line naming every ignored key, for the driver to log once; ``None`` when none are."""
        if not self.ignored:
            return None
        who = f"the pre-processor {self.app!r}" if self.app else "the pre-processor"
        keys = ", ".join(self.ignored)
        return f"{PARAMS_PATH}: {who} does not read {keys}; ignored"


def _group_model(field: FieldInfo) -> type[BaseModel] | None:
    for arg in (field.annotation, *get_args(field.annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _input_keys(name: str, field: FieldInfo) -> tuple[str, ...]:
    """The keys a field is validated from: its alias choices, or its alias, or its name."""
    va = field.validation_alias
    if isinstance(va, AliasChoices):
        return tuple(c for c in va.choices if isinstance(c, str))
    if isinstance(va, str):
        return (va,)
    return (field.alias or name,)


def _split_known(
    data: Mapping[str, Any], model: type[BaseModel], prefix: str = ""
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(keys ``model`` reads, keys it does not, their dotted paths); groups are split recursively."""
    by_key = {key: field for name, field in model.model_fields.items() for key in _input_keys(name, field)}
    known: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    paths: list[str] = []
    for key, value in data.items():
        field = by_key.get(str(key))
        if field is None:
            unknown[key] = value
            paths.append(f"{prefix}{key}")
            continue
        group = _group_model(field)
        if group is not None and isinstance(value, Mapping):
            inner, _, inner_paths = _split_known(value, group, f"{prefix}{key}.")
            known[key] = inner
            paths.extend(inner_paths)
        else:
            known[key] = value
    return known, unknown, paths


def _field_at(model: type[BaseModel], loc: Sequence[Any]) -> FieldInfo | None:
    """The field a (cleaned) error location ends in; list indexes are stepped over."""
    field: FieldInfo | None = None
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        if current is None:
            return None
        by_key = {k: f for name, f in current.model_fields.items() for k in _input_keys(name, f)}
        field = by_key.get(str(part))
        if field is None:
            return None
        current = _group_model(field)
    return field


def _clean_loc(model: type[BaseModel], loc: Sequence[Any]) -> tuple[Any, ...]:
    """The location as the user wrote it: pydantic's union-member tags (``constrained-int``) dropped."""
    out: list[Any] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif current is not None:
            out.append(part)
            by_key = {k: f for name, f in current.model_fields.items() for k in _input_keys(name, f)}
            field = by_key.get(str(part))
            current = _group_model(field) if field is not None else None
        # else: below a non-model value, a string part is a union member's tag
    return tuple(out)


def _shown(value: Any) -> str:
    """A value as a message may show it: short scalars as they are, anything else by its kind."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= _MAX_SHOWN else f"a string of {len(value)} characters"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _refusal(exc: ValidationError, model: type[BaseModel]) -> str:
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for err in exc.errors():
        merged.setdefault(_clean_loc(model, err["loc"]), []).append(err)
    problems = []
    for loc, errs in merged.items():
        err = errs[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not loc:  # a check across keys: its message names them
            problems.append(f"{PARAMS_PATH}: {msg}")
            continue
        if len(errs) > 1:  # every member of a union refused it
            msg = "not an accepted value"
        elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = "expected a mapping"
        where = ".".join([PARAMS_PATH, *(str(p) for p in loc)])
        field = _field_at(model, loc)
        allowed = f"; allowed: {field.description}" if field is not None and field.description else ""
        problems.append(f"{where}: {msg[:1].lower()}{msg[1:]} (got {_shown(err.get('input'))}){allowed}")
    return "; ".join(problems)


def _labels_text(labels: Mapping[int, str], limit: int = 50) -> str:
    items = [f"{name} ({cid})" for cid, name in sorted(labels.items())]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_device(spec: PreProcessorSpec | None, device: str | None) -> None:
    """Refuse a device the app cannot run on (``ValueError``); ``auto`` always resolves somewhere."""
    if spec is None or spec.devices is None or device in (None, "auto") or device in spec.devices:
        return
    runs_on = " or ".join(spec.devices)
    raise ValueError(
        f"{PARAMS_PATH}.model_config.device: {spec.name} runs on {runs_on} only, not {device}; "
        f"use device: {spec.devices[0]} (or auto)"
    )


def check_params(
    spec: PreProcessorSpec | None,
    params: Mapping[str, Any] | None,
    *,
    gpus_available: float,
    gpus_per_replica: float | None = None,
) -> CheckedParams:
    """Check ``pre_processor_params`` against what the pre-processor declares, once, at prepare.

    A bad value is refused (:class:`ParamsRefused`, naming the key, the problem and what is allowed);
    a key a declared app does not read is reported in ``ignored``, not refused, because params are
    often shared across pre-processors. ``class_filter`` must name the model's own classes, and
    ``device: cuda`` needs a GPU in the cluster (``gpus_available``: up, or on nodes its autoscaler can add) and,
    when ``gpus_per_replica`` is given, a release that reserves one: a replica without a GPU
    reservation cannot see the device and would quietly run on CPU.
    """
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ParamsRefused(f"{PARAMS_PATH}: expected a mapping of keys to values, got {_shown(params)}")
    raw = dict(params)
    declared = spec.params if spec is not None else None
    model: type[CommonParams] = declared or CommonParams
    known, _unknown, ignored = _split_known(raw, model)
    try:
        parsed = model.model_validate(known)
        # Undeclared apps get the params as given, so the driver's view must be read from them too.
        inference = InferenceParams.model_validate(raw) if declared is None else None
    except ValidationError as exc:
        raise ParamsRefused(_refusal(exc, model)) from None

    if spec is not None and parsed.class_filter is not None:
        names = set(spec.labels.values())
        missing = [
            c for c in parsed.class_filter if (c not in spec.labels if isinstance(c, int) else c not in names)
        ]
        if missing:
            shown = ", ".join(_shown(c) for c in missing[:10])
            hints = [m for c in missing if isinstance(c, str) for m in difflib.get_close_matches(c, names, 1)]
            hint = f" (did you mean {hints[0]!r}?)" if hints else ""
            raise ParamsRefused(
                f"{PARAMS_PATH}.class_filter: {shown} {'is' if len(missing) == 1 else 'are'} not a class "
                f"of {spec.name}{hint}; allowed: {_labels_text(spec.labels)}"
            )

    device = parsed.device
    try:
        check_device(spec, device)
    except ValueError as exc:
        raise ParamsRefused(str(exc)) from None
    if device == "cuda" and gpus_available <= 0:
        raise ParamsRefused(
            f"{PARAMS_PATH}.model_config.device: cuda cannot be honoured: this cluster has no GPU and "
            "its node types add none; use device: cpu, or add a GPU node type (pass --cluster-yaml when the "
            "cluster cannot say what its autoscaler adds)"
        )
    if device == "cuda" and gpus_per_replica is not None and gpus_per_replica <= 0:
        raise ParamsRefused(
            f"{PARAMS_PATH}.model_config.device: cuda cannot be honoured: the release reserves no GPU "
            "per replica (required_gpu_count: 0), so its replicas cannot see one; use device: cpu or "
            "deploy a release that reserves a GPU"
        )
    if parsed.batch_size is not None and spec is not None and not spec.honours_batch_size:
        raise ParamsRefused(
            f"{PARAMS_PATH}.model_config.batch_size: {spec.name} does not let a caller choose its batch "
            "size; remove the key"
        )

    if inference is not None:
        return CheckedParams(raw, (), inference, spec.name if spec else None)
    send = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return CheckedParams(send, tuple(ignored), InferenceParams.model_validate(send), spec.name)


def app_options(params: InferenceParams, model: type[CommonParams]) -> dict[str, Any]:
    """The app-specific keys of ``params`` that ``model`` declares, checked by it; ``None`` means
    "the app's default" and is left out.

    Replicas get params that may not have passed :func:`check_params` (HTTP callers), so the app
    checks its own keys again; a bad value is a ``ValueError`` naming the key (a 400 over HTTP).
    """
    own = set(model.model_fields) - set(CommonParams.model_fields)
    given = {k: v for k, v in params.extras.items() if k in own and v is not None}
    try:
        parsed = model.model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(params)"
        field = model.model_fields.get(key)
        allowed = f"; allowed: {field.description}" if field is not None and field.description else ""
        raise ValueError(
            f"param {key!r}: {first['msg']} (got {_shown(first.get('input'))}){allowed}"
        ) from None
    return {k: getattr(parsed, k) for k in given}
