"""User mistakes at the commands (cli, sweep, evaluate, export): one line on stderr and exit code 2, never a
traceback; in the notebook, one line in the cell."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def first_line(err: BaseException) -> str:
    """An exception as one line: its type and the first non-blank line of its message."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user's mistake raises: settings and data (ValueError: ConfigError, DataError, TRL's own argument
    checks), a model or adapter that cannot be loaded, a missing file. Only the modules already imported can have
    raised theirs: importing none here answers an early mistake (a bad sweep file) before torch loads."""
    loaded = [getattr(sys.modules[module], name) for module, name in (
        ("dpo_pipeline.model", "ModelLoadError"), ("offline_models.smollm2", "PretrainedError"),
        ("dpo_pipeline.chat", "ChatError")) if module in sys.modules]
    return ValueError, FileNotFoundError, argparse.ArgumentError, *loaded  # ArgumentError: exit_on_error=False


def command(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        return main(argv) or 0
    except user_errors() as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2


def one_line_in_notebook() -> None:
    """In a notebook (IPython), a user's mistake shows as one line (IPython's Minimal traceback mode: its type and
    message); any other exception keeps its whole traceback. The cell fails either way, so papermill stops there."""
    from IPython import get_ipython

    def show(shell, etype, value, tb, tb_offset=None):  # IPython's custom exception handler
        mode, handled = shell.InteractiveTB.mode, shell.custom_exceptions
        shell.custom_exceptions = ()  # shown as IPython shows any exception, without coming back here
        if issubclass(etype, user_errors()):
            shell.InteractiveTB.set_mode("Minimal")
        try:
            shell.showtraceback((etype, value, tb), tb_offset=tb_offset)
        finally:
            shell.InteractiveTB.set_mode(mode)
            shell.custom_exceptions = handled

    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((Exception,), show)


class UsageError(ValueError):
    """A bad flag or flag value, as argparse words it."""


def one_line_errors(parser):
    """argparse's own mistakes (a bad flag or value) as one line too, through `command`."""
    def error(message):
        raise UsageError(message)

    parser.error = error
    return parser
