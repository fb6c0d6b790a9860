"""``rlsys`` (and ``python -m rlsys``): the list of commands; ``rlsys <command> [overrides...]`` runs one.

Each command is also its own console script (``rlsys-train``, ``rlsys-eval``, ``rlsys-sft``,
``rlsys-difficulty``) and module (``python -m rlsys.train``); ``rlsys-<command> --help`` lists its
config groups and keys.
"""

from __future__ import annotations

import importlib
import sys

from rlsys.cli import COMMANDS


def listing() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: rlsys <command> [group=option ...] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    lines += [
        "",
        "rlsys <command> --help: its config groups and every key with its default; what each key means:",
        "docs/config.md. Each command is also a console script, rlsys-<command>, and a module,",
        "python -m rlsys.<command>.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(listing())
        return
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"rlsys: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"rlsys-{name}", *rest]  # Hydra parses sys.argv
    module.main()


if __name__ == "__main__":
    main()
