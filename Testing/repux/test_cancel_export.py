"""Cancelling during the export and the writes: prompt, and nothing left behind, not even by
an earlier run that was killed outright."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from repux.atomic import atomic_dir, atomic_path
from repux.cli import main
from repux.data.phantoms import make_phantom
from repux.imageio import write_volume
from infer_support import save_tiny_bundle


def test_sigterm_during_a_long_volume_write_ends_within_a_second_or_two(tmp_path: Path) -> None:
    """ITK's compressed write is one C call: run in the main thread it holds off the signal
    until it is done (seconds for this volume); the writer must stay cancellable."""
    script = textwrap.dedent(
        f"""
        import numpy as np
        from repux.imageio import Volume, write_volume
        from repux.progress import cancel_on_sigterm
        cancel_on_sigterm()
        noise = np.random.default_rng(0).random((640, 256, 256), dtype=np.float32)
        print("writing", flush=True)
        write_volume(Volume(noise, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), {str(tmp_path / "noise.nii.gz")!r})
        print("written", flush=True)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        time.sleep(0.5)  # inside the write
        child.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        child.wait(timeout=60)
        waited = time.monotonic() - sent
    finally:
        if child.poll() is None:
            child.kill()
    assert child.stdout.read() == ""  # the write never finished
    assert waited < 2.0, f"{waited:.1f} s from SIGTERM to exit"
    time.sleep(0.5)
    assert os.listdir(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_killed_runs_are_removed_and_nothing_else(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale_file = tmp_path / f".labels.tmp-{dead}-0123abcd.nii.gz"
    stale_file.write_bytes(b"x" * 100)
    stale_dir = tmp_path / f".bundle.tmp-{dead}-89abcdef"
    stale_dir.mkdir()
    (stale_dir / "model.json").write_text("{}")
    # A live process's temporary (this one's), a user's file that looks similar, another target's.
    live = tmp_path / f".labels.tmp-{os.getpid()}-0badcafe.nii.gz"
    live.write_bytes(b"y")
    users = [tmp_path / ".labels.tmp-notes.nii.gz", tmp_path / f".other.tmp-{dead}-0123abcd.nii.gz"]
    for path in users:
        path.write_bytes(b"z")
    old = time.time() - 3600
    for path in (stale_file, stale_dir, live, *users):
        os.utime(path, (old, old))

    with atomic_path(tmp_path / "labels.nii.gz") as tmp:
        assert f".tmp-{os.getpid()}-" in tmp.name
        tmp.write_bytes(b"labels")
    with atomic_dir(tmp_path / "bundle") as tmp:
        (tmp / "model.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["labels.nii.gz", "bundle", live.name, *(p.name for p in users)]
    )


def test_export_reports_progress_chunk_by_chunk(tmp_path: Path, capsys) -> None:
    """A CT of 2.6 million voxels is exported in two chunks of resampling (2^21 points each), each reported."""
    bundle = save_tiny_bundle(tmp_path / "tiny", spacing=(8.0, 8.0, 8.0))
    image, _ = make_phantom(3, shape=(160, 160, 100), spacing=(2.5, 2.5, 4.0), oblique=False)
    ct = write_volume(image, tmp_path / "ct.nii.gz")
    code = main(["segment", str(ct), "-o", str(tmp_path / "labels.nii.gz"), "--model", str(bundle),
                 "--progress", "jsonl"])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    export = [(r["done"], r["total"]) for r in records if r["stage"] == "export" and "done" in r]
    assert export[0] == (0, 160) and export[-1] == (160, 160), export
    assert any(0 < done < 160 for done, _ in export), export
    stages = [r["stage"] for r in records]
    assert stages.index("export") < stages.index("write") < stages.index("done")
    assert int(np.prod(image.shape)) > 2 * 2**20
