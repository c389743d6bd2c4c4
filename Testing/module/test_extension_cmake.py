"""Configure the extension with real CMake against a stand-in Slicer that records what the
Slicer macros receive, then compare that with the files on disk.

The stand-ins make the checks Slicer's macros make (every listed file exists, no unknown
keywords) and write down their arguments; the globbing is CMake's own.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SLICER_CONFIG = """
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)
"""

USE_SLICER = r"""
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.6/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})

function(record_call name)
  file(APPEND ${CMAKE_BINARY_DIR}/calls.txt "CALL ${name}\n")
  foreach(line IN LISTS ARGN)
    file(APPEND ${CMAKE_BINARY_DIR}/calls.txt "${line}\n")
  endforeach()
endfunction()

function(require_files kind base)
  foreach(file IN LISTS ARGN)
    if(NOT EXISTS ${base}/${file})
      message(FATAL_ERROR "${kind} given nonexistent file '${file}' (relative to ${base})")
    endif()
  endforeach()
endfunction()

macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): ${MY_UNPARSED_ARGUMENTS}")
  endif()
  require_files(slicerMacroBuildScriptedModule ${CMAKE_CURRENT_SOURCE_DIR} ${MY_SCRIPTS} ${MY_RESOURCES})
  set(_lines "NAME ${MY_NAME}" "GENERIC_TESTS ${MY_WITH_GENERIC_TESTS}")
  foreach(f IN LISTS MY_SCRIPTS)
    list(APPEND _lines "SCRIPT ${f}")
  endforeach()
  foreach(f IN LISTS MY_RESOURCES)
    list(APPEND _lines "RESOURCE ${f}")
  endforeach()
  record_call(slicerMacroBuildScriptedModule ${_lines})
endmacro()

macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to ctkMacroCompilePythonScript(): ${MY_UNPARSED_ARGUMENTS}")
  endif()
  require_files(ctkMacroCompilePythonScript ${MY_SOURCE_DIR} ${MY_SCRIPTS} ${MY_RESOURCES})
  set(_lines "TARGET ${MY_TARGET_NAME}" "DESTINATION ${MY_DESTINATION_DIR}")
  foreach(f IN LISTS MY_SCRIPTS)
    list(APPEND _lines "SCRIPT ${f}")
  endforeach()
  foreach(f IN LISTS MY_RESOURCES)
    list(APPEND _lines "RESOURCE ${f}")
  endforeach()
  record_call(ctkMacroCompilePythonScript ${_lines})
endmacro()

macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "TESTNAME_PREFIX;SCRIPT" "SLICER_ARGS" ${ARGN})
  if(NOT EXISTS ${MY_SCRIPT})
    message(FATAL_ERROR "slicer_add_python_unittest given nonexistent script '${MY_SCRIPT}'")
  endif()
  record_call(slicer_add_python_unittest "SCRIPT ${MY_SCRIPT}")
endmacro()
"""


def configure(tmp_path: Path) -> dict[str, list[list[str]]]:
    """Run CMake on the extension; return {macro: [the lines of each call]}."""
    cmake = shutil.which("cmake")
    assert cmake, "these tests need the cmake program on PATH (apt-get install cmake)"
    slicer_dir = tmp_path / "Slicer"
    slicer_dir.mkdir()
    (slicer_dir / "SlicerConfig.cmake").write_text(SLICER_CONFIG)
    (slicer_dir / "UseSlicer.cmake").write_text(USE_SLICER)
    (slicer_dir / "Nothing.cmake").write_text("")
    build = tmp_path / "build"
    completed = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={slicer_dir}", "-DBUILD_TESTING=ON"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    calls: dict[str, list[list[str]]] = {}
    for line in (build / "calls.txt").read_text().splitlines():
        if line.startswith("CALL "):
            calls.setdefault(line[5:], []).append([])
        else:
            calls[list(calls)[-1]][-1].append(line)
    return calls


def items(lines: list[str], key: str) -> list[str]:
    return [line[len(key) + 1 :] for line in lines if line.startswith(key + " ")]


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    return configure(tmp_path_factory.mktemp("cmake"))


def test_the_module_is_built_with_every_script_and_resource(calls):
    (module,) = calls["slicerMacroBuildScriptedModule"]
    assert "NAME RepUXSegment" in module and "GENERIC_TESTS TRUE" in module
    module_dir = ROOT / "RepUXSegment"
    scripts = {p.relative_to(module_dir).as_posix() for p in module_dir.rglob("*.py") if "__pycache__" not in p.parts}
    assert sorted(items(module, "SCRIPT")) == sorted(scripts)
    resources = {p.relative_to(module_dir).as_posix() for p in (module_dir / "Resources").rglob("*") if p.is_file()}
    assert sorted(items(module, "RESOURCE")) == sorted(resources)


def test_the_repux_package_is_copied_next_to_the_module(calls):
    (package,) = calls["ctkMacroCompilePythonScript"]
    assert items(package, "DESTINATION")[0].endswith("lib/Slicer-5.6/qt-scripted-modules")
    training = ROOT / "Training"
    files = [p for p in (training / "repux").rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    sources = sorted(p.relative_to(training).as_posix() for p in files if p.suffix == ".py")
    data = sorted(p.relative_to(training).as_posix() for p in files if p.suffix != ".py")
    assert sources and sorted(items(package, "SCRIPT")) == sources
    assert sorted(items(package, "RESOURCE")) == data


def test_the_self_test_is_registered(calls):
    (test,) = calls["slicer_add_python_unittest"]
    assert items(test, "SCRIPT") == [str(ROOT / "RepUXSegment" / "RepUXSegment.py")]
