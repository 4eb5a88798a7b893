"""The Ray and Python versions an image must carry, read from the installed package's metadata.

pyproject.toml pins Ray (``ray[serve,data]~=X.Y.Z``) and the lowest Python (``requires-python``);
a driver must match its cluster's Ray, so the image, ``rayVersion`` and the pin are one number,
read here rather than written a second time.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import metadata

DIST = "totask-ray"
# `ray[data,serve]~=2.60.0` (extras in any order, no environment marker)
_RAY_PIN = re.compile(r"^ray(?:\[[^\]]*\])?\s*(?:~=|==)\s*(\d+\.\d+\.\d+)\s*$")


class PinError(RuntimeError):
    """The installed package's metadata does not pin what an image needs."""


@cache
def ray_version() -> str:
    """The Ray release the package pins (``~=2.60.0`` or ``==2.60.0`` -> ``2.60.0``)."""
    for raw in metadata.requires(DIST) or ():
        match = _RAY_PIN.match(raw)
        if match is not None:
            return match.group(1)
    raise PinError(f"{DIST} does not pin ray to one release (~=X.Y.Z); reinstall the package")


@cache
def python_version() -> str:
    """The lowest Python the package supports (``>=3.11`` -> ``3.11``): the image's Python."""
    requires = metadata.metadata(DIST).get("Requires-Python") or ""
    match = re.search(r">=\s*(\d+)\.(\d+)", requires)
    if match is None:
        raise PinError(f"{DIST} declares no lowest Python (requires-python >=X.Y); reinstall the package")
    return f"{match.group(1)}.{match.group(2)}"


def ray_image(variant: str = "") -> str:
    """``rayproject/ray:<ray>-py<python>`` (``variant`` ``-gpu`` for the CUDA image)."""
    return f"rayproject/ray:{ray_version()}-py{python_version().replace('.', '')}{variant}"
