"""``repux bench``: speed, memory and agreement of the optimized segmentation path vs the published one."""

from __future__ import annotations

import argparse

from repux.options import DEVICE_HELP

HELP = "benchmark segmentation: the published way vs the optimized path, speed, memory and agreement"


def _region(text: str) -> tuple[tuple[int, int], ...] | str:
    """``I0:I1,J0:J1,K0:K1`` (voxel index ranges of the CT) or 'all'."""
    if text == "all":
        return text
    try:
        ranges = tuple(tuple(int(v) for v in part.split(":")) for part in text.split(","))
    except ValueError:
        ranges = ()
    if len(ranges) != 3 or any(len(r) != 2 for r in ranges):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I0:I1,J0:J1,K0:K1 (voxel index ranges) or 'all'")
    if not all(0 <= first < last for first, last in ranges):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 <= start < stop along each axis")
    return ranges  # type: ignore[return-value]


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (for the report)."""
    import shlex

    from repux.bench.suite import region_text

    words = ["repux", "bench"] + (["--quick"] if args.quick else []) + (["--cpu-backends"] if args.cpu_backends else [])
    for model in args.model or []:
        words += ["--model", model]
    words += ["--device", args.device, "--seed", str(args.seed)]
    for option in ("timing_preset", "timing_region", "agreement_region", "patch_reps"):
        value = getattr(args, option)
        if value is not None:
            text = region_text(value) if isinstance(value, tuple) else str(value)
            words += [f"--{option.replace('_', '-')}", text]
    return " ".join(shlex.quote(word) for word in words)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced version (half-resolution CT, a four-window region timed, dense kernels only): "
        "about 4 minutes on 2 cores",
    )
    parser.add_argument(
        "--cpu-backends",
        action="store_true",
        help="also time and compare the optimized network on ONNX Runtime and OpenVINO (float32, OpenVINO's "
        "bfloat16, int8 dense convolutions); needs the cpu-backends extra",
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="BUNDLE",
        help="trained bundle (folder or shipped name) for agreement; repeatable (default: demo)",
    )
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    parser.add_argument(
        "--timing-preset",
        metavar="NAME",
        help="network preset timed with random weights (default: paper); 'none' to skip",
    )
    parser.add_argument(
        "--timing-region",
        type=_region,
        metavar="I0:I1,J0:J1,K0:K1",
        help="voxels of the CT for that timing, or 'all' (default on a CPU: a documented region; on a GPU: all)",
    )
    parser.add_argument(
        "--agreement-region",
        type=_region,
        default="all",
        metavar="I0:I1,J0:J1,K0:K1",
        help="voxels of the CT for agreement (default all)",
    )
    parser.add_argument(
        "--patch-reps", type=int, default=None, metavar="N", help="per-patch timings (default 3; 0 in --quick)"
    )
    parser.add_argument("--seed", type=int, default=0, help="phantom and random-weight seed (default 0)")
    parser.add_argument("--output", metavar="FILE.md", help="write the Markdown report there")
    parser.add_argument("--json", metavar="FILE.json", help="write every measurement as JSON there")
    parser.add_argument("--workdir", metavar="DIR", help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--force", action="store_true", help="replace existing --output/--json files")


def run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from repux.atomic import atomic_path, write_json
    from repux.bench.report import render_markdown
    from repux.bench.suite import FULL, QUICK, run_benchmark, summary_line
    from repux.bundle import load_bundle
    from repux.errors import InputError
    from repux.infer import resolve_device

    for target in (args.output, args.json):
        if target and Path(target).exists() and not args.force:
            raise FileExistsError(f"{target}: already exists; refusing to overwrite it (use --force)")
    if args.patch_reps is not None and args.patch_reps < 0:
        raise InputError(f"--patch-reps {args.patch_reps}: expected 0 or more")
    settings = QUICK if args.quick else FULL
    device = resolve_device(args.device)
    changes: dict = {"device": str(device), "seed": args.seed}
    if args.model:
        changes["models"] = tuple(args.model)
    for model in changes.get("models", settings.models):
        load_bundle(model)  # refuse a missing or broken bundle before any long work
    if args.timing_preset is not None:
        from repux.network import NETWORK_PRESETS

        if args.timing_preset != "none" and args.timing_preset not in NETWORK_PRESETS:
            raise InputError(
                f"--timing-preset {args.timing_preset}: expected one of {', '.join(NETWORK_PRESETS)} or none"
            )
        changes["timing_preset"] = None if args.timing_preset == "none" else args.timing_preset
    if args.timing_region is not None:
        changes["timing_region"] = None if args.timing_region == "all" else args.timing_region
    elif device.type == "cuda" and not args.quick:
        changes["timing_region"] = None  # a GPU runs the reference on the whole CT in minutes
    changes["agreement_region"] = None if args.agreement_region == "all" else args.agreement_region
    if args.patch_reps is not None:
        changes["patch_reps"] = args.patch_reps
    if args.cpu_backends:
        from repux.accel.backends import BACKENDS, backend_available
        from repux.bench.paths import CPU_BACKEND_PATHS

        missing = [name for name in BACKENDS if not backend_available(name)]
        if missing:
            raise InputError(
                f"--cpu-backends: {', '.join(missing)} (or onnx) not installed; pip install 'repux[cpu-backends]'"
            )
        changes["paths"] = settings.paths + CPU_BACKEND_PATHS
        changes["timing_paths"] = settings.timing_paths + CPU_BACKEND_PATHS
    settings = replace(settings, **changes)

    command = _command(args)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="repux-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run_benchmark(settings, work, command)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    markdown = render_markdown(results)
    if args.output:
        with atomic_path(args.output, overwrite=True) as temporary:
            Path(temporary).write_text(markdown, encoding="utf-8")
    if args.json:
        write_json(results, args.json)
    print(markdown if not args.output else f"report written to {args.output}")
    print(summary_line(results))
    return 0
