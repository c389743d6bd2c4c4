"""Which of the Python packages the ``repux`` jobs need are missing, without importing them.

Inside Slicer the module installs what is missing on first use (after the user agrees);
checking reads package metadata only, so torch is never imported by the check.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Iterable
from pathlib import Path

#: torch versions the repux package supports (pyproject.toml); installed by the PyTorch extension.
TORCH_REQUIREMENT = "torch>=2.1,<3"


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
