"""The `wsicodec` command: thin — parse options, call the API, print.

Every command runs inside :func:`_user_errors`, so a :class:`WsicodecError` becomes one
``error: ...`` line on stderr and a non-zero exit, never a traceback.
Each command's body belongs to the module that implements it; keep edits to your own command.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from .errors import WsicodecError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Archive whole-slide images as quantised autoencoder latents (.pzarr) and restore them.",
)


@contextmanager
def _user_errors():
    try:
        yield
    except WsicodecError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.secho("error: interrupted", fg=typer.colors.RED, err=True)
        raise typer.Exit(130)


# ---------------------------------------------------------------- compress / info (lead)
@app.command()
def compress() -> None:
    """Compress a slide into a .pzarr container."""
    raise NotImplementedError


# ---------------------------------------------------------------- restore (restore helper)
@app.command()
def restore() -> None:
    """Restore a viewable pyramidal TIFF (or a region) from a .pzarr container."""
    raise NotImplementedError


# ---------------------------------------------------------------- stats (stats helper)
@app.command()
def stats() -> None:
    """Report (or estimate) what compressing saves."""
    raise NotImplementedError


# ---------------------------------------------------------------- eval / finetune (eval helper)
@app.command("eval")
def eval_() -> None:
    """Measure fidelity against JPEG, the paper's way."""
    raise NotImplementedError


@app.command()
def finetune() -> None:
    """Fine-tune a model's decoder for pathology (encoder frozen)."""
    raise NotImplementedError


# ---------------------------------------------------------------- train (builtin-model helper)
@app.command()
def train() -> None:
    """Train an autoencoder (the builtin model's recipe) on your own slides or tiles."""
    raise NotImplementedError


if __name__ == "__main__":  # pragma: no cover
    app()
