"""``repux train``: train or fine-tune a RepUX-Net on curated cases and export a model bundle.

Defaults follow the paper's recipe (BFR-AdamW lr 1e-4, weight decay 0.01, 1 volume x 2
patches of 96^3 per step, DiceCE, validation every 500 iterations); the same command runs
data-parallel under ``torchrun --nproc_per_node N``.
"""

from __future__ import annotations

import argparse
import sys

from repux.options import DEVICE_HELP
from repux.progress import PROGRESS_HELP, PROGRESS_MODES
from repux.train.config import KERNEL_CONVS, OPTIMIZERS

HELP = "train or fine-tune a model on curated cases (BFR-AdamW, checkpoints, resume, torchrun)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data_dir",
        metavar="DATA_DIR",
        help="curated cases: a folder with an MSD-style dataset.json (as make-phantoms writes) or "
        "nnU-Net imagesTr/labelsTr, NIfTI or NRRD",
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT_BUNDLE", help="bundle folder to write")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--model", metavar="BUNDLE", help="fine-tune this bundle (folder, or 'demo')")
    start.add_argument(
        "--network",
        metavar="PRESET",
        help="train from scratch: 'paper' (the published widths), 'small' (CPU-sized) or a network config .json",
    )
    parser.add_argument(
        "--labels",
        metavar="PRESET|JSON",
        help="output labels: flare, flare21, amos or a labels .json (default: the bundle's; 'flare' from "
        "scratch). Fine-tuning to other labels gets a new output head; labels of the same name keep their weights",
    )
    parser.add_argument("--iterations", type=int, default=60000, metavar="N", help="training iterations (default 60000)")
    parser.add_argument("--val-every", type=int, default=500, metavar="N", help="validate every N iterations (default 500)")
    parser.add_argument(
        "--patience",
        type=int,
        metavar="N",
        help="stop early when the validation Dice (organ mean) has not improved for N iterations (default: never)",
    )
    split = parser.add_argument_group("validation split (cases shuffled by --seed)")
    split.add_argument(
        "--val-fraction", type=float, default=0.2, metavar="F", help="hold out this fraction of the cases (default 0.2; 0: none)"
    )
    split.add_argument("--folds", type=int, metavar="K", help="k-fold cross-validation: K folds ...")
    split.add_argument("--fold", type=int, metavar="I", help="... validating on fold I (0-based)")
    parser.add_argument(
        "--optimizer",
        default="bfr-adamw",
        choices=OPTIMIZERS,
        help="bfr-adamw (default: AdamW with the frequency prior on the large kernels), adamw (no prior, "
        "ablation) or frozen-kernels (emulates the published code, whose large kernels never train)",
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4, no schedule)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay (default 0.01)")
    parser.add_argument("--alpha", type=float, metavar="A", help="the prior's alpha, m = A/(d+A) (default: the network's, 1)")
    parser.add_argument(
        "--patch-size", type=int, nargs="+", metavar="N", help="patch side(s), multiples of 16, at least 32 (default: the bundle's; 96 paper, 48 small)"
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="MM",
        help="voxel spacing x y z in mm (default: the bundle's; 1.0 1.0 1.2 paper, 4 4 4 small)",
    )
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="volumes per step (default 1)")
    parser.add_argument(
        "--samples-per-volume", type=int, default=2, metavar="N", help="patches per volume, 1:1 foreground/background (default 2)"
    )
    parser.add_argument(
        "--cache-mb", type=float, default=2048, metavar="MB", help="memory for preprocessed cases (default 2048; least used dropped)"
    )
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, split and sampling (default 0)")
    parser.add_argument("--workdir", metavar="DIR", help="checkpoints (default: OUTPUT_BUNDLE.work beside the bundle)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the work dir")
    parser.add_argument(
        "--checkpoint-every", type=int, metavar="N", help="write a checkpoint every N iterations (default: --val-every)"
    )
    parser.add_argument(
        "--kernel-conv",
        default="auto",
        choices=KERNEL_CONVS,
        help="large kernels by fft (same result, much faster gradients on a CPU), direct, or auto "
        "(default: fft on the CPU, direct on CUDA)",
    )
    parser.add_argument(
        "--nondeterministic", action="store_true", help="let cuDNN pick the fastest (non-deterministic) algorithms"
    )
    parser.add_argument("--name", help="model name in the bundle (default: the output folder's name)")
    parser.add_argument(
        "--progress", default="bar", choices=PROGRESS_MODES, help=PROGRESS_HELP
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing output bundle and discard an earlier run's checkpoint"
    )


def run(args: argparse.Namespace) -> int:
    from repux.progress import Progress

    progress = Progress(args.progress)
    with progress.reporting_outcome():
        return _run(args, progress)


def _run(args: argparse.Namespace, progress) -> int:
    import os

    # Deterministic cuBLAS needs this before CUDA starts; harmless on the CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from repux.train import TrainConfig, train

    config = TrainConfig(
        data_dir=args.data_dir,
        output=args.output,
        model=args.model,
        network=args.network,
        labels=args.labels,
        iterations=args.iterations,
        val_every=args.val_every,
        patience=args.patience,
        val_fraction=args.val_fraction,
        folds=args.folds,
        fold=args.fold,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        alpha=args.alpha,
        patch_size=args.patch_size,
        spacing=args.spacing,
        batch_size=args.batch_size,
        samples_per_volume=args.samples_per_volume,
        cache_mb=args.cache_mb,
        device=args.device,
        seed=args.seed,
        workdir=args.workdir,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        deterministic=not args.nondeterministic,
        kernel_conv=args.kernel_conv,
        force=args.force,
        name=args.name,
        command=["repux", *sys.argv[1:]],
    )
    result = train(config, progress)
    if args.progress == "bar":
        summary = f"wrote {result.bundle} ({result.iterations} iterations"
        if result.validation is not None and result.validation.get("mean") is not None:
            summary += f", validation Dice {result.validation['mean']:.4f} at iteration {result.best_iteration}"
        print(summary + ")", file=sys.stderr)
    return 0
