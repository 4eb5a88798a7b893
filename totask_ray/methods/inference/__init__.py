"""The inference method: a task's data is what a pre-processor on Ray Serve sees in its primary image.

`method` prepares the run (resolves and checks the release, brings the pre-processor up) and undoes
it; `release` reads what a plugin release deploys; `annotator` is the Data actor, which calls the
app through the caller (`callers`) of the release's calling convention; `items` is what a task
carries to the model; `auth` makes the model id a Synapse-style app expects.
"""

from totask_ray.methods.inference.annotator import InferenceAnnotator
from totask_ray.methods.inference.method import InferenceMethod
from totask_ray.methods.inference.release import synapse_route

__all__ = ["InferenceAnnotator", "InferenceMethod", "synapse_route"]
