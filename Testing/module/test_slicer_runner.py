"""The background runner: which Python runs repux, real child processes, errors, clean-up."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from RepUXSegmentLib import runner
from RepUXSegmentLib.runner import FAILED, PYTHON_ENV_VAR, SUCCEEDED, JobError, RepuxJob, python_executable


def make_executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_python_interpreter_runs_repux_itself(monkeypatch):
    monkeypatch.delenv(PYTHON_ENV_VAR, raising=False)
    assert python_executable() == sys.executable
    assert runner.repux_command(["segment", "x"])[:3] == [sys.executable, "-m", "repux"]


def test_inside_slicer_pythonslicer_next_to_the_application_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv(PYTHON_ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    app = make_executable(tmp_path / "Slicer-5.6" / "bin" / "SlicerApp-real")
    python_slicer = make_executable(tmp_path / "Slicer-5.6" / "bin" / "PythonSlicer")
    assert python_executable(app) == str(python_slicer)
    launcher = make_executable(tmp_path / "Slicer-5.6" / "Slicer")  # the launcher one level up
    assert python_executable(launcher) == str(python_slicer)


def test_pythonslicer_on_the_path_wins_and_the_variable_overrides_all(tmp_path, monkeypatch):
    monkeypatch.delenv(PYTHON_ENV_VAR, raising=False)
    on_path = make_executable(tmp_path / "path" / "PythonSlicer")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert python_executable(tmp_path / "elsewhere" / "SlicerApp-real") == str(on_path)
    monkeypatch.setenv(PYTHON_ENV_VAR, "/opt/python/bin/python3")
    assert python_executable(tmp_path / "elsewhere" / "SlicerApp-real") == "/opt/python/bin/python3"


def test_no_interpreter_found_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(PYTHON_ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=f"SlicerApp-real: not a Python interpreter.*{PYTHON_ENV_VAR}"):
        python_executable(tmp_path / "SlicerApp-real")


def test_a_job_runs_the_repux_of_this_process(tmp_path, monkeypatch):
    # The child finds repux through PYTHONPATH even when started from another folder.
    monkeypatch.chdir(tmp_path)
    cleaned = []
    job = RepuxJob(["--version"], finish=lambda: "finished", cleanup=lambda: cleaned.append(True))
    assert job.wait(timeout=120) == "finished"
    assert job.state == SUCCEEDED and job.returncode == 0
    import repux

    assert any(line.strip() == f"repux {repux.__version__}" for line in job.log)
    assert cleaned == [True]
    assert not job.poll()


def test_a_failing_job_reports_the_programs_own_message(tmp_path):
    cleaned = []
    job = RepuxJob(
        ["segment", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "out.nii.gz"), "--progress", "jsonl"],
        finish=lambda: pytest.fail("finish must not run after a failure"),
        cleanup=lambda: cleaned.append(True),
    )
    with pytest.raises(JobError, match="missing.nii.gz: no such file"):
        job.wait(timeout=120)
    assert job.state == FAILED and job.returncode == 2
    assert cleaned == [True]
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_failing_finish_step_fails_the_job(tmp_path):
    def broken_finish():
        raise ValueError("result.nrrd: holds label values [9]")

    job = RepuxJob(["--version"], finish=broken_finish, description="repux test")
    with pytest.raises(JobError, match=r"repux test: result.nrrd: holds label values \[9\]"):
        job.wait(timeout=120)


def test_a_program_that_cannot_start_is_an_error_and_cleans_up(tmp_path):
    cleaned = []
    with pytest.raises(JobError, match="cannot start"):
        RepuxJob(["--version"], python=str(tmp_path / "no-python"), cleanup=lambda: cleaned.append(True))
    assert cleaned == [True]


def test_progress_lines_reach_the_callback_in_order(tmp_path):
    """A real JSON-lines job (here the package's own Progress in a child Python)."""
    script = make_executable(
        tmp_path / "fake-python",
        "#!/bin/sh\n"
        f"exec {sys.executable} -c \"from repux.progress import Progress; p = Progress('jsonl'); "
        "p.stage('infer', 3); [p.update(i) for i in (1, 2, 3)]; p.finish('done')\"\n",
    )
    seen = []
    job = RepuxJob([], python=str(script), progress=seen.append)
    job.wait(timeout=120)
    assert [(r["stage"], r.get("done")) for r in seen] == [("infer", 0), ("infer", 1), ("infer", 2), ("infer", 3), ("done", None)]
    assert job.latest["done"] == 3 and job.fraction == 1.0


def test_progress_records_read_as_one_line():
    from RepUXSegmentLib.runner import describe_progress

    record = {"stage": "train", "done": 120, "total": 200, "eta": 35.4, "iteration": 120, "loss": 0.41204, "dice": 0.8314}
    assert describe_progress(record) == "train · 120/200 · loss 0.4120 · validation Dice 0.831 · 35 s left"
    assert describe_progress({"stage": "read", "done": 0, "total": None, "eta": None}) == "read"
    assert describe_progress({"stage": "train", "done": 1, "total": 3, "dice": None}) == "train · 1/3"


def test_missing_requirements_are_found_from_metadata(tmp_path):
    from RepUXSegmentLib.dependencies import TORCH_REQUIREMENT, missing_requirements, read_requirements

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnumpy>=1.0\n\nnot-a-real-package-xyz>=1\nnumpy<1.0  # too new here\n")
    assert read_requirements(requirements) == ["numpy>=1.0", "not-a-real-package-xyz>=1", "numpy<1.0"]
    assert missing_requirements(read_requirements(requirements)) == ["not-a-real-package-xyz>=1", "numpy<1.0"]
    # This environment has what the module's own requirements file and torch ask for.
    module_requirements = Path(__file__).resolve().parents[2] / "RepUXSegment" / "Resources" / "requirements.txt"
    assert missing_requirements([*read_requirements(module_requirements), TORCH_REQUIREMENT]) == []


def test_records_with_odd_fields_are_shown_without_the_odd_parts():
    from RepUXSegmentLib.runner import describe_progress

    assert describe_progress({"stage": "infer", "done": 1, "total": "a"}) == "infer"
    assert describe_progress({"stage": "infer", "done": 1, "total": 2, "eta": float("inf"), "loss": float("nan")}) == "infer · 1/2"
    assert describe_progress({"stage": "infer", "done": True, "total": 4, "dice": "0.5"}) == "infer · 0/4"


def test_a_job_survives_any_output_line(tmp_path):
    """Lines a job prints are input: odd records, a huge nested JSON line, broken JSON."""
    lines = [
        '{"stage": "infer", "done": 1, "total": "a"}',
        '{"stage": "infer", "done": 1, "total": 2, "eta": Infinity}',
        '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"stage": "infer", "done": 3, "total": 4, "eta": 1.5}',
        "{not json",
    ]
    script = tmp_path / "lines.txt"
    script.write_text("\n".join(lines) + "\n")
    fake = make_executable(tmp_path / "fake-python", f"#!/bin/sh\ncat {script}\n")
    job = RepuxJob([], python=str(fake))
    job.wait(timeout=60)
    assert job.latest == {"stage": "infer", "done": 3, "total": 4, "eta": 1.5}
    assert job.fraction == 0.75
    assert "{not json" in job.log
