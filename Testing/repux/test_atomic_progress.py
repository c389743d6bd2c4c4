"""repux.atomic and repux.progress: all-or-nothing writes, machine-readable progress."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repux.atomic import atomic_dir, atomic_path, write_json
from repux.progress import Progress


def test_atomic_path_leaves_nothing_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_with_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    with atomic_dir(target) as tmp:
        (tmp / "model.json").write_text("1")
    with pytest.raises(FileExistsError, match="bundle.*--force"):
        with atomic_dir(target) as tmp:
            pass
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "model.json").write_text("2")
    assert (target / "model.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_killed_writer_leaves_no_partial_file(tmp_path: Path) -> None:
    """SIGTERM during a write: the destination never appears and the temp file is removed."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from repux.atomic import atomic_path
        from repux.progress import cancel_on_sigterm
        cancel_on_sigterm()
        with atomic_path({str(tmp_path / "out.txt")!r}) as tmp:
            tmp.write_text("partial")
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=30)
    assert child.returncode != 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("stem", ["c" * 240, "\u00e9" * 122, "\u6c34" * 81], ids=["ascii-240", "2-byte-244", "3-byte-243"])
def test_a_name_that_fits_is_written_atomically_however_long(tmp_path: Path, stem: str) -> None:
    target = tmp_path / f"{stem}.seg.nrrd"  # within the 255-byte limit; its temporary needs ~25 more
    assert len(target.name.encode("utf-8")) <= 255
    with atomic_path(target) as tmp:
        assert len(tmp.name.encode("utf-8")) <= 255 and tmp.name.endswith(".seg.nrrd")
        tmp.write_bytes(b"labels")
    assert target.read_bytes() == b"labels"
    assert os.listdir(tmp_path) == [target.name]


def test_a_long_names_stale_temporary_is_removed_and_no_other(tmp_path: Path) -> None:
    """A killed writer's temporary of a long name is found again by the next write of that name only."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first, second = tmp_path / ("a" * 240 + "1.nrrd"), tmp_path / ("a" * 240 + "2.nrrd")
    stale = []
    for target in (first, second):
        with atomic_path(target) as tmp:  # a name of exactly the form a writer would use
            name = tmp.name.replace(f".tmp-{os.getpid()}-", f".tmp-{dead.pid}-")
            tmp.write_bytes(b"first version")
        (tmp_path / name).write_bytes(b"half")
        os.utime(tmp_path / name, (0, 0))  # old enough to be stale
        stale.append(tmp_path / name)
    assert stale[0].name[:200] == stale[1].name[:200]  # the shortened stems share their prefix
    with atomic_path(first, overwrite=True) as tmp:
        tmp.write_bytes(b"done")
    assert not stale[0].exists() and stale[1].exists()


def test_non_finite_numbers_become_null_so_every_record_parses() -> None:
    import numpy as np
    import torch

    stream = io.StringIO()
    progress = Progress("jsonl", stream=stream)
    progress.stage("train", total=2)
    progress.update(1, loss=float("nan"), dice=np.float32("inf"), grad=torch.tensor(float("-inf")), parts=[1.0, float("nan")])
    record = json.loads(stream.getvalue().splitlines()[-1], parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert record["loss"] is None and record["dice"] is None and record["grad"] is None and record["parts"] == [1.0, None]


def test_write_json_round_trip(tmp_path: Path) -> None:
    write_json({"a": [1, 2]}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}


def test_jsonl_progress_is_one_object_per_line() -> None:
    stream = io.StringIO()
    progress = Progress("jsonl", stream=stream)
    progress.stage("infer", total=4)
    progress.update(1, loss=0.5)
    progress.update(4)
    progress.message("case skipped")
    progress.finish(output="x.nii.gz")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["stage"] for r in records] == ["infer", "infer", "infer", "infer", "done"]
    assert records[1]["done"] == 1 and records[1]["total"] == 4 and records[1]["loss"] == 0.5
    assert records[1]["eta"] >= 0 and records[2]["eta"] == 0
    assert records[3]["message"] == "case skipped"
    assert records[4]["output"] == "x.nii.gz"


def test_a_resumed_stage_estimates_time_left_from_the_units_done_since(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr("repux.progress.time.monotonic", lambda: now[0])
    stream = io.StringIO()
    progress = Progress("jsonl", stream=stream)
    progress.stage("train", total=100, done=90)  # resumed at 90 of 100
    now[0] = 10.0
    progress.update(91)  # one unit in 10 s: 9 left take 90 s
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records[0] == {"stage": "train", "done": 90, "total": 100, "eta": None}
    assert records[1]["eta"] == pytest.approx(90.0)


def test_unknown_progress_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="'fancy'.*bar, jsonl, none"):
        Progress("fancy")
