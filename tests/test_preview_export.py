"""`preview` is public: `from totask_ray import preview` gives a callable with the function's
signature, the same object however it is reached, and importing `totask_ray` does not import it."""

from __future__ import annotations

import inspect
import subprocess
import sys


def test_preview_is_importable_from_the_package_and_callable():
    import totask_ray
    from totask_ray import preview
    from totask_ray.preview import build
    from totask_ray.preview import preview as from_subpackage

    assert callable(preview) and preview is from_subpackage is totask_ray.preview
    assert inspect.signature(preview) == inspect.signature(build.preview)
    assert "preview" in totask_ray.__all__
    # the subpackage's own names stay reachable through it
    assert preview.MAX_PAGE_BYTES > 0 and preview.PreviewPage is build.PreviewPage


def test_importing_the_package_does_not_import_the_preview():
    code = "import sys, totask_ray; print('totask_ray.preview' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
