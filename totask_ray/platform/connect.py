"""The one place that turns platform settings into a client: one registry line per platform.

Everything above `platform/` holds a `PlatformConfig` (picklable, so Ray workers get a copy) and
asks here for a client. Adding a platform is a folder under `platform/` (its config with
`from_env` and `for_job`, a blocking and an async client that declare their capabilities, the CLI
options it takes) and one `PlatformKind` line below.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from totask_ray.platform.base import AsyncPlatform, Platform
from totask_ray.platform.cli_options import CliOption
from totask_ray.platform.errors import PlatformError
from totask_ray.platform.label_studio.client import AsyncLabelStudioClient, LabelStudioClient
from totask_ray.platform.label_studio.config import CLI_OPTIONS as LS_OPTIONS
from totask_ray.platform.label_studio.config import ENV_KEY, ENV_URL, LabelStudioConfig
from totask_ray.platform.synapse.client import CLI_OPTIONS as SYNAPSE_OPTIONS
from totask_ray.platform.synapse.client import AsyncSynapseClient, SynapseClient, SynapseConfig

PlatformConfig: TypeAlias = SynapseConfig | LabelStudioConfig


@dataclass(frozen=True)
class PlatformKind:
    name: str  # what `--platform` takes
    config: type[Any]  # its settings: a pydantic model with `from_env(env, **overrides)` and `for_job`
    blocking: Callable[[Any], Platform]
    async_: Callable[[Any], AsyncPlatform]
    named_by_env: Callable[[Mapping[str, str]], bool]  # the environment's variables point at it
    options: tuple[CliOption, ...]  # what `totask-ray run` takes for it
    auth_hint: str = ""  # what to set when the platform answers 401/403

    @property
    def title(self) -> str:
        """How messages name it: the client class declares it (`Platform.name`)."""
        return str(getattr(self.blocking, "name", self.name))


KINDS: tuple[PlatformKind, ...] = (
    PlatformKind(
        "label-studio", LabelStudioConfig, LabelStudioClient, AsyncLabelStudioClient,
        named_by_env=lambda env: bool(env.get(ENV_URL) and env.get(ENV_KEY) and not env.get("SYNAPSE_HOST")),
        options=LS_OPTIONS,
        auth_hint=f"check {ENV_KEY} (or --token): Label Studio takes a Personal Access Token (Account & "
        "Settings > Personal Access Token) or a legacy token, of a user who can open the project",
    ),
    PlatformKind(
        "synapse", SynapseConfig, SynapseClient, AsyncSynapseClient,
        named_by_env=lambda env: True, options=SYNAPSE_OPTIONS,
        auth_hint="check SYNAPSE_ACCESS_TOKEN (or --token): an access token of the platform at SYNAPSE_HOST, "
        "and SYNAPSE_PLUGIN_RUN_TENANT (or --tenant) where the platform has tenants",
    ),
)  # fmt: skip
PLATFORMS = tuple(k.name for k in reversed(KINDS))  # synapse first: the default


def _kind(config: PlatformConfig) -> PlatformKind:
    for kind in KINDS:
        if isinstance(config, kind.config):
            return kind
    raise PlatformError(f"No client for platform settings of type {type(config).__name__}")


def auth_hint(config: PlatformConfig) -> str:
    """What to set when ``config``'s platform refuses the credentials (a 401 or 403)."""
    return _kind(config).auth_hint


def connect(config: PlatformConfig) -> Platform:
    """A blocking client (the driver, the id source's read tasks)."""
    return _kind(config).blocking(config)


def connect_async(config: PlatformConfig) -> AsyncPlatform:
    """An async client for one annotator actor; its session is made on the loop that first uses it."""
    return _kind(config).async_(config)


def platform_from_env(env: Mapping[str, str] | None = None) -> str:
    """The first platform the environment names: `label-studio` when LABEL_STUDIO_URL and
    LABEL_STUDIO_API_KEY are set and SYNAPSE_HOST is not, else `synapse`."""
    env = os.environ if env is None else env
    return next(k.name for k in KINDS if k.named_by_env(env))


def _named(name: str) -> PlatformKind:
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise PlatformError(f"Unknown platform {name!r}: use one of {', '.join(PLATFORMS)}")


def config_from_env(
    platform: str | None = None, env: Mapping[str, str] | None = None, **overrides: object
) -> PlatformConfig:
    """The platform named by `platform` (or by the environment), from its own variables: the
    SYNAPSE_* ones the Synapse SDK reads, or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY."""
    return _named(platform or platform_from_env(env)).config.from_env(env, **overrides)


def config_from_cli(
    platform: str | None, given: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> PlatformConfig:
    """The platform's config from the CLI's platform flags (`given`: flag -> value, None when left
    out) over its variables. A flag of another platform is refused, not ignored."""
    kind = _named(platform or platform_from_env(env))
    overrides: dict[str, Any] = {}
    for flag, value in given.items():
        if value is None or value == []:
            continue
        option = next((o for o in kind.options if o.flag == flag), None)
        if option is None:
            owners = " / ".join(k.title for k in KINDS if any(o.flag == flag for o in k.options))
            raise PlatformError(
                f"--{flag} is a {owners} option; this run is on {kind.title} (--platform {kind.name})"
            )
        overrides[option.setting] = option.parse(value) if option.parse else value
    return kind.config.from_env(env, **overrides)
