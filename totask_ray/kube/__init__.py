"""totask-ray on Kubernetes with KubeRay: manifests generated from a job file.

``totask-ray kube render`` writes a kustomize tree (a warm RayCluster, a RayJob for the run, a
RayService for the job's pre-processor, a CPU-only and a GPU overlay) and a Dockerfile. The Serve
config inside the RayService comes from :mod:`totask_ray.serving.application`, the code that
``totask-ray serve deploy`` deploys with, and the platform's credentials come from a Secret through
``envFrom``, never from the job's runtime env.

- ``pins.py``: the Ray and Python versions the package pins (the image and ``rayVersion``);
- ``options.py``: what a render may choose (image, pools, deadlines, where reports live);
- ``inputs.py``: the job file and its release configs, read and checked before anything is written;
- ``manifests.py``: the Kubernetes objects, as plain mappings;
- ``render.py``: the tree on disk; ``cli.py``: the ``kube`` sub-command;
- ``schemas/``: JSON schemas of the KubeRay v1 and core v1 fields the manifests use (tests).
"""
