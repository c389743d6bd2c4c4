"""Which of the Python packages the ``repux`` jobs need are missing, without importing them.

Inside Slicer the module installs what is missing on first use (after the user agrees);
checking reads package metadata only, so torch is never imported by the check.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

#: torch versions the repux package supports (pyproject.toml); installed by the PyTorch extension.
#: 2.5 is the first with ``torch.OutOfMemoryError``, which inference catches on every device.
TORCH_REQUIREMENT = "torch>=2.5,<3"


def read_requirements(path: str | os.PathLike) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def requirement_satisfied(requirement: str) -> bool:
    """True when the distribution ``requirement`` names is installed in a version it allows."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no version parser (unusual): presence is all that can be checked
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False
    parsed = Requirement(requirement)
    try:
        version = importlib.metadata.version(parsed.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    # Local builds such as 2.13.0+cpu count as 2.13.0.
    return parsed.specifier.contains(version.split("+", 1)[0], prereleases=True)


def missing_requirements(requirements: Iterable[str]) -> list[str]:
    """The requirements that are not satisfied, in the given order."""
    return [requirement for requirement in requirements if not requirement_satisfied(requirement)]


def install_failure_message(missing: Iterable[str], error: str, requirements_file: str | os.PathLike) -> str:
    """What the user reads when installing the job's packages failed: what failed, and how to
    install them by hand on a computer without internet access (wheels brought on a stick)."""
    missing = list(missing)
    requirements_file = Path(requirements_file)
    pip_packages = [requirement for requirement in missing if not requirement.startswith("torch")]
    lines = [
        "These Python packages could not be installed:",
        *(f"    {requirement}" for requirement in missing),
        "",
        f"Reason: {error.strip() or 'unknown (see the log)'}",
        "",
        "If this computer has no internet access (or a proxy blocks it), install them by hand:",
    ]
    if pip_packages:
        lines += [
            "1. On a computer with internet access, of the same operating system, download the wheels for Python "
            f"{sys.version_info.major}.{sys.version_info.minor}:",
            f"    pip download -d repux-wheels --python-version {sys.version_info.major}.{sys.version_info.minor} "
            f"--only-binary=:all: " + " ".join(f'"{requirement}"' for requirement in pip_packages),
            "2. Copy the folder repux-wheels to this computer, then in Slicer's Python console:",
            f"    slicer.util.pip_install(['--no-index', '--find-links', '/path/to/repux-wheels', '-r', r'{requirements_file}'])",
        ]
    if len(pip_packages) < len(missing):
        lines += [
            "torch: install the PyTorch extension from the Extensions Manager and use its module "
            "(PyTorch Utils) to install torch, or install a torch wheel as above.",
        ]
    lines += ["", "Then restart Slicer."]
    return "\n".join(lines)
