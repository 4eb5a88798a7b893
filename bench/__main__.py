"""The benchmark suite: `python -m bench file|inference|memory|startup|all [--tasks N] [--runs R] [--smoke]`.

- file       tasks/s of the file method: platform raw capacity, the public SDK, totask-ray
             (plain loopback and +20 ms platform latency)
- client-cpu the annotator's CPU per task against a bare aiohttp client (no Ray around either)
- inference  images/s with the faces app: raw model, the SDK's inference path, totask-ray
- memory     the driver's peak RSS over a file-method run at 10,000 and 200,000 tasks
- startup    `totask-ray run` to the first annotation on the platform, warm cluster, with a breakdown
- label-studio  predictions/s into a real Label Studio: totask-ray, LS's bulk import by hand, one by one
- accelerator  a GPU-shaped pre-processor (40 ms + 1 ms/image) on N = 1, 2, 4 logical GPUs
- scaleout   the file method on a simulated two-node cluster (2x2 CPUs) against one node (1x4), then
             an OCR run on a fake autoscaling cluster whose GPU pool starts at zero
- all        every bench above, on one local Ray started once
- ledger     (not in `all`) the run ledger's cost: file-method tasks/s with and without it, bytes
             per task, and the undo of one run
- estimate   (not in `all`) the preview's projected wall time against the run's, file and faces demos
             at two sizes each (issue 28), with where the run's CPU went
- scale      (not in `all`: minutes) listing 1M ids by offset pages and by id ranges, and a resume of
             1M tasks with half done against a fresh run: object store and driver memory

`--smoke` runs every bench quickly (few tasks, one run) so they cannot rot (tests/test_bench_smoke.py);
its numbers mean nothing. Results and the commands used: BENCHMARKS.md.
(`python -m bench.platform` and `python -m bench.serving` are separate, older benches.)
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import local_ray, meters, tables

BENCHES = ("file", "client-cpu", "inference", "memory", "startup", "label-studio", "accelerator", "scaleout")
ALONE = ("scale", "ledger", "onsuccess", "overload", "estimate")  # run only when named


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", choices=(*BENCHES, *ALONE, "all"))
    ap.add_argument(
        "--tasks", type=int, default=None, help="tasks (file, startup: 10000; inference: 160 images)"
    )
    ap.add_argument(
        "--runs", type=int, default=3, help="interleaved runs per contender (>= 3 for real figures)"
    )
    ap.add_argument("--smoke", action="store_true", help="few tasks, one run: checks the benches still work")
    ap.add_argument(
        "--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default: nproc)"
    )
    g = ap.add_argument_group("file")
    g.add_argument("--latency", default=None, help="platform latencies in ms, comma separated (default 0,20)")
    g.add_argument(
        "--only",
        default=None,
        help="run only contenders whose name starts with one of these, comma separated (e.g. raw,totask)",
    )
    g.add_argument(
        "--sdk-tasks", type=int, default=None, help="tasks per SDK run at batch_size > 1 (default 2000)"
    )
    g.add_argument(
        "--sdk-seq-tasks", type=int, default=None, help="tasks per SDK run at batch_size 1 (default 1000)"
    )
    g.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after the measured runs, one more totask-ray run with py-spy on its actors (stacks kept in DIR)",
    )
    g = ap.add_argument_group("accelerator")
    g.add_argument("--replicas", default=None, help="replica counts N, comma separated (default 1,2,4)")
    g.add_argument("--no-sdk", action="store_true", help="skip the SDK per-task contender (it takes minutes)")
    g = ap.add_argument_group("memory")
    g.add_argument(
        "--sizes",
        default=None,
        help="task counts, comma separated (memory: 10000,200000; scale: 100000,300000,1000000)",
    )
    g.add_argument(
        "--data-context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="diagnostic: set a Ray DataContext field in the measured driver (repeatable)",
    )
    g = ap.add_argument_group("scale")
    g.add_argument(
        "--resume-tasks", type=int, default=None, help="tasks of the resume run (default: the largest size)"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    which = BENCHES if args.bench == "all" else (args.bench,)
    t0 = time.perf_counter()
    ray_s = local_ray.start_ray(args.ray_cpus)
    info = meters.machine_info()
    tables.say(
        f"machine: {info['nproc']} cores ({info['cpu']}), {info['ram_gib']} GiB RAM, load average {info['loadavg']}, "
        f"Python {info['python']}, Ray {info['ray']}, {info['date']}; local Ray started in {ray_s:.1f} s"
        + (" -- SMOKE MODE: the numbers below mean nothing" if args.smoke else "")
    )
    code = 0
    for name in which:
        tables.say(f"\n## bench {name}")
        b0 = time.perf_counter()
        try:
            if name == "file":
                from bench import file_method as mod
            elif name == "client-cpu":
                from bench import client_cpu as mod  # type: ignore[no-redef]
            elif name == "inference":
                from bench import inference as mod  # type: ignore[no-redef]
            elif name == "memory":
                from bench import memory as mod  # type: ignore[no-redef]
            elif name == "accelerator":
                from bench import accelerator as mod  # type: ignore[no-redef]
            elif name == "label-studio":
                from bench import label_studio as mod  # type: ignore[no-redef]
            elif name == "scaleout":
                from bench import scaleout as mod  # type: ignore[no-redef]
            elif name == "scale":
                from bench import scale as mod  # type: ignore[no-redef]
            elif name == "ledger":
                from bench import ledger as mod  # type: ignore[no-redef]
            elif name == "overload":
                from bench import overload as mod  # type: ignore[no-redef]
            elif name == "onsuccess":
                from bench import onsuccess as mod  # type: ignore[no-redef]
            elif name == "estimate":
                from bench import estimate as mod  # type: ignore[no-redef]
            else:
                from bench import startup as mod  # type: ignore[no-redef]
            mod.main(args, ray_started=True)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            tables.say(f"bench {name} FAILED: {type(exc).__name__}: {exc}")
            code = 1
        tables.say(f"(bench {name} took {time.perf_counter() - b0:.0f} s)")
    tables.say(
        f"\ntotal {time.perf_counter() - t0:.0f} s; load average now {[round(x, 2) for x in __import__('os').getloadavg()]}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
