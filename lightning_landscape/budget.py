"""How long a periodic analysis may run: a share of the training time, carried over between triggers, inside
``Trainer(max_time=...)``, and abandoned on SIGTERM.

A callback with ``Budget(share=s, floor=f, seconds=c)`` may spend at trigger ``k``

    allowance_k = min(c, max(f, s * T_k - S_k), max_time_left)

seconds, where ``T_k`` is the wall time of the fit so far *outside* every lightning-landscape analysis (training,
validation, other callbacks), ``S_k`` the seconds this callback's earlier triggers took, ``f`` the floor that
lets the first trigger produce something, and ``max_time_left`` what ``Trainer(max_time=...)`` leaves (no trigger
starts when that is under ``f``, and none after SIGTERM). What a trigger does not use is carried over; what it
overspends (at least the floor) is paid back by the next ones. Over a long fit each callback costs at most
``s`` of the training time plus one floor per trigger.

The analyses are *anytime*: inside :func:`deadline` the iterative estimators (Lanczos, power iteration,
Hutchinson samples, SLQ vectors) stop at the next step once :func:`time_up` and return what they have, marked
unconverged; the callbacks choose grid sizes and replica counts from :func:`time_left`, skip the stages that no
longer fit and log what they cut.

Example::

    >>> budget = Budget(share=0.05, floor=10.0)
    >>> budget.allowance(trained=1000.0, spent=20.0)  # 5% of 1000 s, less the 20 s spent
    30.0
    >>> budget.allowance(trained=100.0, spent=20.0)  # the floor
    10.0
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from lightning_landscape.checks import check_float, check_int


@dataclass(frozen=True)
class Budget:
    """What each trigger of a callback may spend (see the module docstring for the rule).

    Args:
        share: the fraction of the training time (outside all analyses) the callback's triggers may take in all;
            None: no share limit (only ``seconds``, ``max_time`` and SIGTERM).
        floor: seconds every trigger may take however short the training so far (the first trigger's budget).
        seconds: the most any one trigger may take (None: no cap).
        passes: the most batch passes (forward plus backward, summed over ranks) one trigger may take; counted by
            EnergyLandscape only (None: no cap).
    """

    share: float | None = 0.05
    floor: float = 10.0
    seconds: float | None = None
    passes: int | None = None

    def __post_init__(self) -> None:
        check_int("budget.passes", self.passes, optional=True, example=20000)
        check_float("budget.share", self.share, optional=True, hint="e.g. 0.05 (5% of training); None: no limit.")
        if self.share is not None and self.share > 1:
            raise ValueError(f"`budget.share` is a fraction of training time, at most 1, got {self.share}.")
        check_float("budget.floor", self.floor, strict=False, hint="e.g. 10 (seconds).")
        check_float("budget.seconds", self.seconds, optional=True, hint="None means no cap.")

    @classmethod
    def of(cls, value: Any, default_share: float) -> Budget:
        """``value`` as a budget: a ``Budget``, a dict of its fields, a number (the share), or None (no
        share limit); ``"default"``: ``Budget(share=default_share)``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value == "default":
            return cls(share=default_share)
        if value is None:
            return cls(share=None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(share=float(value))
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as err:
                raise ValueError(f"`budget`: {err}. HINT: its fields are share, floor, seconds, passes.") from None
        raise ValueError(
            f"`budget` must be a share of training time (e.g. 0.05), a Budget, a dict of its fields or None,"
            f" got {value!r}."
        )

    def allowance(self, trained: float, spent: float) -> float:
        """Seconds the next trigger may take after ``trained`` seconds of training and ``spent`` of analysis."""
        allowed = math.inf if self.share is None else max(self.floor, self.share * trained - spent)
        return min(allowed, self.seconds) if self.seconds is not None else allowed


@dataclass
class Ledger:
    """One fit's clock, shared by all lightning-landscape callbacks of a trainer: when the fit started and how
    many seconds all their analyses took, so that each one's share is of the training time alone."""

    started: float
    analysis_seconds: float = 0.0

    def trained(self) -> float:
        return max(0.0, time.perf_counter() - self.started - self.analysis_seconds)


_LEDGERS: weakref.WeakKeyDictionary[Any, Ledger] = weakref.WeakKeyDictionary()


def ledger(trainer: Any) -> Ledger:
    """The trainer's :class:`Ledger` (started now when there is none; :func:`forget` ends it with the fit)."""
    book = _LEDGERS.get(trainer)
    if book is None:
        book = _LEDGERS[trainer] = Ledger(time.perf_counter())
    return book


def forget(trainer: Any) -> None:
    """Drop the trainer's ledger (at the end of a fit)."""
    _LEDGERS.pop(trainer, None)


def max_time_left(trainer: Any) -> float | None:
    """Seconds ``Trainer(max_time=...)`` leaves to the fit (its ``Timer`` callback), None without a limit."""
    from lightning_landscape._compat import timer_callbacks

    left = [t.time_remaining() for t in timer_callbacks(trainer)]
    left = [x for x in left if x is not None]
    return min(left) if left else None


def received_sigterm(trainer: Any) -> bool:
    return bool(getattr(trainer, "received_sigterm", False))


_DEADLINE: ContextVar[tuple[float, Any] | None] = ContextVar("lightning_landscape_deadline", default=None)


@contextlib.contextmanager
def deadline(seconds: float, trainer: Any = None) -> Iterator[None]:
    """Inside: :func:`time_up` once ``seconds`` have passed or the trainer received SIGTERM."""
    token = _DEADLINE.set((time.perf_counter() + seconds, trainer))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left() -> float:
    """Seconds to the innermost :func:`deadline` (inf outside one; 0 after SIGTERM)."""
    current = _DEADLINE.get()
    if current is None:
        return math.inf
    end, trainer = current
    return 0.0 if received_sigterm(trainer) else end - time.perf_counter()


def time_up() -> bool:
    """Whether the innermost :func:`deadline` has passed (never outside one)."""
    return time_left() <= 0


__all__ = [
    "Budget",
    "Ledger",
    "deadline",
    "forget",
    "ledger",
    "max_time_left",
    "received_sigterm",
    "time_left",
    "time_up",
]


class PassCount:
    """The batch passes (forward and backward) that objectives have spent since it was made: :meth:`local` on this
    rank, :meth:`total` summed over ranks (a collective), for ``Budget.passes``.

    Example::

        >>> from types import SimpleNamespace
        >>> objective = SimpleNamespace(passes={"forward": 3, "backward": 1})
        >>> count = PassCount(objective)
        >>> objective.passes["forward"] += 2
        >>> count.local()
        2
    """

    def __init__(self, *objectives: Any) -> None:
        self.marks = [(o, self._spent(o)) for o in objectives]

    @staticmethod
    def _spent(objective: Any) -> int:
        return objective.passes["forward"] + objective.passes["backward"]

    def local(self) -> int:
        return sum(self._spent(o) - mark for o, mark in self.marks)

    def total(self, strategy: Any) -> int:
        import torch

        from lightning_landscape import distributed

        return int(distributed.reduce_sum(strategy, torch.tensor(float(self.local()))).item())
