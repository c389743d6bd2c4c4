"""The training loop: from curated cases and a starting point to a validated model bundle.

One :func:`train` call does everything ``repux train`` promises: checks every case before
anything starts, splits them, builds (or loads and re-heads) the network, trains with the
chosen update rule, validates every ``val_every`` iterations, keeps the best network,
writes checkpoints atomically every ``checkpoint_interval`` iterations (and when cancelled),
resumes from them, and exports the best network as a bundle with its provenance.
"""

from __future__ import annotations

import datetime
import json
import math
import shlex
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from repux import __version__
from repux.bundle import BundleMetadata, save_bundle
from repux.bundle.store import check_output_folder
from repux.data.cases import check_cases, load_cases
from repux.errors import InputError
from repux.imageio import read_volume
from repux.progress import Progress
from repux.train.checkpoint import (
    CHECKPOINT_FILE,
    clear_run_files,
    load_best_weights,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_best_weights,
    save_checkpoint,
)
from repux.train.config import TrainConfig
from repux.train.dataset import PatchSampler, VolumeCache
from repux.train.distributed import (
    DistributedContext,
    average_buffers,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    shutdown_distributed,
    weights_digest,
)
from repux.train.fft_conv import use_fft_kernels
from repux.train.model_setup import StartingPoint, resolve_labels, start_from_bundle, start_from_scratch
from repux.train.optimizers import make_optimizer, network_alpha, prepare_fresh_network
from repux.train.preprocessing import prepare_case
from repux.train.splits import split_cases
from repux.train.validation import ValidationResult, validate

#: Labels of a network trained from scratch when none are given (the phantoms' and 3D UX-Net's FLARE order).
DEFAULT_LABELS = "flare"
#: Which mean selects the best model (documented in the bundle's provenance).
SELECTION = "mean validation Dice over the organs, background excluded"
#: Settings a resumed run must share with the checkpoint (others, e.g. --iterations, may change).
RESUME_KEYS = (
    "network_config",
    "architecture",
    "labels",
    "source",
    "optimizer",
    "lr",
    "weight_decay",
    "alpha",
    "preprocessing",
    "batch_size",
    "samples_per_volume",
    "seed",
    "train_cases",
    "val_cases",
    "world_size",
)


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        bundle: the exported bundle folder.
        iterations: iterations trained in total (resumed ones included).
        best_iteration: iteration whose network was exported.
        validation: the exported network's validation record (None without validation cases).
        history: one record per validation: iteration, loss, mean (organs), mean_with_background,
            per_label (name -> Dice).
        stopped_early: training ended before ``iterations`` because the validation Dice had
            not improved for ``patience`` iterations.
    """

    bundle: Path
    iterations: int
    best_iteration: int
    validation: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def train(config: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Run (or resume) the training that ``config`` describes; see the module docstring.

    Raises:
        InputError: unusable options, data or starting bundle, named in the message; nothing
            has been trained or written then.
        FileExistsError: the output bundle exists (without ``force``), or the work dir holds
            a checkpoint and neither ``resume`` nor ``force`` was given.
        KeyboardInterrupt: cancelled (Ctrl-C or SIGTERM); a checkpoint was written first.
    """
    context, device = init_distributed(config.device)
    progress = progress if progress is not None else Progress("none")
    if not context.is_main:
        progress = Progress("none")
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        # cuDNN's autotuner picks algorithms by timing, so it is on only when determinism is not asked for.
        torch.backends.cudnn.benchmark = not config.deterministic
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        return _Run(config, context, device, progress).run()
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        shutdown_distributed(context)


class _Run:
    def __init__(self, config: TrainConfig, context: DistributedContext, device: torch.device, progress: Progress) -> None:
        self.config = config
        self.context = context
        self.device = device
        self.progress = progress
        self.autocast = device.type == "cuda"

    # -- set-up ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        config = self.config
        check_output_folder(config.output, config.force)
        self._check_workdir()
        self.progress.stage("prepare")
        cases = load_cases(config.data_dir)
        self.start = start = self._starting_point()
        self._check_cases(cases, len(start.labels))
        self.train_cases, self.val_cases = split_cases(
            cases, config.val_fraction, config.folds, config.fold, seed=config.seed
        )
        self.all_cases = cases
        self.preprocessing = self._preprocessing(start)
        self.network = start.network
        self.alpha = config.alpha if config.alpha is not None else network_alpha(self.network)
        if start.from_scratch:
            prepare_fresh_network(self.network, config.optimizer, self.alpha)
        if config.kernel_conv == "fft" or (config.kernel_conv == "auto" and self.device.type == "cpu"):
            use_fft_kernels(self.network)
        self.network.to(self.device)
        self.optimizer = make_optimizer(self.network, config.optimizer, config.lr, config.weight_decay, self.alpha)
        self.model: nn.Module = self.network
        if self.context.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.network, device_ids=ids)
        self.cache = VolumeCache(self._load_case, int(config.cache_mb * 2**20))
        intensity = self.preprocessing["intensity"]
        self.sampler = PatchSampler(
            self.cache,
            self.train_cases,
            self.preprocessing["patch_size"],
            config.batch_size,
            config.samples_per_volume,
            seed=config.seed,
            rank=self.context.rank,
            world_size=self.context.world_size,
            pad_value=float(min(intensity["b_min"], intensity["b_max"])),
        )
        self.loss_function = DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)
        self._restore_or_start()
        try:
            self._loop()
        except KeyboardInterrupt:
            self._on_cancel()
            raise
        return self._export()

    def _check_workdir(self) -> None:
        config = self.config
        has_checkpoint = (Path(config.workdir) / CHECKPOINT_FILE).exists()
        if has_checkpoint and not config.resume and not config.force:
            raise FileExistsError(
                f"{config.workdir}: holds a checkpoint of an earlier run; use --resume to continue it "
                "or --force to start over"
            )

    def _starting_point(self) -> StartingPoint:
        config = self.config
        labels = resolve_labels(config.labels) if config.labels is not None else None
        if config.model is not None:
            return start_from_bundle(config.model, labels)
        labels = labels if labels is not None else resolve_labels(DEFAULT_LABELS)
        return start_from_scratch(config.network, labels, config.seed, config.alpha)

    def _check_cases(self, cases: list[Any], n_labels: int) -> None:
        # Rank 0 reads every case once; the others raise the same error instead of re-reading.
        problem = None
        if self.context.is_main:
            try:
                summary = check_cases(cases, range(n_labels), self.progress)
                if summary.missing_labels:
                    names = [label.name for label in self.start.labels if label.value in summary.missing_labels]
                    self.progress.message(f"no case contains {', '.join(names)}: the model cannot learn them")
            except InputError as error:
                problem = str(error)
        problem = broadcast_object(self.context, problem)
        if problem is not None:
            raise InputError(problem)

    def _preprocessing(self, start: StartingPoint) -> dict[str, Any]:
        config = self.config
        preprocessing = json.loads(json.dumps(start.preprocessing))
        if config.spacing is not None:
            preprocessing["spacing"] = list(config.spacing)
        if config.patch_size is not None:
            preprocessing["patch_size"] = list(config.patch_size)
        return preprocessing

    def _load_case(self, case: Any):
        return prepare_case(read_volume(case.image), read_volume(case.label), self.preprocessing)

    def _fingerprint(self) -> dict[str, Any]:
        config = self.config
        network_config = {k: v for k, v in self.network.config.items()}
        return json.loads(
            json.dumps(
                {
                    "network_config": network_config,
                    "architecture": self.start.architecture,
                    "labels": [label.name for label in self.start.labels],
                    "source": self.start.source,
                    "optimizer": config.optimizer,
                    "lr": config.lr,
                    "weight_decay": config.weight_decay,
                    "alpha": self.alpha,
                    "preprocessing": self.preprocessing,
                    "batch_size": config.batch_size,
                    "samples_per_volume": config.samples_per_volume,
                    "seed": config.seed,
                    "train_cases": [case.case_id for case in self.train_cases],
                    "val_cases": [case.case_id for case in self.val_cases],
                    "world_size": self.context.world_size,
                }
            )
        )

    def _restore_or_start(self) -> None:
        config = self.config
        self.iteration = 0
        self.best_mean = -math.inf
        self.best_iteration = 0
        self.best_validation: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.saved_iteration = 0
        self.last_loss = math.nan
        Path(config.workdir).mkdir(parents=True, exist_ok=True)  # every rank writes into it
        state = load_checkpoint(config.workdir) if config.resume else None
        if state is None:
            if config.resume:
                self.progress.message(f"{config.workdir}: no checkpoint yet; starting from the beginning")
            elif self.context.is_main:
                # Only now, with every check passed: --force discards the earlier run.
                clear_run_files(config.workdir)
            barrier(self.context)
            return
        saved = json.loads(state["fingerprint"])
        current = self._fingerprint()
        changed = [key for key in RESUME_KEYS if saved.get(key) != current.get(key)]
        if changed:
            details = "; ".join(f"{key}: checkpoint {_short(saved.get(key))}, now {_short(current.get(key))}" for key in changed)
            raise InputError(
                f"{config.workdir}: the checkpoint was made with other settings ({details}); "
                "resume with the same settings, or use --force to start over"
            )
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        self.iteration = self.saved_iteration = int(state["iteration"])
        self.best_mean = float(state["best_mean"])
        self.best_iteration = int(state["best_iteration"])
        self.best_validation = json.loads(state["best_validation"]) if state["best_validation"] else None
        self.history = json.loads(state["history"])
        self.last_loss = float(state["last_loss"])
        self.progress.message(f"resuming from {config.workdir} at iteration {self.iteration}")

    # -- the loop --------------------------------------------------------------------
    def _validation_due(self) -> bool:
        due = self.iteration % self.config.val_every == 0 or self.iteration == self.config.iterations
        return bool(self.val_cases) and self.iteration > 0 and due

    def _patience_ran_out(self) -> bool:
        """True when the last validation came ``patience`` or more iterations after the best one."""
        patience = self.config.patience
        if patience is None or not self.history:
            return False
        return self.history[-1]["iteration"] - self.best_iteration >= patience

    def _loop(self) -> None:
        config = self.config
        total = config.iterations
        self.progress.stage("train", total, done=self.iteration)
        validated = self.history[-1]["iteration"] if self.history else 0
        if self._validation_due() and validated != self.iteration:
            # Resumed from a checkpoint written while this validation was running (a cancel).
            average_buffers(self.context, self.network)
            self._validate(self.last_loss)
        # A resumed run that had already stopped early stays stopped (unless --patience was raised).
        if self.iteration >= total or self._patience_ran_out():
            return
        started, started_at = time.monotonic(), self.iteration
        last_mean = self.history[-1]["mean"] if self.history else None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="repux-patches") as pool:
            upcoming: Future = pool.submit(self.sampler.batch, self.iteration)
            try:
                while self.iteration < total:
                    images, labels = upcoming.result()
                    if self.iteration + 1 < total:
                        upcoming = pool.submit(self.sampler.batch, self.iteration + 1)
                    self.last_loss = loss = self._step(images, labels)
                    self.iteration += 1
                    validating = self._validation_due()
                    saving = self.iteration % config.checkpoint_interval == 0 or self.iteration == total
                    if validating or saving:
                        average_buffers(self.context, self.network)
                    if validating:
                        last_mean = self._validate(loss)
                    stopping = validating and self._patience_ran_out()
                    if saving or stopping:
                        self._save_checkpoint()
                    rate = (time.monotonic() - started) / (self.iteration - started_at)
                    fields: dict[str, Any] = {"iteration": self.iteration, "loss": loss, "dice": last_mean}
                    if self.progress.mode == "jsonl":
                        fields["eta"] = rate * (total - self.iteration)
                    self.progress.update(self.iteration, **fields)
                    if stopping:
                        self.progress.message(
                            f"no better validation Dice for {config.patience} iterations (best at "
                            f"{self.best_iteration}); stopping at iteration {self.iteration}",
                            iteration=self.iteration,
                            stopped_early=True,
                        )
                        break
            finally:
                upcoming.cancel()

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(images)
        loss = self.loss_function(logits.float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {loss.item()} at iteration {self.iteration + 1}; lower --lr or check the data"
            )
        loss.backward()
        self.optimizer.step()
        value = loss.detach()
        if self.context.enabled:
            torch.distributed.all_reduce(value)
            value /= self.context.world_size
        return float(value)

    def _validate(self, loss: float) -> float | None:
        shard = self.val_cases[self.context.rank :: self.context.world_size]
        result = validate(
            self.network,
            shard,
            self.cache,
            [label.name for label in self.start.labels],
            self.preprocessing["patch_size"],
            self.device,
            sw_batch_size=int(self.start.inference.get("sw_batch_size", 4)),
            autocast=self.autocast,
            stitch_device=self._stitch_device,
        )
        if self.context.enabled:
            parts = gather_objects(self.context, (result.case_ids, result.dice))
            ids = [case_id for part_ids, _ in parts for case_id in part_ids]
            result = ValidationResult(ids, np.concatenate([dice for _, dice in parts]), result.label_names)
        record = {"iteration": self.iteration, "loss": loss, **result.to_json()}
        self.history.append(record)
        mean = result.mean if math.isfinite(result.mean) else -math.inf
        if mean > self.best_mean or self.best_validation is None:
            self.best_mean, self.best_iteration, self.best_validation = mean, self.iteration, record
            if self.context.is_main:
                save_best_weights(self.config.workdir, self.network.state_dict())
        per_label = ", ".join(f"{name} {value:.3f}" for name, value in result.by_name().items())
        self.progress.message(
            f"iteration {self.iteration}: validation Dice {result.mean:.4f} ({per_label}); "
            f"with background {result.mean_with_background:.4f}; best {self.best_mean:.4f} at {self.best_iteration}",
            iteration=self.iteration,
            validation=result.to_json(),
        )
        return record["mean"]

    def _stitch_device(self, shape: tuple[int, ...]) -> torch.device:
        if self.device.type != "cuda":
            return self.device
        free, _ = torch.cuda.mem_get_info(self.device)
        needed = (len(self.start.labels) + 2) * math.prod(shape) * 4
        return self.device if needed < 0.4 * free else torch.device("cpu")

    # -- checkpoints and the end -----------------------------------------------------
    def _save_checkpoint(self) -> None:
        if self.context.is_main:
            save_checkpoint(
                self.config.workdir,
                {
                    "model": self.network.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "iteration": self.iteration,
                    "last_loss": self.last_loss,
                    "best_mean": self.best_mean,
                    "best_iteration": self.best_iteration,
                    "best_validation": json.dumps(self.best_validation) if self.best_validation else "",
                    "history": json.dumps(self.history),
                    "rng": rng_state(),
                    "fingerprint": json.dumps(self._fingerprint()),
                    "config": json.dumps(self.config.to_json()),
                },
            )
        self.saved_iteration = self.iteration

    def _on_cancel(self) -> None:
        # Saving costs about one iteration's time, so a cancelled run loses nothing. (Under
        # torchrun every rank is being stopped: no collective operation can run any more, and
        # rank 0's BatchNorm statistics stand for all.)
        if self.iteration > self.saved_iteration:
            self._save_checkpoint()
        self.progress.message(
            f"cancelled at iteration {self.iteration}; continue with --resume (checkpoint in {self.config.workdir})",
            iteration=self.iteration,
        )

    def _export(self) -> TrainResult:
        config = self.config
        self.progress.stage("export")
        if self.context.enabled:
            # Every rank must end with the weights of the others; the files let anyone check.
            digest = weights_digest(self.network.state_dict())
            (Path(config.workdir) / f"weights-rank{self.context.rank}.sha256").write_text(digest + "\n")
            digests = gather_objects(self.context, digest)
            if len(set(digests)) != 1:
                raise RuntimeError(f"the ranks ended with different weights (digests {digests}); the run is not usable")
        exported_iteration = self.best_iteration if self.best_validation else self.iteration
        if self.context.is_main:
            if self.best_validation:
                self.network.load_state_dict(load_best_weights(config.workdir))
            save_bundle(self.network, self._metadata(exported_iteration), config.output, force=config.force)
        barrier(self.context)
        self.progress.finish(
            "done",
            bundle=str(config.output),
            iteration=self.iteration,
            best_iteration=exported_iteration,
            dice=self.best_validation["mean"] if self.best_validation else None,
        )
        return TrainResult(
            config.output,
            self.iteration,
            exported_iteration,
            self.best_validation,
            list(self.history),
            stopped_early=self._stopped_early(),
        )

    def _stopped_early(self) -> bool:
        return self.iteration < self.config.iterations and self._patience_ran_out()

    def _metadata(self, exported_iteration: int) -> BundleMetadata:
        config = self.config
        start = self.start
        network = {k: v for k, v in self.network.config.items() if k != "arch"}
        provenance: dict[str, Any] = {
            "source": f"repux train, started from {start.source}",
            "training_data": str(config.data_dir.resolve()),
            "training_cases": {
                "count": len(self.all_cases),
                "train": [case.case_id for case in self.train_cases],
                "validation": [case.case_id for case in self.val_cases],
                "split": (
                    {"folds": config.folds, "fold": config.fold}
                    if config.folds is not None
                    else {"val_fraction": config.val_fraction}
                ),
            },
            "optimizer": {
                "name": config.optimizer,
                "lr": config.lr,
                "weight_decay": config.weight_decay,
                "alpha": self.alpha,
                "batch_size": config.batch_size,
                "samples_per_volume": config.samples_per_volume,
                "processes": self.context.world_size,
            },
            "iterations": self.iteration,
            "exported_iteration": exported_iteration,
            "patience": config.patience,
            "stopped_early": self._stopped_early(),
            "selection": SELECTION if self.best_validation else "the last iteration (no validation cases)",
            "command": shlex.join(config.command) if config.command else "",
            "seed": config.seed,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "repux_version": __version__,
        }
        if start.head_mapping:
            provenance["head_mapping"] = start.head_mapping
        if self.best_validation:
            dice = {name: round(value, 6) for name, value in self.best_validation["per_label"].items()}
            if self.best_validation["mean"] is not None:
                dice["mean"] = round(self.best_validation["mean"], 6)
            provenance["validation_dice"] = dice
            if self.best_validation["mean_with_background"] is not None:
                provenance["validation_dice_with_background"] = round(self.best_validation["mean_with_background"], 6)
        name = config.name or config.output.name
        return BundleMetadata(
            name=name,
            architecture=start.architecture,
            network=network,
            labels=start.labels,
            description=(
                f"{start.architecture} trained by repux train ({config.optimizer}, {self.iteration} iterations) "
                f"on {len(self.train_cases)} cases of {config.data_dir.name}, from {start.source}"
            ),
            preprocessing=self.preprocessing,
            inference=dict(start.inference),
            provenance=provenance,
        )


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
