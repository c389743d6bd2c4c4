"""BFR ablation: BFR-AdamW vs plain AdamW vs the published code's frozen kernels, several seeds
and several strengths of the prior, scored on held-out phantoms. Resumable across sessions.

Every run is one ``repux train`` process (arm x alpha x seed) with its own output bundle and
checkpoints under ``WORKDIR/runs/NAME/``; its ``--progress jsonl`` records are appended to
``train.jsonl`` there. Started again, the harness skips finished runs, resumes unfinished
ones from their checkpoint (``repux train --resume``) and carries on down the plan, so the
ablation can span many sessions; raising ``--iterations`` or ``--patience`` continues runs
that stopped under the old budget. The work dir stays on its machine, but the report at
``--out`` (the committed one by default) carries the finished runs: a new work dir takes
them from it and trains only the rest (an unfinished run's checkpoint does not travel, so it
starts again). ``--stop-at HH:MM`` (UTC) ends the current run cleanly
(SIGTERM: it writes a checkpoint) and writes the report; ``--report-only`` writes the report
from whatever exists, also while another harness is training. Several harnesses may share a
work dir (one per core, each with ``OMP_NUM_THREADS=1``): each takes the next run that no
live harness holds (``runs/NAME/harness.lock``, the holder's pid).

Protocol (fixed per work dir, recorded in ``WORKDIR/protocol.json``):

- data: ``repux make-phantoms`` train/validation set (split by ``repux train --val-fraction``,
  shuffled by the run's seed) and a separate test set from another generator seed, whose
  case seeds are checked to be disjoint from the training ones. The test set is used for
  nothing but the final scores.
- arms: ``bfr-adamw`` (the paper's method), ``adamw`` (same network and start, no prior),
  ``frozen-kernels`` (the published code's behaviour), all at the paper's alpha; then
  ``bfr-adamw`` at the other alphas. Runs are ordered seed by seed, so a partial ablation
  has whole seeds.
- training: until the validation Dice (organ mean) has not improved for ``--patience``
  iterations, or ``--iterations``, whichever comes first; the best validated network is
  exported and scored.
- results: per-organ test Dice (mean, spread over seeds) per arm and per alpha, paired
  differences, learning curves and radial power spectra of the large kernels (PNG), wall
  time per run, the machine, the commands.

    python benchmarks/bfr_ablation.py                      # the full ablation (many hours on 2 CPU cores)
    python benchmarks/bfr_ablation.py --stop-at 06:30      # ... until 06:30 UTC, then report
    python benchmarks/bfr_ablation.py --report-only        # report what exists
    python benchmarks/bfr_ablation.py --quick --workdir /tmp/q --out /tmp/q/report   # about a minute

Writes ``benchmarks/results/bfr_ablation.{json,md}``, ``bfr_ablation_curves.png`` and
``bfr_ablation_spectra.png`` (``--out`` changes the path without ending).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "bfr_ablation"
ARMS = ("bfr-adamw", "adamw", "frozen-kernels")
PAPER_ALPHA = 1.0
ORGANS = ("spleen", "kidney", "liver", "pancreas")
#: The tiny network of --quick: 9^3 kernels, so a step takes well under a second.
QUICK_NETWORK = {"arch": "repuxnet", "feat_size": [4, 8, 16, 32], "hidden_size": 32, "ks": 9}
#: Settings that must not change within a work dir (they define the experiment).
FIXED = ("trainval", "trainval_seed", "test", "test_seed", "phantom_shape", "network", "spacing", "patch",
         "lr", "weight_decay", "val_fraction", "val_every")  # fmt: skip


@dataclass
class Protocol:
    """One ablation's settings; see the module docstring."""

    trainval: int = 24
    trainval_seed: int = 0
    test: int = 10
    test_seed: int = 2026
    phantom_shape: list[int] | None = None
    network: str | dict[str, Any] = "small"
    spacing: float = 4.0
    patch: int = 48
    lr: float = 1e-3
    weight_decay: float = 0.01
    val_fraction: float = 0.25
    val_every: int = 100
    iterations: int = 2400
    patience: int = 600
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = dataclasses.field(default_factory=lambda: list(ARMS))
    alphas: list[float] = dataclasses.field(default_factory=lambda: [0.25, 4.0])


QUICK = Protocol(trainval=4, test=2, phantom_shape=[40, 40, 28], network=QUICK_NETWORK, spacing=8.0, patch=32,
                 val_every=2, iterations=4, patience=4, seeds=[0], alphas=[4.0])  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    arm: str
    alpha: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}-a{self.alpha:g}-s{self.seed}"


def plan(protocol: Protocol) -> list[RunSpec]:
    """Every run, seed by seed: the arms at the paper's alpha, then BFR at the other alphas."""
    runs = []
    for seed in protocol.seeds:
        runs += [RunSpec(arm, PAPER_ALPHA, seed) for arm in ARMS if arm in protocol.arms]
        if "bfr-adamw" in protocol.arms:
            runs += [RunSpec("bfr-adamw", alpha, seed) for alpha in protocol.alphas if alpha != PAPER_ALPHA]
    return runs


# -- the work dir ---------------------------------------------------------------------------
class Workdir:
    def __init__(self, root: Path, protocol: Protocol) -> None:
        self.root = root
        self.protocol = protocol

    @property
    def trainval(self) -> Path:
        return self.root / "data" / "trainval"

    @property
    def test(self) -> Path:
        return self.root / "data" / "test"

    def portable(self, text: str) -> str:
        """``text`` with this work dir written ``WORKDIR``: a report names no folder of one machine."""
        return text.replace(str(self.root), "WORKDIR")

    def run_dir(self, spec: RunSpec) -> Path:
        return self.root / "runs" / spec.name

    def network_arg(self) -> str:
        network = self.protocol.network
        if isinstance(network, str):
            return network
        path = self.root / "network.json"
        if not path.exists():
            path.write_text(json.dumps(network))
        return str(path)

    def check_protocol(self) -> None:
        """Record the protocol, or refuse one that differs from the recorded one in a fixed setting."""
        path = self.root / "protocol.json"
        current = dataclasses.asdict(self.protocol)
        if path.exists():
            saved = json.loads(path.read_text())
            changed = [key for key in FIXED if saved.get(key) != current[key]]
            if changed:
                sys.exit(f"{path}: this work dir was made with other {', '.join(changed)}; use another --workdir")
        self.root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=1))

    def make_data(self) -> None:
        from repux.data.phantoms import write_phantom_dataset

        p = self.protocol
        shape = {"shape": tuple(p.phantom_shape)} if p.phantom_shape else {}
        for folder, n, seed in ((self.trainval, p.trainval, p.trainval_seed), (self.test, p.test, p.test_seed)):
            if not folder.exists():
                print(f"== phantoms: {n} in {folder} (seed {seed})", file=sys.stderr, flush=True)
                write_phantom_dataset(n, folder, seed=seed, **shape)
        seeds = [set(json.loads((f / "dataset.json").read_text())["generator"]["case_seeds"]) for f in (self.trainval, self.test)]
        if seeds[0] & seeds[1]:
            sys.exit(f"{self.test}: shares phantom seeds {sorted(seeds[0] & seeds[1])} with {self.trainval}")


# -- runs an earlier report recorded -------------------------------------------------------
#: A run carried from an earlier report: that report's record of it, in the run's folder.
RECORDED = "recorded.json"


def adopt_recorded(work: Workdir, report_path: Path) -> None:
    """Carry the finished runs of an earlier report (the committed one) into ``work``.

    A work dir lives on one machine and the report in the repository, so on a new machine the
    ablation goes on from the report instead of training its finished runs again. Nothing is
    carried from a report of another experiment (a FIXED setting differs); a run the work dir
    trained itself is never replaced. A new work dir also takes the report's invocations, so
    the next report keeps the whole history.
    """
    report = _read_json(report_path)
    if report is None:
        return
    current = dataclasses.asdict(work.protocol)
    changed = [key for key in FIXED if report["protocol"].get(key) != current[key]]
    if changed:
        print(f"== {report_path}: made with other {', '.join(changed)}; none of its runs carried", file=sys.stderr)
        return
    invocations = work.root / "invocations.json"
    if not invocations.exists():
        _write_json(report["invocations"], invocations)
    for record in report["runs"]:
        run = work.root / "runs" / record["name"]
        if record["status"] == "finished" and not (run / "train.jsonl").exists() and not (run / RECORDED).exists():
            run.mkdir(parents=True, exist_ok=True)
            _write_json(record, run / RECORDED)
            print(f"== {record['name']}: finished in {report_path.name}; carried, not trained again", file=sys.stderr)


def recorded_run(work: Workdir, spec: RunSpec) -> dict[str, Any] | None:
    """The carried record of a run the work dir has not trained itself, if it is finished under
    the current budget and patience (a raised budget trains it again from the start)."""
    run = work.run_dir(spec)
    record = _read_json(run / RECORDED)
    if record is None or (run / "train.jsonl").exists():
        return None
    return record if ended_under(work.protocol, record["iterations"], record["best_iteration"], record["stopped_early"]) else None


# -- one run ----------------------------------------------------------------------------------
def train_command(work: Workdir, spec: RunSpec, force: bool) -> list[str]:
    """The ``repux train`` command of a run (always --resume: a run without a checkpoint starts fresh)."""
    p = work.protocol
    run = work.run_dir(spec)
    command = [
        "repux", "train", str(work.trainval), "-o", str(run / "bundle"), "--network", work.network_arg(),
        "--optimizer", spec.arm, "--alpha", f"{spec.alpha:g}", "--lr", f"{p.lr:g}", "--weight-decay", f"{p.weight_decay:g}",
        "--spacing", f"{p.spacing:g}", "--patch-size", str(p.patch), "--iterations", str(p.iterations),
        "--val-every", str(p.val_every), "--patience", str(p.patience), "--val-fraction", f"{p.val_fraction:g}",
        "--seed", str(spec.seed), "--resume", "--progress", "jsonl",
    ]  # fmt: skip
    return command + (["--force"] if force else [])


def bundle_provenance(run: Path) -> dict[str, Any] | None:
    path = run / "bundle" / "model.json"
    return json.loads(path.read_text())["provenance"] if path.exists() else None


def training_finished(provenance: dict[str, Any] | None, protocol: Protocol) -> bool:
    """A bundle exists and its run used the whole budget or stopped by the current patience."""
    if provenance is None:
        return False
    return ended_under(protocol, provenance["iterations"], provenance["exported_iteration"], provenance.get("stopped_early"))


def ended_under(protocol: Protocol, iterations: int, best_iteration: int | None, stopped_early: bool | None) -> bool:
    """A run that trained ``iterations`` and validated best at ``best_iteration`` is done under
    ``protocol``: it spent the budget, or stopped early after at least the current patience."""
    if iterations >= protocol.iterations:
        return True
    return bool(stopped_early) and best_iteration is not None and iterations - best_iteration >= protocol.patience


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a run's train.jsonl (a line cut by a hard kill is skipped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_iteration(records: list[dict[str, Any]]) -> int:
    steps = [r["iteration"] for r in records if r.get("stage") == "train" and "loss" in r]
    return steps[-1] if steps else 0


class Stop(Exception):
    """The deadline passed or the harness was asked to stop."""


def take_run(run: Path) -> bool:
    """Hold ``run`` for this harness, unless another live harness holds it.

    A lock whose holder has died (a hard kill, a reboot) is taken over, so a crash never
    leaves a run orphaned.
    """
    from repux.atomic import process_alive

    run.mkdir(parents=True, exist_ok=True)
    lock = run / "harness.lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text(encoding="utf-8") or 0)
            except (FileNotFoundError, ValueError):
                holder = 0  # released or half-written just now: look again
            if holder == os.getpid():
                return True
            if holder and process_alive(holder):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(str(os.getpid()))
        return True


def release_run(run: Path) -> None:
    (run / "harness.lock").unlink(missing_ok=True)


def train_run(work: Workdir, spec: RunSpec, deadline: float | None) -> None:
    """Train (or resume) one run in a child process, recording the session's wall time."""
    run = work.run_dir(spec)
    run.mkdir(parents=True, exist_ok=True)
    command = train_command(work, spec, force=bundle_provenance(run) is not None)
    log = run / "train.jsonl"
    first = last_iteration(read_records(log))
    started, started_at = time.monotonic(), _now()
    print(f"== {spec.name}: {shlex.join(command)}", file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "a") as out, open(run / "train.err", "a") as err:
        child = subprocess.Popen([sys.executable, "-m", "repux", *command[1:]], stdout=out, stderr=err, env=env)
        stopped = False
        try:
            while child.poll() is None:
                if deadline is not None and time.time() > deadline:
                    raise Stop()
                time.sleep(2)
        except (Stop, KeyboardInterrupt):
            stopped = True
            child.send_signal(signal.SIGTERM)  # repux train writes a checkpoint and exits
            child.wait()
    session = {
        "started": started_at,
        "seconds": round(time.monotonic() - started, 1),
        "from_iteration": first,
        "to_iteration": last_iteration(read_records(log)),
        "returncode": child.returncode,
        "load_average": os.getloadavg()[0],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),  # None: torch's default, one per core
    }
    info = _read_json(run / "run.json") or {"run": dataclasses.asdict(spec), "sessions": []}
    info["command"] = shlex.join(command)
    info["sessions"].append(session)
    _write_json(info, run / "run.json")
    if stopped:
        raise Stop()
    if child.returncode != 0:
        print(f"== {spec.name}: repux train failed (exit {child.returncode}); see {run / 'train.err'}", file=sys.stderr)


def evaluate_run(work: Workdir, spec: RunSpec) -> None:
    """Score a finished run's bundle on the test phantoms and measure its large kernels."""
    import torch

    from repux.bfr.spectrum import high_frequency_share, radial_power_spectrum
    from repux.bundle import load_bundle
    from repux.data.cases import load_cases
    from repux.imageio import read_volume
    from repux.infer import Segmenter
    from repux.infer.metrics import score_labels

    run = work.run_dir(spec)
    started = time.monotonic()
    bundle = load_bundle(run / "bundle")
    segmenter = Segmenter(bundle, device="cpu")
    organs = [(label.value, label.name) for label in bundle.labels if label.value != 0]
    cases = {}
    for case in load_cases(work.test):
        labels = segmenter.predict(read_volume(case.image), source=str(case.image)).labels
        scores = score_labels(labels, read_volume(case.label), organs, "prediction", str(case.label), hausdorff=False)
        cases[case.case_id] = {s.name: s.dice for s in scores}
    learned, start = _kernels(bundle.build_network()), initial_kernels(work, spec)
    kernels: dict[str, Any] = {}
    for key, values in (("learned", learned), ("change", learned - start), ("start", start)):
        if float(values.abs().max()) > 0:
            centres, power = radial_power_spectrum(values)
            kernels[key] = {"radial_power": power.tolist(), "high_frequency_share": high_frequency_share(values)}
    kernels["frequencies"] = centres.tolist()
    kernels["relative_change"] = float((learned - start).norm() / start.norm())
    per_organ = {name: _mean([c[name] for c in cases.values()]) for _, name in organs}
    result = {
        "bundle_created": bundle.metadata.provenance["created"],
        "cases": cases,
        "per_organ": per_organ,
        "mean": _mean(list(per_organ.values())),
        "kernels": kernels,
        "seconds": round(time.monotonic() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    _write_json(result, run / "evaluation.json")


def _kernels(network):
    """All large depthwise kernels of a network as one (N, k, k, k) float64 tensor."""
    import torch

    from repux.network import large_kernel_convs

    weights = [conv.weight.detach().to(torch.float64) for _, conv in large_kernel_convs(network)]
    return torch.cat([w.reshape(-1, *w.shape[-3:]) for w in weights])


def initial_kernels(work: Workdir, spec: RunSpec):
    """The large kernels the run started from (the trainer builds its start the same way)."""
    from repux.bundle.presets import label_preset
    from repux.train.model_setup import start_from_scratch
    from repux.train.optimizers import prepare_fresh_network

    start = start_from_scratch(work.protocol.network, label_preset("flare"), spec.seed, spec.alpha)
    prepare_fresh_network(start.network, spec.arm, spec.alpha)
    return _kernels(start.network)


# -- the report ---------------------------------------------------------------------------
def curves(records: list[dict[str, Any]], every: int = 25) -> dict[str, list]:
    """Validation organ-mean Dice per validated iteration, and the training loss averaged over
    blocks of ``every`` iterations (the last record of an iteration wins: a resumed run may
    repeat some)."""
    loss: dict[int, float] = {}
    validation: dict[int, float | None] = {}
    for r in records:
        if r.get("stage") == "train" and "loss" in r:
            loss[r["iteration"]] = r["loss"]
        if "validation" in r:
            validation[r["iteration"]] = r["validation"]["mean"]
    blocks: dict[int, list[float]] = {}
    for iteration, value in loss.items():
        blocks.setdefault((iteration - 1) // every, []).append(value)
    return {
        "validation": sorted(validation.items()),
        "loss": [((block + 1) * every, sum(v) / len(v)) for block, v in sorted(blocks.items())],
    }


def collect(work: Workdir, spec: RunSpec) -> dict[str, Any]:
    """Everything known about one run, finished or not."""
    recorded = recorded_run(work, spec)
    if recorded is not None:
        return recorded
    run = work.run_dir(spec)
    records = read_records(run / "train.jsonl")
    provenance = bundle_provenance(run)
    evaluation = _read_json(run / "evaluation.json")
    info = _read_json(run / "run.json") or {"sessions": []}
    finished = training_finished(provenance, work.protocol)
    validations = [r for r in records if "validation" in r and r["validation"]["mean"] is not None]
    best = max(validations, key=lambda r: r["validation"]["mean"], default=None)
    status = "finished" if finished and evaluation else "not started" if not records else "unfinished"
    return {
        "name": spec.name,
        **dataclasses.asdict(spec),
        "status": status,
        "iterations": provenance["iterations"] if finished else last_iteration(records),
        "stopped_early": bool(provenance and provenance.get("stopped_early")) if finished else None,
        "best_iteration": best["iteration"] if best else None,
        "validation": best["validation"] if best else None,
        "test": {k: evaluation[k] for k in ("per_organ", "mean", "cases")} if status == "finished" else None,
        "kernels": evaluation["kernels"] if status == "finished" else None,
        "train_seconds": round(sum(s["seconds"] for s in info["sessions"]), 1),
        "sessions": info["sessions"],
        "eval_seconds": evaluation["seconds"] if evaluation else None,
        "command": work.portable(info.get("command") or shlex.join(train_command(work, spec, force=False))),
        "curves": curves(records),
    }


def _stats(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"n": len(values), "mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (arm, alpha): test Dice statistics over the finished seeds; paired arm differences."""
    groups: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(f"{r['arm']} a{r['alpha']:g}" for r in runs):
        members = [r for r in runs if f"{r['arm']} a{r['alpha']:g}" == key]
        done = [r for r in members if r["status"] == "finished"]
        groups[key] = {
            "arm": members[0]["arm"],
            "alpha": members[0]["alpha"],
            "planned": len(members),
            "finished": len(done),
            "test": {o: _stats([r["test"]["per_organ"][o] for r in done]) for o in ORGANS},
            "test_mean": _stats([r["test"]["mean"] for r in done]),
            "validation_mean": _stats([r["validation"]["mean"] for r in done]),
            "iterations": _stats([r["iterations"] for r in done]),
            "train_seconds": _stats([r["train_seconds"] for r in done]),
            "high_frequency_share": {
                part: _stats([r["kernels"][part]["high_frequency_share"] for r in done if part in r["kernels"]])
                for part in ("learned", "change", "start")
            },
            "relative_change": _stats([r["kernels"]["relative_change"] for r in done]),
        }
    reference = f"bfr-adamw a{PAPER_ALPHA:g}"
    paired = {}
    for key in groups:
        if key == reference:
            continue
        by_seed = {r["seed"]: r for r in runs if f"{r['arm']} a{r['alpha']:g}" == key and r["status"] == "finished"}
        diffs = [
            r["test"]["mean"] - by_seed[r["seed"]]["test"]["mean"]
            for r in runs
            if f"{r['arm']} a{r['alpha']:g}" == reference and r["status"] == "finished" and r["seed"] in by_seed
        ]
        paired[f"{reference} minus {key}"] = _stats(diffs)
    return {"groups": groups, "paired_differences": paired}


def machine() -> dict[str, Any]:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__}


def _cell(stats: dict[str, Any], digits: int = 3) -> str:
    if not stats["n"]:
        return "-"
    text = f"{stats['mean']:.{digits}f}"
    return text + (f" ± {stats['sd']:.{digits}f}" if stats["sd"] is not None else "")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _gain(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _value(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def still_improving(runs: list[dict[str, Any]], patience: int) -> list[dict[str, Any]]:
    """Finished runs that ended at the budget less than ``patience`` iterations after their best validation."""
    return [
        r for r in runs
        if r["status"] == "finished" and not r["stopped_early"] and r["best_iteration"] is not None
        and r["iterations"] - r["best_iteration"] < patience
    ]  # fmt: skip


def late_gain(run: dict[str, Any], patience: int) -> float | None:
    """How much a run's best validation Dice rose in its last ``patience`` iterations: near 0
    for a run on a plateau that a noisy validation happened to top late, large for one still
    learning."""
    values = [(i, d) for i, d in run["curves"]["validation"] if d is not None]
    earlier = [d for i, d in values if i <= run["iterations"] - patience]
    return max(d for _, d in values) - max(earlier) if earlier else None


def markdown(report: dict[str, Any]) -> str:
    runs, summary, p = report["runs"], report["summary"], report["protocol"]
    finished = sum(r["status"] == "finished" for r in runs)
    state = "complete" if finished == len(runs) else "partial"
    lines = [
        "# BFR ablation: BFR-AdamW vs AdamW vs frozen kernels (the published behaviour), and the prior's alpha",
        "",
        f"**{finished} of {len(runs)} runs finished ({state})**, report written {report['written']}.",
        *[f"Unfinished: {r['name']} at iteration {r['iterations']} (resumes on the next start)." for r in runs
          if r["status"] == "unfinished"],
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores (shared with other work), "
        f"torch {report['machine']['torch']}; each run's threads are its harness's (`OMP_NUM_THREADS`).",
        "",
        "## Protocol",
        "",
        f"- data: `repux make-phantoms {p['trainval']} trainval --seed {p['trainval_seed']}` "
        f"(split per run by `--val-fraction {p['val_fraction']:g}`, shuffled by the run's seed) and a held-out test set "
        f"`repux make-phantoms {p['test']} test --seed {p['test_seed']}` (disjoint phantom seeds; used only for the "
        "scores below)" + (f", phantom shape {p['phantom_shape']}" if p["phantom_shape"] else ""),
        f"- network `{p['network'] if isinstance(p['network'], str) else json.dumps(p['network'])}`, "
        f"{p['spacing']:g} mm, {p['patch']}^3 patches, lr {p['lr']:g}, weight decay {p['weight_decay']:g}, "
        f"validation every {p['val_every']} iterations, at most {p['iterations']} iterations, stopped when the "
        f"validation organ-mean Dice has not improved for {p['patience']} iterations; the best validated network is "
        "scored",
        f"- arms {p['arms']}, seeds {p['seeds']}; the paper's alpha {PAPER_ALPHA:g} for every arm, and alphas "
        f"{[a for a in p['alphas'] if a != PAPER_ALPHA]} for bfr-adamw (m = a / (d + a): small a damps far taps more)",
        "- test Dice: `repux segment`'s engine (the bundle's overlap and blending) on the test phantoms' own grids, "
        "per organ, mean over cases; below, mean ± sample SD over seeds",
        "",
        "Harness commands (in order):",
        "",
        *[f"    {c}" for c in report["invocations"]],
        "",
        "## Test Dice per arm and alpha",
        "",
        "| arm | alpha | finished | " + " | ".join(ORGANS) + " | organ mean | validation mean | iterations | train s (mean) |",
        "|---|---:|---:|" + "---|" * len(ORGANS) + "---|---|---|---:|",
    ]
    for group in summary["groups"].values():
        cells = [group["arm"], f"{group['alpha']:g}", f"{group['finished']}/{group['planned']}"]
        cells += [_cell(group["test"][o]) for o in ORGANS]
        cells += [f"**{_cell(group['test_mean'])}**", _cell(group["validation_mean"]), _cell(group["iterations"], 0)]
        cells += [_cell(group["train_seconds"], 0)]
        lines.append(_row(cells))
    lines += ["", "Paired differences of the test organ-mean Dice (same seed: same split, start and patches):", ""]
    for name, stats in summary["paired_differences"].items():
        spread = f" (min {stats['min']:+.3f}, max {stats['max']:+.3f})" if stats["n"] else ""
        lines.append(f"- {name}: {_cell(stats)} over {stats['n']} seeds{spread}")
    improving = still_improving(runs, p["patience"])
    if improving:
        named = ", ".join(f"{r['name']} (best at {r['best_iteration']}, {_gain(late_gain(r, p['patience']))})" for r in improving)
        lines += [
            "",
            f"Still improving at the budget of {p['iterations']} iterations (best validation within the last "
            f"{p['patience']}; how much the best rose in those last {p['patience']} iterations): {named}. "
            "Their scores may rise with a longer budget: start the harness again with a higher `--iterations` "
            "to continue them.",
        ]
    lines += [
        "",
        "## Large kernels",
        "",
        "Share of power above 0.25 cycles/voxel (radial power spectrum, each kernel normalised to mean power 1; an",
        "all-pass kernel has 0.935; see `repux.bfr.spectrum`) of the learned kernels W, of what training changed",
        "(W - W0) and of the start W0; relative change ||W - W0|| / ||W0||. For frozen-kernels the change is the",
        "m^n decay of the published code, not learning.",
        "",
        "| arm | alpha | HF share W | HF share W - W0 | HF share W0 | relative change |",
        "|---|---:|---|---|---|---|",
    ]
    for group in summary["groups"].values():
        hf = group["high_frequency_share"]
        cells = [group["arm"], f"{group['alpha']:g}", _cell(hf["learned"]), _cell(hf["change"]), _cell(hf["start"])]
        lines.append(_row(cells + [_cell(group["relative_change"], 2)]))
    lines += [
        "",
        f"![learning curves]({report['figures']['curves']})",
        "",
        f"![kernel spectra]({report['figures']['spectra']})",
        "",
        "## Every run",
        "",
        "| run | status | iterations | best at | validation | " + " | ".join(ORGANS) + " | test mean | train s | eval s | sessions |",
        "|---|---|---:|---:|---|" + "---|" * len(ORGANS) + "---|---:|---:|---:|",
    ]
    for r in runs:
        test = r["test"] or {"per_organ": {}, "mean": None}
        iterations = f"{r['iterations']}" + (" (stopped)" if r["stopped_early"] else "")
        cells = [r["name"], r["status"], iterations, str(r["best_iteration"] or "-"), _value((r["validation"] or {}).get("mean"))]
        cells += [_value(test["per_organ"].get(o)) for o in ORGANS] + [_value(test["mean"])]
        cells += [f"{r['train_seconds']:.0f}", _value(r["eval_seconds"], 0), str(len(r["sessions"]))]
        lines.append(_row(cells))
    lines += ["", "Each run's `repux train` command (the harness adds `--force` to continue a run whose bundle exists):", ""]
    lines += [f"    {r['command']}" for r in runs]
    return "\n".join(lines) + "\n"


def figure_names(out: Path) -> dict[str, str]:
    """File names of the learning curves and kernel spectra PNGs, beside the report ``out``."""
    return {"curves": out.name + "_curves.png", "spectra": out.name + "_spectra.png"}


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """Learning curves and kernel spectra as PNGs beside ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(report["summary"]["groups"])
    colours = {g: plt.get_cmap("tab10")(i) for i, g in enumerate(groups)}
    paths = [out.with_name(name) for name in figure_names(out).values()]

    figure, (dice_axes, loss_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in report["runs"]:
        group = f"{r['arm']} a{r['alpha']:g}"
        label = group if r["seed"] == min(x["seed"] for x in report["runs"] if f"{x['arm']} a{x['alpha']:g}" == group) else None
        if r["curves"]["validation"]:
            x, y = zip(*r["curves"]["validation"])
            dice_axes.plot(x, y, color=colours[group], alpha=0.8, label=label)
        if r["curves"]["loss"]:
            x, y = zip(*r["curves"]["loss"])
            loss_axes.plot(x, y, color=colours[group], alpha=0.8, label=label)
    dice_axes.set(xlabel="iteration", ylabel="validation Dice (organ mean)", title="validation (one line per seed)")
    loss_axes.set(xlabel="iteration", ylabel="training loss (DiceCE, block means)", title="training loss")
    for axes in (dice_axes, loss_axes):
        _finish(axes)
    figure.tight_layout()
    figure.savefig(paths[0], dpi=100)
    plt.close(figure)

    figure, axes_pair = plt.subplots(1, 2, figsize=(12, 4.5))
    start_drawn = False
    for group in groups:
        done = [r for r in report["runs"] if f"{r['arm']} a{r['alpha']:g}" == group and r["status"] == "finished"]
        for axes, part in zip(axes_pair, ("learned", "change")):
            spectra = [r["kernels"][part]["radial_power"] for r in done if part in r["kernels"]]
            if spectra and not (part == "change" and group.startswith("frozen")):
                mean = [sum(v) / len(v) for v in zip(*spectra)]
                axes.plot(done[0]["kernels"]["frequencies"], mean, color=colours[group], label=f"{group} ({len(spectra)})")
        if done and not start_drawn and group.startswith("bfr-adamw"):
            axes_pair[0].plot(done[0]["kernels"]["frequencies"], done[0]["kernels"]["start"]["radial_power"],
                              color="grey", linestyle="--", label="start W0 = m V0")  # fmt: skip
            start_drawn = True
    titles = ("learned kernels W (mean over seeds)", "what training changed, W - W0")
    for axes, title in zip(axes_pair, titles):
        axes.axhline(1.0, color="black", linewidth=0.5)
        axes.set(xlabel="radial frequency |f| (cycles/voxel)", ylabel="normalised power (all-pass = 1)", title=title)
        axes.set_yscale("log")
        _finish(axes)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=100)
    plt.close(figure)
    return paths


def _finish(axes) -> None:
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:  # nothing to label before the first run has data
        axes.legend(fontsize=8)


def write_report(work: Workdir, out: Path) -> dict[str, Any]:
    runs = [collect(work, spec) for spec in plan(work.protocol)]
    report = {
        "written": _now(),
        "protocol": dataclasses.asdict(work.protocol),
        "workdir": "WORKDIR: the --workdir of the invocations (default ./bfr-ablation)",
        "invocations": [work.portable(c) for c in _read_json(work.root / "invocations.json") or []],
        "machine": machine(),
        "figures": figure_names(out),
        "summary": summarise(runs),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(report, out.with_suffix(".json"))
    figures = plot(report, out)
    _write_text(markdown(report), out.with_suffix(".md"))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {', '.join(map(str, figures))}", file=sys.stderr)
    return report


# -- helpers and main ---------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _write_json(data: Any, path: Path) -> None:
    from repux.atomic import write_json

    write_json(data, path, overwrite=True)


def _write_text(text: str, path: Path) -> None:
    from repux.atomic import atomic_path

    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _interrupt(_signum: int, _frame: Any) -> None:
    """SIGTERM stops the harness like Ctrl-C: the running ``repux train`` is told to checkpoint."""
    raise KeyboardInterrupt


def _deadline(text: str | None) -> float | None:
    """The next time of day HH:MM (UTC) as a Unix time."""
    if text is None:
        return None
    try:
        hours, minutes = (int(v) for v in text.split(":"))
        now = datetime.datetime.now(datetime.timezone.utc)
        at = now.replace(hour=hours, minute=minutes, second=0, microsecond=0)
    except ValueError:
        sys.exit(f"--stop-at {text!r}: expected HH:MM (UTC)")
    return (at if at > now else at + datetime.timedelta(days=1)).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "bfr-ablation", help="runs and data (default ./bfr-ablation)")
    parser.add_argument("--out", type=Path, help="report path without ending (default benchmarks/results/bfr_ablation)")
    parser.add_argument("--quick", action="store_true", help="tiny data and network, 4 runs of 4 iterations (a smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of every arm (default 0 1 2)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, help="arms to run (default all three)")
    parser.add_argument("--alphas", type=float, nargs="+", help="other alphas for bfr-adamw (default 0.25 4)")
    parser.add_argument("--iterations", type=int, help="most iterations per run (default 2400)")
    parser.add_argument("--patience", type=int, help="stop a run after this many iterations without a better validation (600)")
    parser.add_argument("--stop-at", metavar="HH:MM", help="stop cleanly at this time (UTC), then report")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report what exists")
    args = parser.parse_args()

    protocol = dataclasses.replace(QUICK) if args.quick else Protocol()
    for option in ("seeds", "arms", "alphas", "iterations", "patience"):
        if getattr(args, option) is not None:
            setattr(protocol, option, getattr(args, option))
    work = Workdir(args.workdir.resolve(), protocol)
    work.check_protocol()
    out = args.out or (work.root / "report" if args.quick else RESULTS)
    adopt_recorded(work, out.with_suffix(".json"))
    if not args.report_only:
        invocations = _read_json(work.root / "invocations.json") or []
        _write_json(invocations + [shlex.join(["python", "benchmarks/bfr_ablation.py", *sys.argv[1:]])],
                    work.root / "invocations.json")  # fmt: skip
        signal.signal(signal.SIGTERM, _interrupt)
        deadline = _deadline(args.stop_at)
        work.make_data()
        try:
            for spec in plan(protocol):
                run = work.run_dir(spec)
                if recorded_run(work, spec) is not None:
                    continue
                if not take_run(run):
                    print(f"== {spec.name}: another harness holds it; next run", file=sys.stderr, flush=True)
                    continue
                try:
                    if not training_finished(bundle_provenance(run), protocol):
                        train_run(work, spec, deadline)
                    provenance = bundle_provenance(run)
                    evaluation = _read_json(run / "evaluation.json")
                    if training_finished(provenance, protocol) and (evaluation or {}).get("bundle_created") != provenance["created"]:
                        print(f"== {spec.name}: scoring on the test phantoms", file=sys.stderr, flush=True)
                        evaluate_run(work, spec)
                finally:
                    release_run(run)
        except (Stop, KeyboardInterrupt):
            print("== stopped; unfinished runs resume on the next start", file=sys.stderr, flush=True)
    write_report(work, out)


if __name__ == "__main__":
    main()
