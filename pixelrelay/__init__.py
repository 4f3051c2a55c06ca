"""pixelrelay: a distributed batch processor for learned image restoration and upscaling.

The subpackages live in folders at the repository root, mapped into this namespace by
``pyproject.toml`` (docs/design.md, "Architecture"). The Python API's names
(``pixelrelay.api``: ``submit``, ``Job``, ``local_services``) are exported here
lazily, so ``import pixelrelay`` stays cheap.
"""

from __future__ import annotations

from pkgutil import extend_path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type checkers read the lazy exports below as pixelrelay.api's own
    from pixelrelay.api import Job as Job
    from pixelrelay.api import JobStatus as JobStatus
    from pixelrelay.api import JobStatusInfo as JobStatusInfo
    from pixelrelay.api import ManifestNotReady as ManifestNotReady
    from pixelrelay.api import ManifestRow as ManifestRow
    from pixelrelay.api import WaitTimeout as WaitTimeout
    from pixelrelay.api import submit as submit

# Run from a source checkout, the folder ``pixelrelay/`` holds only this package root; the
# mapped subpackages are found beside the installed copy (or through the editable finder).
__path__ = extend_path(__path__, __name__)

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("pixelrelay")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

# Names of ``pixelrelay.api`` exported from the package root, imported on first use.
_API = (
    "submit",
    "Job",
    "JobStatusInfo",
    "JobStatus",
    "ManifestRow",
    "ManifestNotReady",
    "WaitTimeout",
    "local_services",
)

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from pixelrelay import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
