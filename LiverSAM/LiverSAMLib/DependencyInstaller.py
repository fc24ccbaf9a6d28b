"""Python dependencies of LiverSAM inside Slicer: declared in ``Resources/requirements.txt``, installed on
first use with the user's consent, never at import or in a constructor.

PyTorch comes from the PyTorch extension (``PyTorchUtils``), which picks the build matching the computer's
GPU / CUDA driver, before anything else is installed, so that pip never pulls a CPU-only torch in as a
dependency of another package. The other requirements go through ``slicer.packaging.pip_ensure`` (Slicer
>= 5.10; it asks for confirmation and offers a restart when an already-imported package was updated),
or ``slicer.util.pip_install`` after a confirmation dialog on older Slicer versions.

Everything except :func:`ensure_dependencies` is standard-library only and tested with pytest.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# Requirements satisfied by the PyTorch extension, not by pip.
TORCH_PACKAGES = ("torch", "torchvision")

_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file (comments, blank lines and pip options removed)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement line (``scikit-image>=0.22`` -> ``scikit-image``)."""
    match = _NAME_RE.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def is_satisfied(requirement: str) -> bool:
    """True when the requirement's distribution is installed in a version the specifier allows."""
    name = requirement_name(requirement)
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no 'packaging': presence is all we can check
        return True
    return Requirement(requirement).specifier.contains(installed, prereleases=True)


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements that are not installed (or installed in a version outside the specifier)."""
    return [r for r in requirements if not is_satisfied(r)]


def torch_missing() -> bool:
    try:
        importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return True
    return False


def ensure_dependencies(requirements_path: str | Path, requester: str = "LiverSAM") -> bool:
    """Install what LiverSAM needs, asking the user first. Main thread only (pip dialogs; macOS).

    Returns True when everything is importable afterwards, False when the user declined or an install
    failed (the caller then shows why and stops). Never called at import.
    """
    import slicer

    if torch_missing():
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(
                "LiverSAM needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, "
                "restart Slicer, and try again."
            )
            return False
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if torch_logic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.1") is None:
            return False

    requirements = [
        r for r in read_requirements(requirements_path) if requirement_name(r) not in TORCH_PACKAGES
    ]
    missing = missing_requirements(requirements)
    if not missing:
        return True
    packaging_module = getattr(slicer, "packaging", None)
    if packaging_module is None:
        try:
            import slicer.packaging as packaging_module
        except ImportError:
            packaging_module = None
    if packaging_module is not None and hasattr(packaging_module, "pip_ensure"):
        packaging_module.pip_ensure(missing, requester=requester)
    else:
        if not slicer.util.confirmOkCancelDisplay(
            f"{requester} needs these Python packages, which will be downloaded and installed now:\n\n"
            + "\n".join(missing),
            "Install Python packages",
        ):
            return False
        slicer.util.pip_install(missing)
    still_missing = missing_requirements(requirements)
    if still_missing:
        logger.error("LiverSAM: packages still missing after installation: %s", ", ".join(still_missing))
    return not still_missing
