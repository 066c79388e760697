"""The ``lightning-landscape`` command: LightningCLI for any LightningModule and DataModule.

Usage::

    lightning-landscape fit --config configs/quickstart.yaml
    lightning-landscape fit --config configs/mnist.yaml --trainer.max_epochs 3 --data.data_dir /data
    lightning-landscape fit --print_config --config configs/quickstart.yaml   # the full resolved config
    lightning-landscape analyze runs/energy/seed-0 runs/energy/seed-1 --config configs/energy.yaml   # offline
    lightning-landscape dashboard --entity me --project my-project   # a saved W&B workspace of our keys

Models and data modules are chosen by ``class_path`` in the config (the reference examples live in
``lightning_landscape.examples``), callbacks by ``trainer.callbacks``. Unknown keys are errors.
``analyze`` rebuilds Markov state models, paths and disconnectivity graphs from recorded runs
(:mod:`lightning_landscape.analysis`); ``dashboard`` builds a W&B workspace with a section per analysis
(:mod:`lightning_landscape.report.dashboard`).

W&B: when no W&B login is configured (no ``WANDB_API_KEY``, no entry in ``~/.netrc``) and
``WANDB_MODE`` is not set, the command sets ``WANDB_MODE=offline``, so runs are written to
``<save_dir>/wandb/offline-run-*`` and can be uploaded later with ``wandb sync`` (said once, and only when the run
has a W&B logger).

A bad value on the command line or in a config, or one that a callback refuses when it is built, is one line
(``lightning-landscape: error: ...``) and exit status 2, not a page of usage and tracebacks.
"""

from __future__ import annotations

import netrc
import os
import sys
from typing import Any
from urllib.parse import urlparse

import lightning_landscape  # noqa: F401  (before lightning: makes torchvision importable on CPU torch)


def wandb_login_configured() -> bool:
    """Whether W&B has credentials: ``WANDB_API_KEY``, an identity token, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def use_wandb_offline_without_login() -> bool:
    """Set ``WANDB_MODE=offline`` if it is unset and no login is configured. Returns whether it did."""
    if "WANDB_MODE" not in os.environ and not wandb_login_configured():
        os.environ["WANDB_MODE"] = "offline"
        return True
    return False


def one_line(error: BaseException) -> str:
    """What is wrong, in one line. A parser error (``ArgumentError``): the deepest ``Parser key`` line with what was
    expected and what was given. Any other: its innermost cause (a callback's own ValueError, with its HINT)."""
    if type(error).__name__ == "ArgumentError":
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        keys = [i for i, line in enumerate(lines) if line.startswith("Parser key")]
        given = next((line for line in lines if line.startswith("Given value:")), "")
        return " ".join([*lines[keys[-1] : keys[-1] + 2], given] if keys else lines).strip()
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def _fail(error: BaseException, command: str) -> None:
    print(
        f"lightning-landscape: error: {one_line(error)} (see `lightning-landscape {command} --help`)", file=sys.stderr
    )
    raise SystemExit(2)


def _cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import WandbLogger

    class LandscapeCLI(LightningCLI):
        """LightningCLI that reports configuration errors in one line and says when W&B runs offline."""

        wandb_offline = False

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as err:
                _fail(err, self.subcommand or "fit")
            if self.wandb_offline and any(isinstance(lg, WandbLogger) for lg in self.trainer.loggers):
                print("lightning-landscape: no W&B login found, logging to W&B in offline mode.", file=sys.stderr)

    return LandscapeCLI


def main(args: list[str] | None = None) -> Any:
    """Entry point of the ``lightning-landscape`` console script (``analyze`` or a LightningCLI subcommand);
    returns the summary of ``analyze``."""
    args = sys.argv[1:] if args is None else args
    if args[:1] == ["analyze"]:
        from lightning_landscape.analysis import main as analyze

        return analyze(args[1:])
    if args[:1] == ["dashboard"]:
        from lightning_landscape.report.dashboard import main as dashboard

        return dashboard(args[1:])
    cli = _cli_class()
    cli.wandb_offline = use_wandb_offline_without_login()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments go in `args` only (LightningCLI warns about both)
    try:
        cli(
            args=args,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False},
        )
    except Exception as err:
        if type(err).__name__ != "ArgumentError":
            raise
        _fail(err, args[0] if args and not args[0].startswith("-") else "fit")
    finally:
        sys.argv = argv


def console() -> int:
    """The ``lightning-landscape`` console script: :func:`main`, exit status 0 on success (``main``'s return value,
    the summary of ``analyze``, is printed by ``analyze`` itself and is not an exit status)."""
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(console())
