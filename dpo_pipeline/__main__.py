"""One command line: `python -m dpo_pipeline train|sweep|evaluate|export ...` (each `--help` says more)."""

import importlib
import sys

from .errors import command

COMMANDS = {"train": "cli", "sweep": "sweep", "evaluate": "evaluate", "export": "export"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"python -m dpo_pipeline {{{','.join(COMMANDS)}}} ... (each with --help)"
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: {usage}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(f"error: {'unknown command ' + repr(argv[0]) if argv else 'no command'}; usage: {usage}", file=sys.stderr)
        return 2
    return command(importlib.import_module(f"dpo_pipeline.{COMMANDS[argv[0]]}").main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
