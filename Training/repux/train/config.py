"""What a training run does: one dataclass holding every choice, defaulting to the paper's recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repux.errors import InputError

#: Update rules ``--optimizer`` accepts.
#: ``bfr-adamw``: AdamW with the Bayesian frequency re-parameterization of the large kernels
#: (the method of the paper); ``adamw``: the same AdamW without the prior (ablation);
#: ``frozen-kernels``: what the published code effectively does (its large kernels are never
#: updated and are multiplied by the prior on every forward pass), for comparison only.
OPTIMIZERS = ("bfr-adamw", "adamw", "frozen-kernels")

#: How ``--kernel-conv`` evaluates the large depthwise kernels while training: "fft" (same
#: convolution, far cheaper gradients on a CPU), "direct" (torch's conv3d) or "auto" (FFT on
#: the CPU, direct on CUDA). See repux.train.fft_conv.
KERNEL_CONVS = ("auto", "fft", "direct")

#: Voxel spacing (mm, RAS x, y, z) and patch side (voxels) for training from scratch, per
#: network preset. "paper" is the paper's FLARE recipe; "small" trades resolution for CPU
#: speed (about 1.3 s per iteration on 2 cores; 64^3 at 2 mm costs 3 s, 96^3 14 s).
SCRATCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper": {"spacing": (1.0, 1.0, 1.2), "patch_size": (96, 96, 96)},
    "small": {"spacing": (4.0, 4.0, 4.0), "patch_size": (48, 48, 48)},
}


@dataclass
class TrainConfig:
    """Every choice of a training run. Defaults follow the paper's recipe.

    Starting point: ``model`` (a bundle path or name: fine-tune) or ``network`` (a preset of
    ``repux.network.NETWORK_PRESETS``: from scratch); exactly one. Fields left ``None``
    (labels, spacing, patch size, alpha) come from the bundle, or from
    :data:`SCRATCH_DEFAULTS` and the "flare" label preset when training from scratch.
    """

    data_dir: Path
    output: Path
    model: str | None = None
    network: str | dict[str, Any] | None = None  # a preset name, a config JSON file or a config dict
    labels: str | None = None  # a label preset name or a labels JSON file
    iterations: int = 60000
    val_every: int = 500
    patience: int | None = None  # stop after this many iterations without a better validation; None: never
    val_fraction: float = 0.2
    folds: int | None = None
    fold: int | None = None
    optimizer: str = "bfr-adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    alpha: float | None = None
    patch_size: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    batch_size: int = 1
    samples_per_volume: int = 2
    cache_mb: float = 2048.0
    device: str = "auto"
    seed: int = 0
    workdir: Path | None = None
    resume: bool = False
    checkpoint_every: int | None = None  # None: the validation interval
    deterministic: bool = True
    kernel_conv: str = "auto"
    force: bool = False
    name: str | None = None
    command: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.output = Path(self.output)
        if self.workdir is None:
            self.workdir = self.output.with_name(self.output.name + ".work")
        self.workdir = Path(self.workdir)
        if self.patch_size is not None:
            self.patch_size = _three(self.patch_size, int, "--patch-size")
        if self.spacing is not None:
            self.spacing = _three(self.spacing, float, "--spacing")
        self.validate()

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every if self.checkpoint_every is not None else self.val_every

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first option with an unusable value."""
        if (self.model is None) == (self.network is None):
            raise InputError("give exactly one of --model BUNDLE (fine-tune) or --network PRESET (from scratch)")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"--optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.kernel_conv not in KERNEL_CONVS:
            raise InputError(f"--kernel-conv {self.kernel_conv!r}; expected one of {', '.join(KERNEL_CONVS)}")
        positive_ints = {
            "--iterations": self.iterations,
            "--val-every": self.val_every,
            "--batch-size": self.batch_size,
            "--samples-per-volume": self.samples_per_volume,
            "--checkpoint-every": self.checkpoint_interval,
        }
        for option, value in positive_ints.items():
            if value < 1:
                raise InputError(f"{option} {value}; expected a whole number of at least 1")
        if self.patience is not None and self.patience < 1:
            raise InputError(f"--patience {self.patience}; expected a whole number of at least 1 (iterations)")
        for option, value in {"--lr": self.lr, "--cache-mb": self.cache_mb}.items():
            if not value > 0:
                raise InputError(f"{option} {value}; expected a number above 0")
        if self.weight_decay < 0:
            raise InputError(f"--weight-decay {self.weight_decay}; expected 0 or more")
        if self.alpha is not None and not self.alpha > 0:
            raise InputError(f"--alpha {self.alpha}; expected a number above 0")
        if (self.folds is None) != (self.fold is None):
            raise InputError("--folds K and --fold i go together; give both or neither")
        if self.folds is not None:
            if self.folds < 2:
                raise InputError(f"--folds {self.folds}; expected 2 or more")
            if not 0 <= self.fold < self.folds:
                raise InputError(f"--fold {self.fold}; expected 0 to {self.folds - 1} for --folds {self.folds}")
        elif not 0 <= self.val_fraction < 1:
            raise InputError(f"--val-fraction {self.val_fraction}; expected at least 0 and below 1")
        if self.patch_size is not None and any(p < 32 or p % 16 for p in self.patch_size):
            # 16 would leave the bottleneck a single voxel, which instance norm cannot train on.
            raise InputError(
                f"--patch-size {list(self.patch_size)}; expected multiples of 16 (the network halves 4 times), "
                "at least 32"
            )
        if self.spacing is not None and any(not s > 0 for s in self.spacing):
            raise InputError(f"--spacing {list(self.spacing)}; expected three sizes in mm above 0")

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON-able values (paths as strings)."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = list(value)
        return data


def _three(value: Any, kind: type, option: str) -> tuple:
    values = [value] if isinstance(value, (int, float)) else list(value)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise InputError(f"{option} {values}; expected one or three numbers")
    try:
        return tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{option} {values}; expected numbers") from None
