"""Time of one BFRAdamW step against one torch.optim.AdamW step on a RepUX-Net's parameters.

Both optimizers step the same network's parameters with the same (fixed, random) gradients,
alternating round by round so that machine load hits both alike; the median per-step time
and the fastest of each, and BFR's overhead by both, go to a JSON file (on a shared machine
the minimum and the median of paired per-round ratios are the steadier figures). With ``--patch N`` it also times one forward
and backward pass on a (2, 1, N, N, N) batch, to put the overhead in terms of a training
iteration (the training recipe's is 96).

    python benchmarks/bfr_optimizer_overhead.py --out bfr_overhead.json \
        [--device cuda] [--patch 96]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from repux.atomic import write_json
from repux.bfr import BFRAdamW, bfr_param_groups
from repux.network import NETWORK_PRESETS, build_network, large_kernel_convs
from repux.train.fft_conv import use_fft_kernels


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, action) -> float:
    _synchronize(device)
    start = time.perf_counter()
    action()
    _synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--preset", default="paper", choices=sorted(NETWORK_PRESETS), help="network widths")
    parser.add_argument("--out-chans", type=int, default=13, help="network output classes (13: 65.8M parameters)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer first")
    parser.add_argument("--patch", type=int, default=0, help="also time a forward+backward at this patch side (0: no)")
    parser.add_argument("--iterations", type=int, default=3, help="timed forward+backward passes (median)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    preset = dict(NETWORK_PRESETS[args.preset])
    model = build_network(preset.pop("arch"), **preset, out_chans=args.out_chans).to(device)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3

    optimizers = {
        "torch_adamw": torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01),
        "bfr_adamw": BFRAdamW(bfr_param_groups(model), lr=1e-4, weight_decay=0.01),
    }
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_index in range(args.warmup + args.rounds):
        for name, optimizer in optimizers.items():
            seconds = _timed(device, optimizer.step)
            if round_index >= args.warmup:
                times[name].append(seconds)

    medians = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}
    overhead = medians["bfr_adamw"] / medians["torch_adamw"] - 1
    results = {
        "benchmark": "BFRAdamW.step vs torch.optim.AdamW.step (same parameters and gradients)",
        "network": {**model.config, "parameters": sum(p.numel() for p in model.parameters())},
        "large_kernel_parameters": sum(conv.weight.numel() for _, conv in large_kernel_convs(model)),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "step_seconds_median": medians,
        "step_seconds_min": fastest,
        "step_seconds_all": times,
        "bfr_step_overhead_median": overhead,
        "bfr_step_overhead_min": fastest["bfr_adamw"] / fastest["torch_adamw"] - 1,
        # Each round's BFR step over the torch step just before it: load drift cancels.
        "bfr_step_overhead_paired_median": statistics.median(
            b / t - 1 for t, b in zip(times["torch_adamw"], times["bfr_adamw"])
        ),
    }
    if args.patch:
        batch = torch.randn(2, 1, args.patch, args.patch, args.patch, device=device)

        if device.type == "cpu":
            use_fft_kernels(model)  # as the trainer does on a CPU: same parameters, same optimizers

        def forward_backward() -> None:
            model(batch).float().mean().backward()

        forward_backward()  # warm-up (kernel selection, allocator)
        iteration = statistics.median(_timed(device, forward_backward) for _ in range(args.iterations))
        results["forward_backward_seconds_median"] = iteration
        results["bfr_overhead_per_iteration"] = (medians["bfr_adamw"] - medians["torch_adamw"]) / (
            iteration + medians["torch_adamw"]
        )
    write_json(results, args.out, overwrite=args.force)
    print(
        f"torch AdamW {medians['torch_adamw'] * 1e3:.1f} ms, BFRAdamW {medians['bfr_adamw'] * 1e3:.1f} ms "
        f"per step, median ({overhead:+.1%}); fastest {fastest['torch_adamw'] * 1e3:.1f} ms vs "
        f"{fastest['bfr_adamw'] * 1e3:.1f} ms ({results['bfr_step_overhead_min']:+.1%}); paired "
        f"{results['bfr_step_overhead_paired_median']:+.1%}; results in {args.out}"
    )


if __name__ == "__main__":
    main()
