"""`preview`: what a job would write on a sample of its tasks, drawn on their images, as one
self-contained HTML page, with nothing written to the platform (`build.preview`)."""

from totask_ray.preview.build import preview
from totask_ray.preview.page import MAX_PAGE_BYTES, PreviewPage
from totask_ray.preview.sample import SampleError

__all__ = ["MAX_PAGE_BYTES", "PreviewPage", "SampleError", "preview"]
