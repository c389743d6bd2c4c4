"""benchmarks/bfr_ablation.py --quick end to end: real ``repux train`` runs on tiny phantoms,
a report that is well-formed, a second start that skips finished runs and resumes an
unfinished one from its checkpoint, and a new work dir that goes on from the report."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bfr_ablation.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1")
RUNS = ["bfr-adamw-a1-s0", "adamw-a1-s0", "frozen-kernels-a1-s0", "bfr-adamw-a4-s0"]


def harness(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def sessions(work: Path, run: str) -> list[dict]:
    return json.loads((work / "runs" / run / "run.json").read_text())["sessions"]


def test_quick_ablation_reports_and_resumes(tmp_path):
    work, out = tmp_path / "work", tmp_path / "report" / "ablation"
    harness("--quick", "--workdir", str(work), "--out", str(out))

    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["name"] for r in report["runs"]] == RUNS
    assert all(r["status"] == "finished" and r["iterations"] == 4 for r in report["runs"])
    for run in report["runs"]:
        assert set(run["test"]["cases"]) == {"phantom_000", "phantom_001"}  # the two test phantoms
        assert all(0 <= d <= 1 for d in run["test"]["per_organ"].values() if d is not None)
        assert [i for i, _ in run["curves"]["validation"]] == [2, 4]
        assert run["train_seconds"] > 0 and run["eval_seconds"] > 0
        learned = run["kernels"]["learned"]
        assert len(learned["radial_power"]) == len(run["kernels"]["frequencies"]) == 24
        assert 0 < learned["high_frequency_share"] < 1
    # The mechanism: BFR scales each tap's AdamW step by m <= 1, so it moves the kernels less
    # than plain AdamW; the frozen arm's kernels only decay (V0 m^n), almost all the way.
    change = {r["name"]: r["kernels"]["relative_change"] for r in report["runs"]}
    assert 0 < change["bfr-adamw-a1-s0"] < change["adamw-a1-s0"] and change["frozen-kernels-a1-s0"] > 0.5
    groups = report["summary"]["groups"]
    assert set(groups) == {"bfr-adamw a1", "adamw a1", "frozen-kernels a1", "bfr-adamw a4"}
    assert all(g["finished"] == g["planned"] == 1 for g in groups.values())
    assert report["machine"]["cores"] == os.cpu_count()
    train_seeds = json.loads((work / "data" / "trainval" / "dataset.json").read_text())["generator"]["case_seeds"]
    test_seeds = json.loads((work / "data" / "test" / "dataset.json").read_text())["generator"]["case_seeds"]
    assert not set(train_seeds) & set(test_seeds)

    text = out.with_suffix(".md").read_text()
    assert "**4 of 4 runs finished (complete)**" in text and "| bfr-adamw | 4 | 1/1 |" in text
    for suffix in ("_curves.png", "_spectra.png"):
        with Image.open(out.with_name(out.name + suffix)) as image:
            assert image.format == "PNG" and image.width > 600

    # An unfinished run (its checkpoint but no bundle, as after a kill during export) is resumed;
    # the finished ones are skipped: no new session, their scores untouched.
    shutil.rmtree(work / "runs" / "adamw-a1-s0" / "bundle")
    scored = (work / "runs" / "bfr-adamw-a1-s0" / "evaluation.json").stat().st_mtime_ns
    harness("--quick", "--workdir", str(work), "--out", str(out))
    assert [len(sessions(work, run)) for run in RUNS] == [1, 2, 1, 1]
    assert not list(work.glob("runs/*/harness.lock"))  # every run released
    assert (work / "runs" / "bfr-adamw-a1-s0" / "evaluation.json").stat().st_mtime_ns == scored
    log = (work / "runs" / "adamw-a1-s0" / "train.jsonl").read_text()
    assert "at iteration 4" in log and sessions(work, "adamw-a1-s0")[1]["from_iteration"] == 4
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["runs"][1]["status"] == "finished" and len(again["invocations"]) == 2
    for report in (out.with_suffix(".json"), out.with_suffix(".md")):  # no folder of this machine in what is committed
        assert str(work) not in report.read_text(encoding="utf-8") and "WORKDIR" in report.read_text(encoding="utf-8")

    # The experiment's fixed settings cannot change under the same work dir.
    refused = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(work)], capture_output=True, text=True, env=ENV)
    assert refused.returncode != 0 and "other trainval" in refused.stderr

    # A new work dir (another machine) goes on from the report: its finished runs are carried,
    # not trained again, and the report keeps them and the earlier invocations.
    moved = tmp_path / "moved"
    result = harness("--quick", "--workdir", str(moved), "--out", str(out), "--report-only")
    assert result.stderr.count("carried, not trained again") == len(RUNS)
    carried = json.loads(out.with_suffix(".json").read_text())
    assert [(r["name"], r["status"], r["test"]["mean"]) for r in carried["runs"]] == [
        (r["name"], r["status"], r["test"]["mean"]) for r in again["runs"]
    ]
    assert carried["invocations"] == again["invocations"]
    harness("--quick", "--workdir", str(moved), "--out", str(out))
    assert not list(moved.glob("runs/*/train.jsonl"))
    assert len(json.loads(out.with_suffix(".json").read_text())["invocations"]) == 3
    # A raised budget makes them unfinished runs again (nothing to resume them from).
    harness("--quick", "--workdir", str(tmp_path / "longer"), "--out", str(out), "--report-only", "--iterations", "6")
    assert {r["status"] for r in json.loads(out.with_suffix(".json").read_text())["runs"]} == {"not started"}


def load_harness(monkeypatch):
    spec = importlib.util.spec_from_file_location("bfr_ablation", SCRIPT)
    ablation = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bfr_ablation", ablation)  # its dataclasses look themselves up there
    spec.loader.exec_module(ablation)
    return ablation


def test_runs_still_improving_at_the_budget_are_named(monkeypatch):
    ablation = load_harness(monkeypatch)

    def run(name, status="finished", iterations=2400, best=2000, stopped=False):
        return {"name": name, "status": status, "iterations": iterations, "best_iteration": best, "stopped_early": stopped}

    runs = [
        run("late-best", best=2300),  # 100 iterations after its best: still improving
        run("settled", best=1700),  # 700 > patience: it had stopped improving
        run("patience", iterations=1100, best=500, stopped=True),
        run("unfinished", status="unfinished", iterations=900, best=900),
        run("at-the-end", best=2400),
    ]
    assert [r["name"] for r in ablation.still_improving(runs, patience=600)] == ["late-best", "at-the-end"]


def test_the_plan_runs_whole_seeds_of_the_chosen_arms(monkeypatch):
    ablation = load_harness(monkeypatch)
    full = [r.name for r in ablation.plan(ablation.Protocol(seeds=[0, 1]))]
    assert full[:5] == ["bfr-adamw-a1-s0", "adamw-a1-s0", "frozen-kernels-a1-s0", "bfr-adamw-a0.25-s0", "bfr-adamw-a4-s0"]
    assert len(full) == 10 and full[5:] == [name.replace("-s0", "-s1") for name in full[:5]]
    pair = ablation.Protocol(seeds=[1], arms=["adamw", "bfr-adamw"], alphas=[1.0])
    assert [r.name for r in ablation.plan(pair)] == ["bfr-adamw-a1-s1", "adamw-a1-s1"]
    no_prior = ablation.Protocol(seeds=[0], arms=["adamw"])  # other alphas are BFR's: none without it
    assert [r.name for r in ablation.plan(no_prior)] == ["adamw-a1-s0"]


def test_late_gain_tells_a_plateau_from_a_run_still_learning(monkeypatch):
    ablation = load_harness(monkeypatch)

    def run(validation):
        return {"iterations": 2400, "curves": {"validation": validation}}

    plateau = run([(1700, 0.90), (1800, 0.905), (2000, 0.89), (2300, 0.907), (2400, None)])
    learning = run([(1600, 0.70), (1800, 0.75), (2100, 0.80), (2400, 0.85)])
    assert abs(ablation.late_gain(plateau, patience=600) - 0.002) < 1e-9  # 0.907 against 0.905 at iteration 1800
    assert abs(ablation.late_gain(learning, patience=600) - 0.10) < 1e-9
    assert ablation.late_gain(run([(2000, 0.5)]), patience=600) is None  # nothing validated before the window


def test_a_run_held_by_a_live_harness_is_left_to_it_and_a_dead_ones_is_taken_over(tmp_path, monkeypatch):
    ablation = load_harness(monkeypatch)
    run = tmp_path / "runs" / "adamw-a1-s1"
    run.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "harness.lock").write_text(str(other.pid), encoding="utf-8")
        assert not ablation.take_run(run)
    finally:
        other.kill()
        other.wait()
    assert ablation.take_run(run)  # its holder died: the run is not orphaned
    assert (run / "harness.lock").read_text(encoding="utf-8") == str(os.getpid())
    assert ablation.take_run(run)  # this harness already holds it
    ablation.release_run(run)
    assert not (run / "harness.lock").exists()
