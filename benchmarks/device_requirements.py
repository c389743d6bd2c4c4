"""Print the pinned requirements that ``benchmarks/device_check.sh --fetch`` downloads for the GPU machine.

What repux needs at run time, and pytest, with every dependency of theirs, at the versions
installed here; less torch and what comes with a CUDA torch (the GPU machine has those).
Not the test extra's Slicer wheels or the CPU runtimes: the device check needs neither,
and the device tool carries at most 64 MiB.
"""

from __future__ import annotations

import re
from importlib import metadata

#: Provided by the GPU machine's CUDA torch.
SKIPPED = re.compile(r"^(torch|triton|nvidia-.*)$")
ROOTS = ("repux", "pytest")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements() -> dict[str, str]:
    """Name -> installed version of every package ``ROOTS`` need (extras left out)."""
    wanted: dict[str, str] = {}
    queue = list(ROOTS)
    while queue:
        name = _normal(queue.pop())
        if name in wanted or SKIPPED.match(name):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific dependency not installed here
        wanted[name] = dist.version
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                queue.append(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    wanted.pop("repux", None)
    return wanted


if __name__ == "__main__":
    print("\n".join(f"{name}=={version}" for name, version in sorted(pinned_requirements().items())))
