"""Profiling with py-spy: collapsed stacks of running processes, summed by library and function."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.tables import table

# -- profiling (py-spy) ---------------------------------------------------------------------------

PROFILE_GROUPS = (
    ("httpx (request/response models, URL parsing, cookies)", ("httpx/",)),
    ("aiohttp / yarl / multidict (incl. socket writes)", ("aiohttp/", "yarl/", "multidict/")),
    ("asyncio / uvloop / selectors", ("asyncio/", "uvloop/", "selectors.py")),
    ("json", ("json/", "orjson")),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("Ray / Ray Data / pyarrow / numpy", ("ray/", "pyarrow/", "numpy/")),
    ("totask_ray (own code)", ("totask_ray/",)),
    (
        "urllib / http.cookiejar / ipaddress / socket",
        ("urllib/", "http/", "ipaddress.py", "socket.py", "ssl.py"),
    ),
    ("threading / concurrent.futures / contextlib", ("threading.py", "concurrent/", "contextlib.py")),
)


def _frame_path(frame: str) -> str:
    """`func (pkg/module.py:123)` -> `pkg/module.py`."""
    if "(" not in frame:
        return ""
    return frame.rsplit("(", 1)[1].rsplit(":", 1)[0].rstrip(")")


def py_spy() -> str | None:
    import shutil

    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


def profile_pids(pids: list[int], seconds: float, out_dir: Path, rate: int = 100) -> list[Path]:
    """py-spy `record --format raw` (collapsed stacks, non-idle samples only) of each pid at once."""
    exe = py_spy()
    if exe is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for pid in pids:
        f = out_dir / f"pyspy-{pid}.txt"
        procs.append(subprocess.Popen([exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "-f", "raw",
                                       "-o", str(f), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        files.append(f)
    for p in procs:
        p.wait()
    return [f for f in files if f.exists()]


def profile_summary(files: list[Path], seconds: float, rate: int = 100, top: int = 22) -> str:
    """Where the sampled processes spent their CPU: busy share, time by library (leaf frame's
    module), and the heaviest functions inclusive of what they call."""
    import collections
    import re

    by_group: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            if not line.strip() or " " not in line:
                continue
            stack, n_s = line.rsplit(" ", 1)
            try:
                n = int(n_s)
            except ValueError:
                continue
            total += n
            frames = stack.split(";")
            leaf = _frame_path(frames[-1])
            for name, needles in PROFILE_GROUPS:
                if leaf.startswith(needles):
                    by_group[name] += n
                    break
            else:
                by_group["other"] += n
            seen = set()
            for fr in frames:
                key = re.sub(r":\d+\)$", ")", fr)
                if key not in seen:
                    seen.add(key)
                    incl[key] += n
    if total == 0:
        return "(no samples)"
    lines = [
        f"{len(files)} process(es), {total} non-idle thread samples at {rate} Hz over {seconds:g} s "
        "(py-spy counts each thread that is not waiting)"
    ]
    lines.append(
        table(
            ["CPU by library (leaf frame)", "share"],
            [[k, f"{100 * v / total:.1f}%"] for k, v in by_group.most_common()],
        )
    )
    skip = ("Thread.", "_bootstrap", "<module>", "run_loop", "main_loop")
    rows = [
        [k[:110], f"{100 * v / total:.1f}%"]
        for k, v in incl.most_common(top * 3)
        if not any(s in k for s in skip)
    ][:top]
    lines.append(table(["heaviest functions (inclusive)", "share"], rows))
    return "\n".join(lines)
