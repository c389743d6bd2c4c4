"""Print the pinned requirements that ``benchmarks/device_check.sh --fetch`` downloads for the GPU machine.

What repux needs at run time, and pytest, with every dependency of theirs, at the versions
installed here; less torch and what comes with a CUDA torch (the GPU machine has those).
Not the test extra's Slicer wheels or the CPU runtimes: the device check needs neither,
and the device tool carries at most 64 MiB, the working tree (about 10 MB) included.

Nor, unless ``--bare``, what the lent GPU machine's image already holds
(:data:`ON_THE_DEVICE_IMAGE`): scipy alone is 35 MB. What is left (SimpleITK, MONAI, pynrrd,
slicerio, gdown and its two) was 55.5 MB of wheels on 2026-12-02, SimpleITK 52.8 MB of it.
"""

from __future__ import annotations

import re
from importlib import metadata

#: Provided by the GPU machine's CUDA torch.
SKIPPED = re.compile(r"^(torch|triton|nvidia-.*)$")
ROOTS = ("repux", "pytest")
#: On the 'nvidia-h200' machine's image (/work/.library/device/KINDS.md, read 2026-11-17), at
#: versions repux accepts: left out unless ``--bare``.
ON_THE_DEVICE_IMAGE = frozenset(
    "certifi charset-normalizer filelock idna iniconfig numpy packaging pillow pluggy psutil pygments "
    "pytest requests safetensors scipy tqdm typing-extensions urllib3".split()
)


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
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bare", action="store_true", help="also what the GPU machine's image holds (for a bare machine)")
    args = parser.parse_args()
    wanted = pinned_requirements()
    names = sorted(wanted if args.bare else set(wanted) - ON_THE_DEVICE_IMAGE)
    print("\n".join(f"{name}=={wanted[name]}" for name in names))
