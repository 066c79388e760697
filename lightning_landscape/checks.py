"""Constructor checks: a bad value is refused when the callback is built, with the parameter, the value and a fix.

Example::

    >>> check_int("top_k", 5)
    >>> check_int("top_k", 2.5)
    Traceback (most recent call last):
    ...
    ValueError: `top_k` must be an integer >= 1, got 2.5. HINT: e.g. `top_k=5`.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, NoReturn


def check_int(name: str, value: Any, minimum: int = 1, *, optional: bool = False, example: int | None = None) -> None:
    """``value`` must be an ``int`` (not a bool) ``>= minimum``; ``None`` passes when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = f" HINT: e.g. `{name}={example if example is not None else max(minimum, 5)}`"
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}.{hint}."
        )


def check_float(
    name: str, value: Any, minimum: float = 0.0, *, strict: bool = True, optional: bool = False, hint: str = ""
) -> None:
    """``value`` must be a finite real number ``> minimum`` (``>= minimum`` unless ``strict``)."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(
            f"`{name}` must be a finite number {bound}{' or None' if optional else ''}, got {value!r}."
            + (f" HINT: {hint}" if hint else "")
        )


def as_config(cls: type, value: Any, name: str) -> Any:
    """``value`` as a ``cls``: an instance, a dict of its fields, or None (the defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        try:
            return cls(**value)
        except TypeError as err:
            fields = ", ".join(cls.__dataclass_fields__)
            raise ValueError(f"`{name}`: {err}. HINT: its fields are {fields}.") from None
    raise ValueError(f"`{name}` must be a {cls.__name__} or a dict of its fields, got {value!r}.")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr, ``<prog>: error: <what> (see <prog> --help)``,
    with exit status 2: what a script that runs the command under ``set -e`` can show as it is."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


def fail(prog: str, message: str) -> NoReturn:
    """Print ``<prog>: error: <message>`` (one line) on stderr and exit with status 2."""
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"{prog}: error: {message} (see `{prog} --help`)", file=sys.stderr)
    raise SystemExit(2)
