"""The Slicer process never imports torch: the module's Lib and the parts of repux it uses
import, and a label map round trip works, with torch made unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from module_helpers import MODULE_DIR

LIB_MODULES = sorted(
    f"RepUXSegmentLib.{path.stem}" for path in (MODULE_DIR / "RepUXSegmentLib").glob("*.py") if path.stem != "__init__"
)

BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "monai" or name.startswith("monai."):
            raise ImportError(f"{name} imported in the GUI process")
sys.meta_path.insert(0, NoTorch())
sys.path.insert(0, %r)
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH % str(MODULE_DIR) + code], capture_output=True, text=True, timeout=120
    )


def test_every_lib_module_imports_without_torch():
    assert "RepUXSegmentLib.logic" in LIB_MODULES and "RepUXSegmentLib.runner" in LIB_MODULES
    result = run_without_torch("import importlib\n" + "".join(f"importlib.import_module({name!r})\n" for name in LIB_MODULES))
    assert result.returncode == 0, result.stderr


def test_the_blocker_does_stop_torch():
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "imported in the GUI process" in result.stderr


def test_catalog_import_and_export_of_a_label_map_need_no_torch(tmp_path, phantoms):
    label_path = phantoms["ras"][1]
    code = f"""
import slicer
from RepUXSegmentLib.catalog import ModelCatalog
from RepUXSegmentLib.logic import RepUXLogic
catalog = ModelCatalog(user_dir={str(tmp_path / 'models')!r})
assert "demo" in catalog.names(), catalog.names()
logic = RepUXLogic(slicer.vtkMRMLScene(), catalog)
segmentation = logic.import_labelmap({str(label_path)!r}, "demo")
logic.export_labelmap(segmentation, {str(tmp_path / 'out.nrrd')!r})
print(segmentation.GetSegmentation().GetNumberOfSegments())
"""
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "4"
    assert (tmp_path / "out.nrrd").is_file()


def test_the_published_models_are_listed_without_torch(tmp_path):
    result = run_without_torch(
        "from RepUXSegmentLib.catalog import ModelCatalog\n"
        f"catalog = ModelCatalog(user_dir={str(tmp_path)!r})\n"
        "for model in catalog.available(): print(f'{model.name}: {model.size_text}')\n"
    )
    assert result.returncode == 0, result.stderr
    # The downloadable ones of the shipped registry (uxnet-feta is listed for reference only).
    assert result.stdout.splitlines() == [f"{name}: size unknown" for name in ("repuxnet-amos", "uxnet-flare", "uxnet-amos")]
