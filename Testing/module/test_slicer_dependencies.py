"""What the module asks of the Python packages it installs: true minimum versions, and a
failure message that lets a user on an offline workstation finish the install by hand."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from RepUXSegmentLib.dependencies import TORCH_REQUIREMENT, install_failure_message, read_requirements

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "Training" / "repux"

#: Public torch names that older torch releases lack, with the first release that has them
#: (PyTorch release notes). A use of one of them needs a minimum version at least this high.
TORCH_NAMES_INTRODUCED = {
    "torch.OutOfMemoryError": "2.5",
    "torch.accelerator": "2.6",
    "torch.nn.attention.flex_attention": "2.5",
    "torch.amp.GradScaler": "2.3",
    "torch.compiler.is_compiling": "2.3",
    "torch.serialization.add_safe_globals": "2.4",
}


def dotted_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and parts:
            names.add(".".join([node.id, *reversed(parts)]))
    return names


def declared_torch_minimum() -> Version:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch = next(Requirement(dep) for dep in pyproject["project"]["dependencies"] if dep.startswith("torch"))
    return min(Version(spec.version) for spec in torch.specifier if spec.operator == ">=")


def test_the_torch_minimum_covers_every_version_gated_name_the_package_uses():
    used = set()
    for path in PACKAGE.rglob("*.py"):
        used |= dotted_names(ast.parse(path.read_text(), filename=str(path)))
    needed = {name: Version(version) for name, version in TORCH_NAMES_INTRODUCED.items() if any(u == name or u.startswith(name + ".") for u in used)}
    assert "torch.OutOfMemoryError" in needed  # the scan sees what inference catches
    too_new = {name: str(version) for name, version in needed.items() if version > declared_torch_minimum()}
    assert not too_new, f"pyproject allows torch {declared_torch_minimum()}, but the code uses {too_new}"


def test_the_module_asks_for_the_torch_the_package_declares():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = next(dep for dep in pyproject["project"]["dependencies"] if dep.startswith("torch"))
    assert Requirement(TORCH_REQUIREMENT).specifier == Requirement(declared).specifier


def test_the_failure_message_names_the_packages_the_reason_and_the_offline_way(tmp_path):
    requirements = ROOT / "RepUXSegment" / "Resources" / "requirements.txt"
    missing = [*read_requirements(requirements)[:2], TORCH_REQUIREMENT]
    text = install_failure_message(missing, "Could not fetch URL https://pypi.org/simple/monai/: connection refused", requirements)
    for requirement in missing:
        assert f"    {requirement}" in text
    assert "connection refused" in text
    assert "PyTorch extension" in text
    # The printed download command asks for exactly the pip-installed packages, quoted.
    command = next(line.strip() for line in text.splitlines() if line.strip().startswith("pip download"))
    assert command.startswith(f"pip download -d repux-wheels --python-version {sys.version_info.major}.{sys.version_info.minor} ")
    assert re.findall(r'"([^"]*)"', command) == missing[:2]
    assert str(requirements) in text
