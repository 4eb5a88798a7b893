"""`totask-ray platform ...`: run and seed the embedded Synapse-compatible platform.

The token is never printed: give it with `--token` or `SYNAPSE_ACCESS_TOKEN`; when `start` gets
neither it makes one and writes it to `<data-dir>/token` (mode 600).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import typer

DEFAULT_PORT = 8780

platform_app = typer.Typer(
    help="The embedded Synapse-compatible platform (SQLite + files, served over HTTP).",
    no_args_is_help=True,
    add_completion=False,
)


@platform_app.command()
def start(
    data_dir: Path = typer.Option(..., "--data-dir", help="Where the database and media files live."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (keep it on loopback)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to bind; 0 picks a free one."),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="SYNAPSE_ACCESS_TOKEN",
        show_envvar=True,
        help="Access token clients must send.",
    ),
    tenant: str | None = typer.Option(None, "--tenant", help="Tenant clients must send, if any."),
    latency_ms: float = typer.Option(
        0.0, "--latency-ms", min=0, help="Delay every answer (simulates a remote host)."
    ),
    fault_injection: bool = typer.Option(False, "--fault-injection", help="Enable POST /_local/faults/."),
    plugin_runner: str | None = typer.Option(None, "--plugin-runner", help="module:attr of a plugin runner."),
) -> None:
    """Run the platform in the foreground; prints its URL on stdout, then serves until Ctrl-C."""
    from .server import bind_socket, load_plugin_runner, serve

    data_dir.mkdir(parents=True, exist_ok=True)
    if not token:
        token = secrets.token_urlsafe(24)
        token_file = data_dir / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        typer.echo(f"No token given: generated one and wrote it to {token_file}", err=True)
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        typer.echo(
            f"Cannot bind {host}:{port}: {exc.strerror}. Choose another --port (0 picks a free one).",
            err=True,
        )
        raise typer.Exit(1) from None

    def ready(url: str) -> None:
        typer.echo(url)
        sys.stdout.flush()
        typer.echo(f"Serving {data_dir} at {url} (Ctrl-C to stop)", err=True)

    serve(
        data_dir,
        token=token,
        sock=sock,
        tenant=tenant,
        latency_ms=latency_ms,
        fault_injection=fault_injection,
        plugin_runner=load_plugin_runner(plugin_runner),
        on_ready=ready,
    )


@platform_app.command()
def seed(
    url: str = typer.Option(
        ..., "--url", envvar="SYNAPSE_HOST", show_envvar=True, help="The platform's base URL."
    ),
    token: str = typer.Option(
        ..., "--token", envvar="SYNAPSE_ACCESS_TOKEN", show_envvar=True, help="Access token."
    ),
    tenant: str | None = typer.Option(None, "--tenant", help="Tenant, if the platform wants one."),
    demo: str = typer.Option("files", "--demo", help="Which demo project to make."),
    tasks: int = typer.Option(100, "--tasks", min=0, help="How many tasks."),
    seed_: int = typer.Option(0, "--seed", help="Random seed (same seed, same content)."),
) -> None:
    """Create a demo project on a running platform; prints the ids made as one JSON object."""
    import httpx

    headers = {"Synapse-Access-Token": f"Token {token}"}
    if tenant:
        headers["Synapse-Tenant"] = f"Token {tenant}"
    endpoint = url.rstrip("/") + "/_local/seed/"
    try:
        r = httpx.post(
            endpoint,
            json={"demo": demo, "tasks": tasks, "seed": seed_},
            headers=headers,
            timeout=httpx.Timeout(600.0, connect=10.0),
        )
    except httpx.HTTPError as exc:
        typer.echo(f"Cannot reach the platform at {url}: {type(exc).__name__}", err=True)
        raise typer.Exit(1) from None
    if r.status_code >= 400:
        try:
            detail = r.json()
        except ValueError:
            detail = r.text[:200]
        typer.echo(f"Seeding failed with HTTP {r.status_code}: {detail}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(r.json(), separators=(",", ":")))
