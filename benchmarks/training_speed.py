"""Seconds per training step of natural training, vanilla IBP, fast (during warmup) and CROWN-IBP
with and without loss fusion.

    python benchmarks/training_speed.py [--models cnn-small,cnn7] [--width W] [--dataset cifar10|mnist]
                                        [--batch-size 128] [--repeats 5] [--inner 10]
                                        [--device cpu|cuda] [--compile]

Every method trains the same model on the same batch (random pixels, real shapes) with the
same optimiser; ratios are to natural training, measured in one run, for each model of
``--models`` in turn (default cnn-small: full CNN-7's CROWN-IBP steps take seconds each on a
CPU; ``--width``: cnn7's channel multiplier). CROWN-IBP's fused loss bounds
the cross-entropy with one backward row per sample, the unfused one the K−1 margins
(certkit/train/loss_fusion.py). The paper (CNN-7,
CIFAR-10, one RTX 2080 Ti, per epoch) reports vanilla IBP 1.83× and fast-during-warmup 2.13×
natural training.

With ``--compile`` every step is timed a second time compiled as ``certkit train`` compiles
it (``torch.compile``, with CUDA graphs on a GPU; natural: the model's forward; the bound
methods: the step's whole loss), after untimed steps that compile it.
"""

from __future__ import annotations

import argparse

import torch
from timing import natural_step, timeit  # benchmarks/timing.py

from certkit.device import resolve_device
from certkit.train.loop import Splits, Trainer, config_from
from certkit.train.models import DATASETS, model_label

# the timed training methods: config overrides, label
METHODS = {
    "vanilla": (dict(method="vanilla"), "vanilla IBP"),
    "fast": (dict(method="fast"), "fast (warmup, regularisers)"),
    "crown-ibp": (dict(method="crown-ibp", loss_fusion=True), "CROWN-IBP fused (ramp)"),
    "crown-ibp-unfused": (dict(method="crown-ibp", loss_fusion=False), "CROWN-IBP unfused (ramp)"),
}


def time_model(model: str, width: int | None, args: argparse.Namespace,
               device: torch.device) -> dict[tuple[str, bool], float]:
    """Seconds per step of natural training and of every method of :data:`METHODS` on ``model``,
    keyed by (method, compiled)."""
    info = DATASETS[args.dataset]
    torch.manual_seed(0)
    n = args.batch_size * 4
    fake = (torch.randint(0, 256, (n, *info.shape), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    splits = Splits(fake, fake, fake)
    eps_max = 8 / 255 if args.dataset == "cifar10" else 0.4
    variants = [False, True] if args.compile else [False]
    trainers = {(m, c): Trainer(config_from(None, dataset=args.dataset, model=model, width=width, eps=eps_max,
                                            batch_size=args.batch_size, device=args.device, compile=c, **kw),
                                splits)
                for c in variants for m, (kw, _) in METHODS.items()}
    x, y = trainers["fast", False].batch(torch.arange(args.batch_size))

    eps = eps_max / 2  # mid-ramp: the regularisers (fast) and the CROWN mixing (crown-ibp) are active
    times = {}
    for c in variants:
        times["natural", c] = timeit(natural_step(trainers["vanilla", c], x, y, compile=c), args.repeats, device,
                                     inner=args.inner)
        for m in METHODS:
            tr = trainers[m, c]
            times[m, c] = timeit(lambda tr=tr: tr.step(x, y, eps, epoch=1), args.repeats, device, inner=args.inner)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn-small", help="comma-separated, timed one after the other")
    ap.add_argument("--width", type=int, help="cnn7's channel multiplier (default 64, the paper's)")
    ap.add_argument("--dataset", default="cifar10", choices=["mnist", "cifar10"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=10, help="consecutive steps per timing, as in an epoch")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd steps")
    args = ap.parse_args()
    device = resolve_device(args.device)
    label = {"natural": "natural", **{m: text for m, (_, text) in METHODS.items()}}
    for model in args.models.split(","):
        width = args.width if model == "cnn7" else None
        times = time_model(model, width, args, device)
        print(f"torch {torch.__version__}, {device}, {model_label(model, width=width)} on {args.dataset}-shaped "
              f"batches of {args.batch_size}")
        for c in [False, True] if args.compile else [False]:
            if args.compile:
                print("compiled (torch.compile)" if c else "eager")
            for (name, cc), t in times.items():
                if cc == c:
                    print(f"  {label[name]:30s} {t * 1e3:9.1f} ms/step   {t / times['natural', False]:6.2f}x natural"
                          + (f"   {t / times['natural', True]:6.2f}x compiled natural" if c else ""))
            print(f"  loss fusion: CROWN-IBP step {times['crown-ibp-unfused', c] / times['crown-ibp', c]:.2f}x "
                  "faster than unfused")
    print("paper (CNN-7, CIFAR-10, RTX 2080 Ti, per epoch): vanilla IBP 1.83x, fast during warmup 2.13x")


if __name__ == "__main__":
    main()
