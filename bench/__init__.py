"""Benchmarks: each prints its figures beside a baseline measured in the same run.

Conventions (see BENCHMARKS.md):
- contenders of one bench run in the SAME invocation, interleaved run by run (run 1 of every
  contender, then run 2 of every contender, ...), so a burst of load from another process on this
  shared machine hits every contender alike; tables show medians;
- every figure is printed with the machine's load average seen during the runs and, where it
  matters, the CPU share (CPU seconds per wall second, 1.00 = one core) of each process group;
- nothing here changes product code or settings: contenders run with their defaults unless a row
  says otherwise.

What the benches share, one module a job: `environment` (repository root, the environment scrubbed
before ray is imported, children's environment, a free loopback port), `tables` (medians, number
formatting, Markdown tables, target lines, printed output and the JSON line), `meters` (machine
info, load average, CPU shares of process groups), `local_platform` (the embedded platform, its
seeding and write history), `local_ray` (local Ray, Serve on loopback), `public_sdk` (the SDK
venv and its ToTaskAction as a child process), `profiling` (py-spy stacks and their summary).
"""
