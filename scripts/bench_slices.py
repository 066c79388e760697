"""Benchmark: throughput of a 51 x 51 loss plane, side by side in one run.

For each model (the quickstart MLP 2-32-32-4, the MNIST MLP 784-256-128-10, a small CNN with BatchNorm in
eval mode) on the same probe batch and the same two filter-normalized directions:

* ours: ``geometry.evaluate_slice`` (``Objective.losses``: ``torch.func.vmap`` over chunks of parameter vectors
  or a loop, whichever it measured faster on the first chunk, shown in brackets);
* a plain Python loop: copy each point into the model (``vector_to_parameters``) and run it;
* the ``loss-landscapes`` library's ``planar_interpolation`` over the same plane (``pip install loss-landscapes``;
  its ``random_plane`` draws its own directions, so the plane is given to it by three models). Its values are
  not compared point by point: version 3.0.6 walks alternate columns of the grid with an offset of one step
  (it adds ``dir_two`` before evaluating on even columns and after on odd ones), so its grid is not regular.

Achieved GFLOP/s use the forward FLOPs of one evaluation (``torch.utils.flop_counter``) times the points and
are set against a matmul measured in the same run (the first layer's matmul with all points of a chunk
stacked in the batch). For ``ours (affine)`` they are *effective* GFLOP/s: that path skips the first layer's
work per point (``geometry.slices.AffineInputLayers``), so it can exceed the matmul.

Usage: python scripts/bench_slices.py [--steps 51]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import lightning_landscape  # noqa: F401  (first)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_landscape import Objective
from lightning_landscape.examples import MLP, SmallCNN
from lightning_landscape.geometry import evaluate_slice, plane_coordinates, random_direction


def models() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "quickstart MLP": (MLP(2, 4, hidden=[32, 32]), torch.randn(256, 2, generator=g), torch.randint(0, 4, (256,))),
        "MNIST MLP": (
            MLP(784, 10, hidden=[256, 128]),
            torch.randn(256, 784, generator=g),
            torch.randint(0, 10, (256,)),
        ),
        "small CNN (BN)": (
            SmallCNN(1, 10, (16, 32)).eval(),
            torch.randn(64, 1, 28, 28, generator=g),
            torch.randint(0, 10, (64,)),
        ),
    }


def best_time(fn, repeats: int = 2):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def plain_loop(net: nn.Module, x, y, center: torch.Tensor, dirs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Each grid point built and copied into a model, then evaluated: what one writes without a library."""
    model = copy.deepcopy(net)
    out = []
    with torch.no_grad():
        for c in coords:
            nn.utils.vector_to_parameters(center + c @ dirs, model.parameters())
            out.append(F.cross_entropy(model(x), y))
    return torch.stack(out)


def loss_landscapes_plane(net: nn.Module, x, y, center, d1, d2, steps: int):
    import loss_landscapes
    import loss_landscapes.metrics

    def at(theta):
        model = copy.deepcopy(net)
        nn.utils.vector_to_parameters(theta, model.parameters())
        return model

    reach = 2 * steps / (steps - 1)  # it steps by (end - start) / steps and stops one step short of the end
    start = center - d1 - d2
    one, two = at(start + reach * d1), at(start + reach * d2)
    start = at(start)
    metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), x, y)
    return torch.as_tensor(loss_landscapes.planar_interpolation(start, one, two, metric, steps=steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=51)
    args = parser.parse_args()
    steps = args.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {steps}x{steps} plane\n")
    header = f"{'model':15} {'params':>7} {'method':16} {'seconds':>8} {'points/s':>9} {'GFLOP/s':>8} {'speed-up':>9}"
    print(header)
    for name, (net, x, y) in models().items():
        bench_model(name, net, x, y, steps)


def bench_model(name: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    n_params = sum(p.numel() for p in net.parameters())
    obj = Objective(net, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    center = obj.theta0
    d1, d2 = (random_direction(obj.layout, center, s) for s in (0, 1))
    axis = torch.linspace(-1, 1, steps)
    coords = plane_coordinates(axis, axis)
    points = center + coords @ torch.stack([d1, d2])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        F.cross_entropy(net(x), y)
    flops = counter.get_total_flops() * len(points)
    info: dict = {}
    ours, t_ours = best_time(lambda: evaluate_slice(obj, center, torch.stack([d1, d2]), coords, info=info))
    loop, t_loop = best_time(lambda: plain_loop(net, x, y, center, torch.stack([d1, d2]), coords))
    torch.testing.assert_close(ours, loop, rtol=1e-4, atol=1e-5)  # the same numbers
    method = "affine" if info["method"] == "affine" else obj.metadata["batching"]
    results = [(f"ours ({method})", t_ours), ("plain loop", t_loop)]
    try:
        other, t_ll = best_time(lambda: loss_landscapes_plane(net, x, y, center, d1, d2, steps), repeats=1)
        assert other.numel() == len(points)  # the same number of evaluations (see the module docstring)
        results.append(("loss-landscapes", t_ll))
    except ImportError:
        print("loss-landscapes not installed: pip install loss-landscapes", file=sys.stderr)
    for method, seconds in results:
        print(
            f"{name:15} {n_params:7d} {method:16} {seconds:8.3f} {len(points) / seconds:9.0f}"
            f" {flops / seconds / 1e9:8.2f} {seconds / t_ours:8.1f}x"
        )
    first = next(m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    if isinstance(first, nn.Linear):
        chunk = obj.chunk_size
        a = torch.randn(len(x) * chunk, first.in_features)
        w = torch.randn(first.in_features, first.out_features)
        _, t_mm = best_time(lambda: [a @ w for _ in range(20)])
        mm_flops = 20 * 2 * a.shape[0] * a.shape[1] * w.shape[1]
        print(
            f"{name:15} {'':7} {'matmul ' + 'x'.join(map(str, (*a.shape, w.shape[1]))):16} {t_mm:8.3f}"
            f" {'':9} {mm_flops / t_mm / 1e9:8.2f}"
        )
    print()


if __name__ == "__main__":
    main()
