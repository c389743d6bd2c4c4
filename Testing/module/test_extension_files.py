"""Static checks of the Slicer extension: the .ui, the CMake lists, the icon, requirements, code names.

These run without Slicer: they read the files the Slicer build and the module read.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import tomllib
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "RepUXSegment"
MODULE_SCRIPT = MODULE / "RepUXSegment.py"
UI_FILE = MODULE / "Resources" / "UI" / "RepUXSegment.ui"
PACKAGE_ROOT = ROOT / "Training"


def cmake_text(path: Path) -> str:
    """CMake code without its comment lines."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def cmake_list(text: str, variable: str) -> list[str]:
    """The items of ``set(VARIABLE item ...)`` with ${MODULE_NAME} expanded."""
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    module_name = re.search(r"set\(\s*MODULE_NAME\s+(\S+)\s*\)", text).group(1)
    return [item.replace("${MODULE_NAME}", module_name) for item in match.group(1).split()]


def ui_widgets() -> dict[str, ElementTree.Element]:
    tree = ElementTree.parse(UI_FILE)
    return {widget.get("name"): widget for widget in tree.iter("widget")}


def module_tree() -> ast.Module:
    return ast.parse(MODULE_SCRIPT.read_text(), filename=str(MODULE_SCRIPT))


def class_node(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)


# -- the .ui and the widget code ---------------------------------------------------------


def test_the_ui_file_parses_and_names_its_top_widget_after_the_module():
    root = ElementTree.parse(UI_FILE).getroot()
    assert root.tag == "ui"
    assert root.find("widget").get("name") == "RepUXSegment"
    assert root.find("widget").get("class") == "qMRMLWidget"


def test_every_widget_the_code_uses_exists_in_the_ui():
    used = {
        node.attr
        for node in ast.walk(module_tree())
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    assert len(used) > 15
    missing = sorted(used - set(ui_widgets()))
    assert not missing, f"the widget code uses {missing}, which {UI_FILE.name} does not define"


def test_every_custom_widget_class_is_declared_and_node_selectors_get_the_scene():
    root = ElementTree.parse(UI_FILE).getroot()
    declared = {custom.findtext("class") for custom in root.iter("customwidget")}
    qt_classes = {"QWidget", "QLabel", "QComboBox", "QPushButton", "QCheckBox", "QSpinBox", "QDoubleSpinBox", "QProgressBar", "QPlainTextEdit", "QLineEdit", "QTableWidget"}
    used = {widget.get("class") for widget in ui_widgets().values()}
    assert used - qt_classes <= declared
    selectors = {name for name, widget in ui_widgets().items() if widget.get("class") == "qMRMLNodeComboBox"}
    connected = {
        connection.findtext("receiver")
        for connection in root.iter("connection")
        if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    assert selectors and selectors <= connected


def test_parameter_names_in_the_ui_are_fields_of_the_parameter_node():
    parameter_class = class_node(module_tree(), "RepUXSegmentParameterNode")
    fields = {node.target.id for node in parameter_class.body if isinstance(node, ast.AnnAssign)}
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.findtext("string")
    assert set(bound.values()) == {"inputVolume", "outputSegmentation", "fast", "iterations"}
    assert set(bound.values()) <= fields


def test_the_module_has_the_scripted_module_classes():
    tree = module_tree()
    bases = {
        node.name: [base.id if isinstance(base, ast.Name) else ast.unparse(base) for base in node.bases]
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }
    assert bases["RepUXSegment"] == ["ScriptedLoadableModule"]
    assert bases["RepUXSegmentWidget"][0] == "ScriptedLoadableModuleWidget"
    assert bases["RepUXSegmentLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["RepUXSegmentTest"] == ["ScriptedLoadableModuleTest"]
    decorators = [ast.unparse(d) for d in class_node(tree, "RepUXSegmentParameterNode").decorator_list]
    assert decorators == ["parameterNodeWrapper"]


def test_the_widget_calls_only_logic_methods_that_exist():
    import RepUXSegmentLib.logic as lib

    tree = module_tree()
    logic_class = class_node(tree, "RepUXSegmentLogic")
    logic_methods = {node.name for node in logic_class.body if isinstance(node, ast.FunctionDef)}
    called = {
        node.attr
        for node in ast.walk(class_node(tree, "RepUXSegmentWidget"))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "logic"
    }
    assert called and called <= logic_methods, sorted(called - logic_methods)
    # RepUXSegmentLogic delegates to RepUXLogic: self.repux().METHOD(...)
    delegated = {
        node.attr
        for node in ast.walk(logic_class)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute)
        and node.value.func.attr == "repux"
    }
    instance = lib.RepUXLogic(scene=None)
    assert delegated and all(hasattr(instance, name) for name in delegated), delegated


def test_the_module_file_runs_on_slicers_python_39():
    """Slicer 5.6 and 5.8 embed Python 3.9: the module file must load there to say that it
    needs Slicer 5.10, so no newer syntax, and no ``X | Y`` annotations (it cannot use
    postponed annotations: parameterNodeWrapper reads them)."""
    for path in [MODULE_SCRIPT, *sorted((MODULE / "RepUXSegmentLib").glob("*.py"))]:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
    tree = module_tree()
    annotations = [node.annotation for node in ast.walk(tree) if isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation]
    annotations += [node.returns for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.returns]
    unions = [ast.unparse(a) for a in annotations if any(isinstance(n, ast.BinOp) for n in ast.walk(a))]
    assert not unions, unions
    for path in sorted((MODULE / "RepUXSegmentLib").glob("*.py")):
        if path.name != "__init__.py":
            assert "from __future__ import annotations" in path.read_text(), path


# -- CMake ---------------------------------------------------------------------------------


def test_the_module_cmake_lists_every_script_and_resource_and_nothing_else():
    text = cmake_text(MODULE / "CMakeLists.txt")
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    for item in scripts + resources:
        assert (MODULE / item).is_file(), f"CMakeLists.txt lists {item}, which does not exist"
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert set(scripts) == on_disk
    resource_files = {p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert set(resources) == resource_files
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS", text, re.S)


def test_the_cmake_globs_ship_the_whole_repux_package():
    """Every file of Training/repux that the wheel ships is matched by the module's globs."""
    text = cmake_text(MODULE / "CMakeLists.txt")
    globs = re.findall(r"\$\{REPUX_SOURCE_ROOT\}/(repux/\S+)", text)
    script_globs = [g for g in globs if g.endswith("*.py")]
    resource_globs = [g for g in globs if not g.endswith("*.py")]
    assert script_globs == ["repux/*.py"]

    # GLOB_RECURSE "repux/models/*.json": any .json at any depth under repux/models.
    def matched(relative: str, patterns: list[str]) -> bool:
        for pattern in patterns:
            folder, name = pattern.rsplit("/", 1)
            if relative.startswith(folder + "/") and fnmatch.fnmatch(relative.rsplit("/", 1)[1], name):
                return True
        return False

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]["repux"]
    assert sorted(resource_globs) == sorted(f"repux/{p.split('/')[0]}/{p.split('/')[-1]}" for p in package_data)
    files = [
        p.relative_to(PACKAGE_ROOT).as_posix()
        for p in (PACKAGE_ROOT / "repux").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    ]
    assert any(f.endswith(".py") for f in files)
    missed = [f for f in files if not matched(f, script_globs + resource_globs)]
    assert not missed, f"files the extension would not ship: {missed}"


def test_the_extension_cmake_has_its_metadata_and_subdirectories():
    text = cmake_text(ROOT / "CMakeLists.txt")
    for variable in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
    ):
        assert re.search(rf'set\({variable} "[^"]+"\)', text), variable
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    assert "add_subdirectory(RepUXSegment)" in text
    assert "add_subdirectory(Testing/Python)" in text
    icon = re.search(r'set\(EXTENSION_ICONURL "[^"]*/main/([^"]+)"\)', text).group(1)
    assert (ROOT / icon).is_file(), f"the icon URL points at {icon}, which is not in the repository"


def test_the_self_test_is_registered():
    text = cmake_text(ROOT / "Testing" / "Python" / "CMakeLists.txt")
    script = re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{PROJECT_SOURCE_DIR\}/(\S+)\s*\)", text).group(1)
    assert (ROOT / script) == MODULE_SCRIPT
    test_class = class_node(module_tree(), "RepUXSegmentTest")
    assert "runTest" in {node.name for node in test_class.body if isinstance(node, ast.FunctionDef)}


# -- resources -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [MODULE / "Resources" / "Icons" / "RepUXSegment.png", ROOT / "Resources" / "RepUXSegment.png"])
def test_icons_are_128_pixel_pngs(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (128, 128)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 20  # a picture, not a flat tile


def test_requirements_match_the_package_dependencies():
    """Slicer installs requirements.txt; torch comes from the PyTorch extension and numpy,
    SimpleITK ship with Slicer. Everything else must carry pyproject's version range."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    expected = {re.split(r"[<>=!~ ]", dep, 1)[0].lower(): dep for dep in pyproject["project"]["dependencies"]}
    for provided_elsewhere in ("torch", "numpy", "simpleitk"):
        expected.pop(provided_elsewhere)
    lines = (MODULE / "Resources" / "requirements.txt").read_text().splitlines()
    listed = {re.split(r"[<>=!~ ]", line, 1)[0].lower(): line for line in lines if line and not line.startswith("#")}
    assert listed == expected


# -- the Extensions Index ----------------------------------------------------------------------

#: Categories the Extensions Index accepts (scripts/check_description_files.py of
#: Slicer/ExtensionsIndex), the ones that could fit this extension.
INDEX_CATEGORIES = {"Segmentation", "Analysis", "Quantification", "Informatics", "Remote"}
#: Prefixes the index accepts for the name of the source repository.
INDEX_REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
INDEX_SIZE_LIMIT_MB = 100


def cmake_value(text: str, variable: str) -> str:
    return re.search(rf'set\(\s*{variable}\s+"([^"]+)"\s*\)', text).group(1)


def test_the_extension_description_meets_the_extensions_index_rules():
    text = cmake_text(ROOT / "CMakeLists.txt")
    extension = re.search(r"project\(\s*([^\s)]+)", text).group(1)
    assert extension == "RepUXSegment" == MODULE.name
    assert not extension.lower().startswith("slicer"), "the extension's name must not start with Slicer"
    assert cmake_value(text, "EXTENSION_CATEGORY") in INDEX_CATEGORIES
    assert len(cmake_value(text, "EXTENSION_DESCRIPTION")) > 50

    homepage = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+)", cmake_value(text, "EXTENSION_HOMEPAGE"))
    assert homepage, "the homepage is the extension's GitHub repository"
    owner, repository = homepage.groups()
    assert repository.startswith(INDEX_REPOSITORY_PREFIXES), f"repository {repository!r} must start with Slicer"

    urls = [cmake_value(text, "EXTENSION_ICONURL"), *cmake_value(text, "EXTENSION_SCREENSHOTURLS").split()]
    assert len(urls) >= 2
    prefix = f"https://raw.githubusercontent.com/{owner}/{repository}/main/"
    for url in urls:
        assert url.startswith(prefix), f"{url}: expected a file of {owner}/{repository} on main"
        path = ROOT / url[len(prefix):]
        assert path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif") and path.is_file(), f"{url}: no such image here"
        with Image.open(path) as image:
            assert image.format in ("PNG", "JPEG", "GIF")
            if url != urls[0]:  # screenshots: real pictures, not icons
                assert min(image.size) >= 400


def test_the_license_is_the_one_the_package_declares_and_the_repository_is_small():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    import subprocess

    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    size = sum((ROOT / name).stat().st_size for name in files if name and (ROOT / name).is_file())
    assert size < INDEX_SIZE_LIMIT_MB * 1024 * 1024, f"the repository holds {size / 2**20:.0f} MB"


def test_the_screenshots_come_from_a_script_that_remakes_them():
    script = ROOT / "Resources" / "Screenshots" / "make_screenshots.py"
    source = script.read_text()
    assert '"segment"' in source and "vtkRenderWindow" in source
    made = set(re.findall(r'"(RepUXSegment-\d\.png)"', source))
    shown = {url.rsplit("/", 1)[1] for url in cmake_value(cmake_text(ROOT / "CMakeLists.txt"), "EXTENSION_SCREENSHOTURLS").split()}
    assert shown == made
