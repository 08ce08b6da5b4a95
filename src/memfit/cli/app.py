"""The `memfit` application object, its consoles and the error handling every command shares.

User errors (`MemfitError`) and a full or read-only disk print one red line on stderr and exit 2; no traceback.
Commands (`memfit.cli`, `memfit.cli.generate`) register on `app` and import what they need inside their body, so
`memfit --help` loads typer and rich only."""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Callable

import typer
from rich.console import Console

from memfit.errors import MemfitError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Train, fine-tune and run language models inside the memory you have.")
_WIDTH = None if sys.stdout.isatty() else 140  # logs and pipes: don't squeeze tables into 80 columns
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH)


@app.callback()
def _setup() -> None:
    """Quiet third-party progress bars and info logs; print memfit's own progress lines on stderr."""
    from memfit.progress import to_console

    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:  # read by transformers and huggingface_hub when first imported; importing them here costs seconds
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    to_console(err_console)


# Failures of the machine rather than of memfit: one line, not a traceback, wherever they happen.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)


def handles_errors(fn: Callable) -> Callable:
    """Turn a `MemfitError` (or a full / read-only disk) into one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MemfitError as exc:
            _error(str(exc))
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in _ENVIRONMENT_ERRNOS:
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            todo = "write somewhere else" if exc.errno == errno.EROFS else "free disk space or write somewhere else"
            _error(f"{exc.strerror}{where}; {todo}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; the last checkpoint is intact (resume with --resume)")
            raise typer.Exit(130) from None

    return wrapper
