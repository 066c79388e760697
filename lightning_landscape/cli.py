"""The ``lightning-landscape`` command: LightningCLI for any LightningModule and DataModule.

Usage::

    lightning-landscape fit --config configs/quickstart.yaml
    lightning-landscape fit --config configs/mnist.yaml --trainer.max_epochs 3 --data.data_dir /data
    lightning-landscape fit --print_config --config configs/quickstart.yaml   # the full resolved config
    lightning-landscape analyze runs/energy/seed-0 runs/energy/seed-1 --config configs/energy.yaml   # offline

Models and data modules are chosen by ``class_path`` in the config (the reference examples live in
``lightning_landscape.examples``), callbacks by ``trainer.callbacks``. Unknown keys are errors.
``analyze`` rebuilds Markov state models, paths and disconnectivity graphs from recorded runs
(:mod:`lightning_landscape.analysis`).

W&B: when no W&B login is configured (no ``WANDB_API_KEY``, no entry in ``~/.netrc``) and
``WANDB_MODE`` is not set, the command sets ``WANDB_MODE=offline``, so runs are written to
``<save_dir>/wandb/offline-run-*`` and can be uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
import sys
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


def use_wandb_offline_without_login() -> str | None:
    """Set ``WANDB_MODE=offline`` if it is unset and no login is configured. Returns the mode in force."""
    if "WANDB_MODE" not in os.environ and not wandb_login_configured():
        os.environ["WANDB_MODE"] = "offline"
        print("lightning-landscape: no W&B login found, logging to W&B in offline mode.", file=sys.stderr)
    return os.environ.get("WANDB_MODE")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-landscape`` console script (``analyze`` or a LightningCLI subcommand)."""
    args = sys.argv[1:] if args is None else args
    if args[:1] == ["analyze"]:
        from lightning_landscape.analysis import main as analyze

        analyze(args[1:])
        return
    use_wandb_offline_without_login()
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(args=args, save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()
