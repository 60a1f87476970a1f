"""The ``bna`` command line: the only package that knows argparse.

``parser`` declares the flags; ``commands`` turns each sub-command's flags into typed options, calls one
job (``mitigation.jobs``) and prints what it returns. Jobs are imported lazily, so ``bna serve`` loads
no training code. docs/cli.md documents every command.
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

from bna_gateway.mitigation.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bna_gateway.mitigation.cli import commands

    try:
        return getattr(commands, args.command)(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as exc:
        if getattr(args, "verbose", False):
            raise
        print(f"bna {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """The error for the user; a pydantic validation error becomes its messages on one line."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
