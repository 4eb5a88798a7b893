"""`preview`: what a job would write on a sample of its tasks, drawn on their images, as one
self-contained HTML page, with nothing written to the platform.

    from totask_ray import preview
    page = preview(job, sample=20)  # Jupyter shows `page` inline; page.save("preview.html")

This package is itself the callable: `preview(...)` is `build.preview(...)` (its signature and
docstring). The import system makes `totask_ray.preview` this package as soon as anything imports
it, so `from totask_ray import preview` can only always give one object if that object is the
package; `from totask_ray.preview import preview` gives the same one.
"""

import inspect
import sys
import types
from typing import Any

from totask_ray.preview import build
from totask_ray.preview.page import MAX_PAGE_BYTES, PreviewPage
from totask_ray.preview.sample import SampleError

__all__ = ["MAX_PAGE_BYTES", "PreviewPage", "SampleError", "preview"]


class _CallablePackage(types.ModuleType):
    """This package, callable as `build.preview`."""

    def __call__(self, *args: Any, **kwargs: Any) -> PreviewPage:
        return build.preview(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
preview = sys.modules[__name__]
__signature__ = inspect.signature(build.preview)  # what inspect and Jupyter's `preview?` show
