"""Benchmark: lambda_max and FlatnessMonitor overhead, side by side in one run.

Part 1: lambda_max to 1e-3 relative accuracy on a ~100k-parameter MLP and a small CNN (and with
``--problems resnet20``, ResNet-20 on CIFAR-shaped data), one probe batch of 256 samples: Hessian-vector products
and wall time of our ARPACK and Lanczos, our power iteration, PyHessian's power iteration and hessian-eigenthings'
Lanczos and power iteration (when installed: ``pip install pyhessian hessian-eigenthings``). The reference value is
ARPACK at tol=1e-10; every method's actual relative error is printed, since a power iteration that stops when two
iterates agree to 1e-3 may be further than 1e-3 from the truth.

Part 2: FlatnessMonitor at its default settings on the MNIST-MLP config (784-256-128-10, batch 128, SGD)
against the same training without it, interleaved, best of ``--repeats``, ``--epochs`` epochs each. The
images are random bytes in MNIST's real IDX format and size (the cost does not depend on pixel values).

Usage: python scripts/bench_curvature.py [--epochs 10] [--repeats 3] [--skip-overhead]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from lightning_landscape import FlatnessMonitor, Objective
from lightning_landscape.curvature import hessian_eigenvalues
from lightning_landscape.examples import MLP, CifarResNet, SmallCNN
from scripts.common import mnist_mlp, side_by_side, write_synthetic_mnist


def problems(names: list[str]) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x_cifar = torch.randn(256, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    build = {
        "mlp-102k": lambda: (MLP(784, 10, hidden=[120, 60]), torch.randn(256, 784, generator=g), y),
        "cnn-bn": lambda: (
            SmallCNN(in_channels=3, num_classes=10, channels=(16, 32), batch_norm=True).eval(),
            x_cifar,
            y,
        ),
        "resnet20": lambda: (CifarResNet(depth=20, num_classes=10).eval(), x_cifar, y),  # 272k, BatchNorm in eval
    }
    return {name: build[name]() for name in names}


def timed(fn, repeats: int = 3):
    """``fn()`` and its best wall time of ``repeats`` runs (the machine is noisy)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
STEPS = (5, 10, 15, 20, 30, 40, 60, 80)  # Lanczos steps, for hessian-eigenthings' fixed-length Lanczos


def at_accuracy(run, ref: float, target: float = 1e-3, settings: tuple = TOLS) -> dict:
    """The loosest setting (tolerance, or Lanczos steps) whose actual relative error is <= target: value, error,
    products, seconds."""
    for tol in settings:
        (value, hvp), seconds = timed(lambda tol=tol: run(tol))
        error = abs(value - ref) / abs(ref)
        if error <= target:
            break
    return dict(tol=tol, value=value, rel_error=error, hvp=hvp, seconds=seconds)


def eigenthings_runners(net, x, y) -> dict:
    """hessian-eigenthings 1.0 as its README shows it: a ``HessianOperator`` on a loader of the probe batch, then
    ``lanczos(k=1, which="LA")`` with a number of steps (it runs exactly ``max_iter``), or ``power_iteration_one``
    to a tolerance."""
    try:
        import hessian_eigenthings as he
    except ImportError:
        print("hessian-eigenthings not installed: pip install hessian-eigenthings", file=sys.stderr)
        return {}
    op = he.HessianOperator(net, [(x, y)], he.supervised_loss(F.cross_entropy))
    count = [0]
    matvec = op.matvec

    def counting(v):
        count[0] += 1
        return matvec(v)

    op.matvec = counting

    def lanczos(steps: int) -> tuple[float, int]:
        count[0] = 0
        res = he.lanczos(op, k=1, max_iter=steps, which="LA", seed=0)
        return float(res.eigenvalues[0]), count[0]

    def power(tol: float) -> tuple[float, int]:
        count[0] = 0
        value = he.power_iteration_one(op, max_iter=1000, tol=tol, seed=0)[0]
        return float(value), count[0]

    return {"eigenthings: lanczos": (lanczos, STEPS), "eigenthings: power": (power, TOLS)}


def pyhessian_runner(net, x, y):
    try:
        from pyhessian import hessian as pyhessian
    except ImportError:
        print("PyHessian not installed: pip install pyhessian", file=sys.stderr)
        return None
    module = sys.modules["pyhessian.hessian"]  # the module (the package exports a class of the same name)
    original = module.hessian_vector_product

    def run(tol: float) -> tuple[float, int]:
        count = [0]

        def counting(*args, **kwargs):
            count[0] += 1
            return original(*args, **kwargs)

        module.hessian_vector_product = counting
        torch.manual_seed(0)
        try:
            comp = pyhessian(net, nn.CrossEntropyLoss(), data=(x, y), cuda=False)  # builds the gradient graph
            values, _ = comp.eigenvalues(maxIter=1000, tol=tol, top_n=1)
        finally:
            module.hessian_vector_product = original
            net.zero_grad(set_to_none=True)
        return values[0], count[0]

    return run


def ours(obj: Objective, method: str):
    def run(tol: float) -> tuple[float, int]:
        res = hessian_eigenvalues(obj, tol=tol, method=method, max_iter=1000 if method == "power" else None)
        return float(res.eigenvalues[0]), res.n_hvp

    return run


def bench_lambda_max(names: list[str]) -> list[dict]:
    rows = []
    for name, (net, x, y) in problems(names).items():
        n_params = sum(p.numel() for p in net.parameters())
        obj = Objective(net, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        ref = float(hessian_eigenvalues(obj, tol=1e-10, method="arpack").eigenvalues[0])

        runners = {f"ours: {m}": (ours(obj, m), TOLS) for m in ("lanczos", "arpack", "power")}
        pyhessian = pyhessian_runner(net, x, y)
        if pyhessian is not None:
            runners["PyHessian: power"] = (pyhessian, TOLS)
        runners.update(eigenthings_runners(net, x, y))
        for label, (run, settings) in runners.items():
            run(settings[0])  # warm-up
            rows.append(dict(problem=name, params=n_params, method=label, **at_accuracy(run, ref, settings=settings)))
    return rows


def bench_overhead(epochs: int, repeats: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_mnist(tmp)
        return side_by_side(tmp, mnist_mlp, lambda: [FlatnessMonitor(progress=False)], epochs, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--problems", nargs="+", default=["mlp-102k", "cnn-bn"], help="also: resnet20")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    rows = bench_lambda_max(args.problems)
    print("lambda_max to 1e-3 relative accuracy (loosest tolerance that reaches it):")
    print(
        f"{'problem':9} {'params':>7} {'method':20} {'tol':>6} {'lambda_max':>10} {'rel.err':>8} {'HVPs':>5} {'s':>7}"
    )
    for r in rows:
        print(
            f"{r['problem']:9} {r['params']:7d} {r['method']:20} {r['tol']:6.3g} {r['value']:10.5f}"
            f" {r['rel_error']:8.1e} {r['hvp']:5d} {r['seconds']:7.3f}"
        )
    for problem in dict.fromkeys(r["problem"] for r in rows):
        by = {r["method"]: r for r in rows if r["problem"] == problem}
        for baseline in ("PyHessian: power", "eigenthings: lanczos", "eigenthings: power", "ours: power"):
            if baseline in by:
                ratio = by[baseline]["seconds"] / by["ours: lanczos"]["seconds"]
                print(f"{problem}: ours (Lanczos) is {ratio:.1f}x faster than {baseline} at equal accuracy")
    if not args.skip_overhead:
        plain, observed = bench_overhead(args.epochs, args.repeats)
        print(
            f"\nMNIST-MLP, {args.epochs} epochs: {plain:.2f} s without, {observed:.2f} s with FlatnessMonitor()"
            f" at defaults: overhead {100 * (observed / plain - 1):.1f}%"
        )


if __name__ == "__main__":
    main()
