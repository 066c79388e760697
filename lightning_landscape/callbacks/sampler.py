"""LandscapeSampler: slices, the trajectory's PCA plane and interpolation, at chosen moments of training.

Each trigger evaluates, on a fixed probe set (every rank holds all of it; the grid points are split over
DDP ranks and gathered, so 2 ranks compute the 1-process grid):

* a 1-D profile along a random filter-normalized direction ``d1`` (``line_points`` points in ``[-span, span]``);
* a 2-D slice on ``d1``, ``d2`` (``resolution`` x ``resolution``): a contour PNG, an interactive plotly
  surface and a W&B table of the grid;
* the PCA plane of the trajectory (snapshots of :class:`TrajectoryRecorder` when it runs, the sampler's own
  snapshots otherwise) around the current point, with the path drawn on it, the variance the plane explains,
  each snapshot's distance off the plane, and each snapshot's true loss next to the loss at its projection;
* the interpolation from the initial to the current parameters and its barrier.

Scalars (``landscape-slices/...``): ``center_loss``, ``barrier_init``, ``roughness`` (mean absolute
second difference of the 1-D profile, relative to the loss), ``pca_explained``, ``pca_max_off_plane``.
Every grid with its directions' seeds, ranges and BN mode goes to ``<run dir>/landscape/*.npz``.

Example::

    sampler = LandscapeSampler(every_n_epochs=5, slices={"resolution": 25, "span": 1.0})
    trainer = L.Trainer(callbacks=[TrajectoryRecorder(), sampler])
    ...
    sampler.run_now(trainer, model)   # on demand
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from typing_extensions import override

from lightning_landscape import distributed, sharding
from lightning_landscape.callbacks.base import LandscapeCallback
from lightning_landscape.checks import as_config, check_float, check_int
from lightning_landscape.geometry import (
    evaluate_slice,
    interpolate,
    pca_directions,
    plane_coordinates,
    random_direction,
)
from lightning_landscape.params import ParameterLayout
from lightning_landscape.probe import ProbeSpec
from lightning_landscape.report.logged import Logged
from lightning_landscape.report.plots import contour_figure, profile_figure, surface_figure

if TYPE_CHECKING:
    import lightning.pytorch as pl


#: the losses of the smallest slices (a 5-point profile and a 3 x 3 plane): the probe set is cut to what a trigger's
#: budget affords for this many
MIN_POINTS = 14


@dataclass
class SliceConfig:
    """The 1-D profile and the 2-D slice around the current point.

    Args:
        resolution: points per axis of the 2-D slice (the largest; the budget may choose fewer).
        span: the slices cover ``[-span, span]`` in units of the (filter-normalized) directions.
        line_points: points of the 1-D profile (the largest; the budget may choose fewer).
        normalization: ``"filter"``, ``"layer"``, ``"model"`` or ``None`` (see ``geometry.directions``).
        direction_seed: seed of ``d1`` (``d2`` uses ``direction_seed + 1``).
        memory_mb: memory for one chunk of grid points' parameter vectors.
    """

    resolution: int = 25
    span: float = 1.0
    line_points: int = 51
    normalization: str | None = "filter"
    direction_seed: int = 0
    memory_mb: float = 64.0

    def __post_init__(self) -> None:
        check_int("slices.resolution", self.resolution, minimum=2, example=25)
        check_int("slices.line_points", self.line_points, minimum=2, example=51)
        check_int("slices.direction_seed", self.direction_seed, minimum=0, example=0)
        check_float("slices.span", self.span, hint="e.g. `span=1.0` (in units of the filter norms).")
        check_float("slices.memory_mb", self.memory_mb, hint="e.g. `memory_mb=64`.")
        if self.normalization not in ("filter", "layer", "model", None):
            raise ValueError(
                f"`slices.normalization` must be 'filter', 'layer', 'model' or None, got {self.normalization!r}."
                " HINT: 'filter'."
            )


class LandscapeSampler(LandscapeCallback):
    """2-D and 1-D slices, the trajectory's PCA plane and the init-to-current interpolation.

    Args:
        every_n_steps: run every ``n`` optimizer steps (and :meth:`run_now` on demand).
        every_n_epochs: run at the end of every ``n``-th epoch.
        at_fit_end: run when training ends.
        slices: the 1-D profile and the 2-D slice (:class:`SliceConfig` or a dict of its fields: ``resolution``,
            ``span``, ``line_points``, ``normalization``, ``direction_seed``, ``memory_mb``).
        interpolation_steps: points on the init-to-current line.
        recompute_bn: recompute BatchNorm statistics along the interpolation.
        snapshot_every_n_steps: own snapshots for the PCA plane when no TrajectoryRecorder is present (with
            one, its snapshots are used and the sampler keeps none).
        max_snapshots: keep at most this many own snapshots (thinned by 2 when full; each is ``4 P`` bytes
            of CPU memory, and of the checkpoint: they are part of the callback's state, so a resumed run keeps
            its initial point and path).
        budget: the share of training time the triggers may take (default 4%, at least 10 s a trigger; see
            :class:`LandscapeCallback`). Anytime: one loss on the probe set is timed to size the 1-D profile (at most
            10% of the budget), the profile's points to size the 2-D slice (half of what is left), the slice's to
            size the PCA plane (70% of the rest) and the interpolation (the rest), each down to 5 line points, a
            3 x 3 plane and 3 interpolation points; the PCA plane and the interpolation are cut once the budget is
            spent; the slice's side is logged (``resolution``), and ``cut`` events name the sizes used and what was
            cut. When even the smallest slices (14 losses) on the whole probe set do not fit in the budget (a
            transformer on a CPU), the trigger uses the probe set's first batches only (``probe_fraction``).
        probe: the probe set and the energy, as for every callback (:class:`LandscapeCallback`); BatchNorm in
            ``"eval"`` mode unless ``probe.bn_mode`` says otherwise.
        progress: show a progress bar (rank 0).
        key_prefix: keys are ``<key_prefix>-slices/<name>``.
    """

    default_share = 0.04  # of training time (the floor: 10 s a trigger)
    name = "landscape"
    gathers_fsdp2 = True  # slices of the gathered parameters, the grid split over the ranks
    section = "slices"  # keys landscape-slices/..., files in <run dir>/slices/
    #: what it logs (the dashboard's panels)
    logged = Logged(
        scalars=(
            "center_loss",
            "probe_fraction",
            "barrier_init",
            "roughness",
            "pca_explained",
            "pca_max_off_plane",
            "resolution",
            "seconds",
            "budget_seconds",
            "skipped",
            "failures",
        ),
        media=("profile", "slice", "surface", "pca_plane", "interpolation"),
        tables=("grid", "pca_trajectory"),
    )
    shard_probe = False  # the grid is split over ranks instead
    needs_gradients = False  # losses only

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_fit_end: bool = True,
        slices: SliceConfig | dict | None = None,
        interpolation_steps: int = 25,
        recompute_bn: bool = False,
        snapshot_every_n_steps: int = 10,
        max_snapshots: int = 50,
        probe: ProbeSpec | dict | None = None,
        progress: bool = True,
        key_prefix: str = "landscape",
        budget: Any = "default",
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            at_fit_end=at_fit_end,
            probe=probe,
            progress=progress,
            key_prefix=key_prefix,
            budget=budget,
        )
        self.slices: SliceConfig = as_config(SliceConfig, slices, "slices")
        check_int("interpolation_steps", interpolation_steps, minimum=2, example=25)
        check_int("snapshot_every_n_steps", snapshot_every_n_steps, example=10)
        check_int("max_snapshots", max_snapshots, minimum=3, example=50)
        self.interpolation_steps, self.recompute_bn = interpolation_steps, recompute_bn
        self.snapshot_every_n_steps, self.max_snapshots = snapshot_every_n_steps, max_snapshots
        self.snapshots: list[tuple[int, torch.Tensor]] = []
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ own snapshots
    def _flat(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """All parameters, frozen ones too (as the recorder's snapshots), so that unfreezing keeps one layout."""
        full = sharding.full_parameters(pl_module)  # under FSDP2 gathered: every rank snapshots together
        return torch.cat([p.reshape(-1) for p in full.values()]).float().cpu()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.plan_memory(ParameterLayout.from_module(pl_module).numel, pl_module.device)

    def plan_memory(self, n_params: int, device: torch.device) -> None:
        """Before training: a trigger holds the center, two directions, a point and the working vectors of a chunk
        of grid points (at least 6 vectors of ``P`` entries on the device: refused with sizes and a fix when they
        do not fit); the own snapshots for the PCA plane (``4 P`` bytes each, in host memory) are capped at what
        fits in a quarter of the host's free memory (a warning says so), and refused below 3."""
        from lightning_landscape.curvature.memory import check_vectors, free_bytes

        check_vectors(
            6,
            n_params,
            self.probe.dtype,
            device,
            f"LandscapeSampler on {n_params:,} parameters",
            "slice a part of the model, or run on a device with more memory.",
        )
        fit = int(0.25 * free_bytes(torch.device("cpu")) // (4 * n_params))
        if fit < 3:
            raise MemoryError(
                f"LandscapeSampler keeps snapshots of all {n_params:,} parameters for its PCA plane (4 bytes each,"
                f" {4 * n_params / 2**30:.2f} GiB a snapshot), and fewer than 3 fit in a quarter of the host's free"
                " memory. HINT: add a TrajectoryRecorder (whose snapshots go to disk and are used instead)."
            )
        if fit < self.max_snapshots:
            warnings.warn(
                f"LandscapeSampler: {self.max_snapshots} snapshots of {n_params:,} parameters would take"
                f" {self.max_snapshots * 4 * n_params / 2**30:.1f} GiB of host memory; keeping at most {fit}."
                " HINT: add a TrajectoryRecorder, whose snapshots go to disk.",
                UserWarning,
                stacklevel=2,
            )
            self.max_snapshots = fit

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_landscape.callbacks.trajectory import TrajectoryRecorder

        super().on_train_start(trainer, pl_module)
        self._own_snapshots = TrajectoryRecorder.find(trainer) is None
        if not self.snapshots:
            self.snapshots.append((trainer.global_step, self._flat(pl_module)))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        own = getattr(self, "_own_snapshots", True)
        if own and step % self.snapshot_every_n_steps == 0 and (not self.snapshots or self.snapshots[-1][0] != step):
            self.snapshots.append((step, self._flat(pl_module)))
            if len(self.snapshots) > self.max_snapshots:
                self.snapshots = self.snapshots[:1] + self.snapshots[2::2]  # keep the initial point
        super().on_train_batch_end(trainer, pl_module, *args)

    def _trajectory(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, layout: ParameterLayout
    ) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """Snapshot steps, parameter vectors (T, P) and the initial vector, restricted to the parameters of
        ``layout`` (the objective's): the recorder's, or our own."""
        from lightning_landscape.callbacks.trajectory import TrajectoryRecorder
        from lightning_landscape.dynamics import TrajectoryStore

        recorder = TrajectoryRecorder.find(trainer)
        if recorder is not None and recorder.store_dir and trainer.is_global_zero:
            recorder.flush()
            store = TrajectoryStore.open(recorder.store_dir)
            stored = ParameterLayout(tuple(store.meta["names"]), tuple(torch.Size(s) for s in store.meta["shapes"]))
            steps = store.snapshot_steps
            if len(steps) >= 3:
                init = stored.select(torch.from_numpy(np.array(store.snapshot("init"))), layout)
                path = torch.stack([torch.from_numpy(np.array(store.snapshot(s))) for s in steps])
                return steps, stored.select(path, layout), init
        own = ParameterLayout.from_module(pl_module, trainable_only=False)
        if len(self.snapshots) < 3:
            return [], None, own.select(self.snapshots[0][1], layout) if self.snapshots else None
        path = own.select(torch.stack([t for _, t in self.snapshots]), layout)
        return [s for s, _ in self.snapshots], path, own.select(self.snapshots[0][1], layout)

    # ------------------------------------------------------------------ the analysis
    @override
    def stages(self) -> int:
        return 4

    def _grid(self, trainer: pl.Trainer, obj: Any, center: torch.Tensor, dirs: torch.Tensor, coords: torch.Tensor):
        rank, world = distributed.world(trainer.strategy)
        mine = distributed.shard(len(coords), rank, world)
        with self.stage(trainer, "grid"):
            local = evaluate_slice(obj, center, dirs, coords, points=mine, memory_mb=self.slices.memory_mb)
        return distributed.gather_rows(trainer.strategy, local).double().cpu().numpy()

    def _affordable(self, trainer: pl.Trainer, per_point: float, share: float, full: int, least: int) -> int:
        """How many points (``least`` to ``full``) fit in ``share`` of the trigger's time left at ``per_point``
        seconds a point (rank 0's decision, on every rank)."""
        fit = int(share * self.time_left() / max(per_point, 1e-9)) if math.isfinite(self.time_left()) else full
        return int(distributed.broadcast(trainer.strategy, min(full, max(least, fit))))

    def _timed_grid(self, trainer: pl.Trainer, obj: Any, center: torch.Tensor, dirs: torch.Tensor, coords: Any):
        """The grid and the seconds a point of it took (rank 0's clock: the ranks split the points)."""
        start = time.perf_counter()
        values = self._grid(trainer, obj, center, dirs, coords)
        return values, distributed.broadcast(trainer.strategy, (time.perf_counter() - start) / len(coords))

    @override
    def analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        # anytime: one loss is timed to size the profile (at most 10% of the budget), the profile's points to size
        # the plane (half of what is left), the plane's to size the PCA plane and the interpolation
        with self.stage(trainer, "directions"):
            obj = self.objective(trainer, pl_module)
            center = obj.theta0
            d1 = random_direction(obj.layout, center, self.slices.direction_seed, self.slices.normalization)
            d2 = random_direction(obj.layout, center, self.slices.direction_seed + 1, self.slices.normalization)
        with self.stage(trainer, "center"):
            start = time.perf_counter()
            center_loss = float(obj.loss())
            per_point = (time.perf_counter() - start) / distributed.world(trainer.strategy)[1]
        # the probe batches the smallest grids (5 line points and a 3 x 3 plane) afford in the time left
        n = len(obj.batches)
        used = self.affordable_probe(trainer, obj, per_point / n, MIN_POINTS, step)
        k = len(used.batches)
        if used is not obj:
            obj, per_point = used, per_point * k / n
            center_loss = float(obj.loss())
        sizes = {
            "line": self._affordable(trainer, per_point, 0.1, self.slices.line_points, min(5, self.slices.line_points))
        }
        line = torch.linspace(-self.slices.span, self.slices.span, sizes["line"], dtype=torch.float64)
        profile, per_point = self._timed_grid(trainer, obj, center, d1[None], line[:, None])
        sizes["resolution"] = resolution = int(
            self._affordable(trainer, per_point, 0.5, self.slices.resolution**2, min(9, self.slices.resolution**2))
            ** 0.5
        )
        axis = torch.linspace(-self.slices.span, self.slices.span, resolution, dtype=torch.float64)
        self.advance("1-D profile")
        plane, per_point = self._timed_grid(trainer, obj, center, torch.stack([d1, d2]), plane_coordinates(axis, axis))
        self.advance("2-D slice")
        plane = plane.reshape(resolution, resolution)
        second = np.abs(np.diff(profile, 2)).mean() if len(profile) > 2 else np.nan
        scalars = {
            "probe_fraction": k / n,
            "center_loss": center_loss,
            "roughness": float(second / max(abs(center_loss), 1e-12)),
            "resolution": resolution,
        }
        if resolution < self.slices.resolution or sizes["line"] < self.slices.line_points:
            self.reporter.event("cut", {"step": step, "sizes": sizes, "why": "the trigger's budget"})
        arrays: dict[str, Any] = {
            "profile_alphas": line.numpy(),
            "profile": profile,
            "alphas": axis.numpy(),
            "betas": axis.numpy(),
            "plane": plane,
            "d1": d1.cpu().numpy(),
            "d2": d2.cpu().numpy(),
        }

        with self.stage(trainer, "trajectory"):
            steps, trajectory, init = self._trajectory(trainer, pl_module, obj.layout)
        # the PCA plane and the interpolation run only while the budget lasts (what is cut is logged)
        has_path = distributed.broadcast(trainer.strategy, trajectory is not None and self.time_left() > 0)
        pca: dict[str, Any] = {}
        if trajectory is not None and not has_path:
            self.reporter.event("cut", {"step": step, "cut": ["pca_plane"], "why": "the trigger's budget ran out"})
        if has_path:
            side = int(
                self._affordable(trainer, per_point, 0.7, self.slices.resolution**2, min(9, self.slices.resolution**2))
                ** 0.5
            )
            pca = self._pca_plane(trainer, obj, center, trajectory, steps, side)
            scalars.update(pca_explained=pca["explained"], pca_max_off_plane=float(pca["off_plane"].max()))
        self.advance("PCA plane")
        has_init = distributed.broadcast(trainer.strategy, init is not None and self.time_left() > 0)
        interp = None
        if init is not None and not has_init:
            self.reporter.event("cut", {"step": step, "cut": ["interpolation"], "why": "the trigger's budget ran out"})
        if has_init:
            init = distributed.broadcast(trainer.strategy, init)
            interp = interpolate(
                obj,
                init.to(center),
                center,
                self._affordable(trainer, per_point, 1.0, self.interpolation_steps, min(3, self.interpolation_steps)),
                recompute_bn=self.recompute_bn,
                memory_mb=self.slices.memory_mb,
            )
            scalars["barrier_init"] = interp.barrier
        self.advance("interpolation")
        self.history.append({"step": step, **scalars})
        if not trainer.is_global_zero:
            return
        self._report(step, scalars, arrays, pca, interp, obj.metadata)

    def _pca_plane(
        self, trainer: pl.Trainer, obj: Any, center: torch.Tensor, trajectory: Any, steps: list[int], side: int
    ):
        """The PCA plane of the snapshots and the current point, with the path; computed on rank 0's
        snapshots, broadcast, and its grid shared by all ranks."""
        payload = None
        with self.stage(trainer, "PCA directions"):
            if trajectory is not None:
                points = torch.cat([trajectory.to(center), center[None]])
                dirs, ratio, coords = pca_directions(points, 2)
                payload = (dirs.float(), ratio, coords.float(), points.float(), steps)
        dirs, ratio, coords, points, steps = distributed.broadcast(trainer.strategy, payload)
        dirs, coords, points = dirs.to(center), coords.to(center), points.to(center)
        reach = float(coords.abs().max()) * 1.2 + 1e-8
        axis = torch.linspace(-reach, reach, side, dtype=torch.float64)
        grid = self._grid(trainer, obj, center, dirs, plane_coordinates(axis, axis)).reshape(side, -1)
        with self.stage(trainer, "PCA plane losses"):
            projected = center + coords @ dirs
            off_plane = (points - projected).norm(dim=1).cpu().numpy()
            true_loss = obj.losses(points).double().cpu().numpy()
            plane_loss = obj.losses(projected).double().cpu().numpy()
        return {
            "axis": axis.numpy(),
            "grid": grid,
            "coords": coords.double().cpu().numpy(),
            "explained": float(ratio.sum()),
            "ratio": ratio.numpy(),
            "off_plane": off_plane,
            "true_loss": true_loss,
            "plane_loss": plane_loss,
            "steps": np.asarray([*steps, -1]),
        }

    def _report(self, step: int, scalars: dict, arrays: dict, pca: dict, interp: Any, meta: dict) -> None:
        rep = self.reporter
        rep.scalars(scalars, step)
        axis, plane = arrays["alphas"], arrays["plane"]
        rep.figure(
            "profile",
            profile_figure(
                arrays["profile_alphas"],
                arrays["profile"],
                "alpha (d1, filter-normalized)",
                f"1-D slice at step {step}",
            ),
            step,
        )
        rep.figure(
            "slice",
            contour_figure(axis, axis, plane, title=f"2-D slice at step {step} ({self.slices.normalization})"),
            step,
        )
        rep.plotly("surface", surface_figure(axis, axis, plane, f"loss surface at step {step}"), step)
        aa, bb = np.meshgrid(axis, axis)
        rows = np.stack([aa.ravel(), bb.ravel(), plane.ravel()], 1).tolist()
        rep.table("grid", ["alpha", "beta", "loss"], rows, step)
        if pca:
            note = f"plane explains {100 * pca['explained']:.1f}% of the variance"
            fig = contour_figure(
                pca["axis"],
                pca["axis"],
                pca["grid"],
                f"PC1 ({100 * pca['ratio'][0]:.1f}%)",
                f"PC2 ({100 * pca['ratio'][1]:.1f}%)",
                f"trajectory PCA plane at step {step}",
                path=pca["coords"],
                path_loss=pca["true_loss"],
            )
            fig.axes[0].text(0.02, 0.02, note, transform=fig.axes[0].transAxes, color="white", fontsize=8)
            rep.figure("pca_plane", fig, step)
            rep.table(
                "pca_trajectory",
                ["step", "pc1", "pc2", "true_loss", "loss_at_projection", "off_plane"],
                [
                    [int(s), *c, t, p, o]
                    for s, c, t, p, o in zip(
                        pca["steps"],
                        pca["coords"].tolist(),
                        pca["true_loss"],
                        pca["plane_loss"],
                        pca["off_plane"],
                        strict=True,
                    )
                ],
                step,
            )
            arrays.update({f"pca_{k}": v for k, v in pca.items()})
        if interp is not None:
            rep.figure(
                "interpolation",
                profile_figure(
                    interp.ts,
                    interp.losses,
                    "t (0 = init, 1 = current)",
                    f"init-to-current interpolation at step {step}",
                    f"barrier {interp.barrier:.4g}",
                ),
                step,
            )
            arrays.update(interp_ts=interp.ts, interp_losses=interp.losses)
        metadata = {
            **meta,
            **self.probe_metadata,
            "step": step,
            "direction_seeds": [self.slices.direction_seed, self.slices.direction_seed + 1],
            "normalization": self.slices.normalization,
            "span": self.slices.span,
            "resolution": len(arrays["alphas"]),
            "recompute_bn": self.recompute_bn,
        }
        rep.arrays("landscape", step, metadata=metadata, **arrays)

    @override
    def reset(self) -> None:
        super().reset()
        self.snapshots, self.history = [], []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": self.history, "snapshots": list(self.snapshots)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
        self.snapshots = list(state_dict.get("snapshots", self.snapshots))
