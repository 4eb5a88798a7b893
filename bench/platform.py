"""Benchmark the embedded platform over real HTTP: task GETs and annotation PUTs per second.

Starts a `LocalPlatform` (its own process), seeds a files demo, then drives it with a concurrent
aiohttp client. Each figure is the median of `--runs` runs; the server's and the client's CPU
share (of one core, from psutil) are printed beside it, since both share this machine's cores.
The baseline is `GET /health/` (no auth, no database), measured in the same run.

    python -m bench.platform [--tasks 5000] [--requests 4000] [--concurrency 64] [--runs 3]

(Run it as a module: `python bench/platform.py` would shadow the standard library's `platform`.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import aiohttp
import psutil

from totask_ray.embedded.server import LocalPlatform

TARGETS = {"get_task": 1000.0, "put_annotate": 500.0}


async def _drive(
    session: aiohttp.ClientSession, method: str, urls: list[str], bodies: list[bytes] | None, concurrency: int
) -> tuple[float, int]:
    """Send every request with `concurrency` in flight; returns (seconds, errors)."""
    next_i = 0
    errors = 0

    async def worker() -> None:
        nonlocal next_i, errors
        while next_i < len(urls):
            i = next_i
            next_i += 1
            data = None if bodies is None else bodies[i % len(bodies)]
            async with session.request(method, urls[i], data=data) as resp:
                payload = await resp.read()
                if resp.status >= 400:
                    errors += 1
                elif payload[:1] in (b"{", b"["):
                    json.loads(payload)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, errors


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


async def _bench(lp: LocalPlatform, ids: list[int], n: int, concurrency: int, runs: int) -> dict[str, Any]:
    server = psutil.Process(lp.pid)
    me = psutil.Process()
    get_urls = [
        f"{lp.url}/tasks/{ids[i % len(ids)]}/?fields=id,data,data_unit&expand=data_unit" for i in range(n)
    ]
    put_urls = [f"{lp.url}/tasks/{ids[i % len(ids)]}/annotate_task_data/" for i in range(n)]
    bodies = [
        json.dumps(
            {
                "action": "submit",
                "data": {
                    "objects": [
                        {
                            "id": "obj_001",
                            "class_id": 1,
                            "type": "bbox",
                            "coordinates": {"x": k, "y": 2 * k, "width": 40, "height": 30},
                            "properties": {"label": "person", "confidence": 0.9},
                        }
                    ]
                },
            }
        ).encode()
        for k in range(64)
    ]
    health_urls = [f"{lp.url}/health/"] * n
    headers = {**lp.headers, "Content-Type": "application/json"}
    out: dict[str, Any] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        await _drive(session, "GET", get_urls[:300], None, concurrency)  # warm up
        for name, method, urls, body in (
            ("baseline_health", "GET", health_urls, None),
            ("get_task", "GET", get_urls, None),
            ("put_annotate", "PUT", put_urls, bodies),
        ):
            rates, server_cpu, client_cpu, errors = [], [], [], 0
            for _ in range(runs):
                s0, c0 = _cpu(server), _cpu(me)
                secs, errs = await _drive(session, method, urls, body, concurrency)
                s1, c1 = _cpu(server), _cpu(me)
                rates.append(len(urls) / secs)
                server_cpu.append((s1 - s0) / secs)
                client_cpu.append((c1 - c0) / secs)
                errors += errs
            out[name] = {
                "requests_per_s": round(statistics.median(rates), 1),
                "runs": [round(r, 1) for r in rates],
                "server_cpu_share": round(statistics.median(server_cpu), 2),
                "client_cpu_share": round(statistics.median(client_cpu), 2),
                "errors": errors,
            }
    base = out["baseline_health"]["requests_per_s"]
    for name in ("get_task", "put_annotate"):
        out[name]["ratio_to_baseline"] = round(out[name]["requests_per_s"] / base, 2)
        out[name]["target"] = TARGETS[name]
        out[name]["meets_target"] = out[name]["requests_per_s"] >= TARGETS[name]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.platform", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=4000, help="requests per run and kind")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-platform-") as tmp, LocalPlatform(tmp) as lp:
        t0 = time.perf_counter()
        seeded = lp.seed("files", tasks=args.tasks, seed=0)
        seed_s = time.perf_counter() - t0
        ids = list(range(seeded["task_ids"]["first"], seeded["task_ids"]["last"] + 1))
        res = asyncio.run(_bench(lp, ids, args.requests, args.concurrency, args.runs))

    cores = psutil.cpu_count() or 1
    print(
        f"embedded platform, {args.tasks} tasks (seeded in {seed_s:.1f} s), {args.requests} requests x {args.runs}"
    )
    print(f"runs, concurrency {args.concurrency}, aiohttp client, {cores} cores shared by client and server")
    print(
        f"{'':16}{'req/s (median)':>16}{'vs /health/':>13}{'server CPU':>12}{'client CPU':>12}{'target':>9}"
    )
    for name in ("baseline_health", "get_task", "put_annotate"):
        r = res[name]
        ratio = f"{r['ratio_to_baseline']:.2f}x" if "ratio_to_baseline" in r else "1.00x"
        target = f">={r['target']:.0f}" if "target" in r else ""
        print(
            f"{name:16}{r['requests_per_s']:>16,.0f}{ratio:>13}{r['server_cpu_share']:>11.0%}"
            f"{r['client_cpu_share']:>12.0%}{target:>9}"
        )
    print("(CPU share: CPU seconds per wall second, 100% = one core)")
    print(json.dumps({"bench": "platform", "tasks": args.tasks, "seed_s": round(seed_s, 2), **res}))
    ok = all(res[k]["meets_target"] and res[k]["errors"] == 0 for k in ("get_task", "put_annotate"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
