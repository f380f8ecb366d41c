"""The ``mixrank`` command line: one `Tool` per stage, and ``run`` for all of them.

A user mistake raises `MixrankError`, printed as one line, exit 2; anything else is a
bug in mixrank, exit 70 with the traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from mixrank.core import MixrankError

from ._args import EXIT_INTERNAL, EXIT_USER_ERROR, HelpFormatter, Parser, Tool
from ._file_tools import Build, Inspect, Rewrite
from ._model_tools import Compress, Eval, Export
from ._report_tools import Bench, Check
from ._run_tool import Run

TOOLS: tuple[Tool, ...] = (Run(), Compress(), Export(), Eval(), Inspect(), Rewrite(), Build(), Bench(), Check())

__all__ = ["EXIT_INTERNAL", "EXIT_USER_ERROR", "TOOLS", "Tool", "build_parser", "main"]


def build_parser() -> Parser:
    """The parser of every subcommand (`TOOLS`)."""
    p = Parser(prog="mixrank", formatter_class=HelpFormatter,
               description="Activation-aware mixed-rank compression of Vision Transformers.")
    import mixrank

    p.add_argument("--version", action="version", version=f"mixrank {mixrank.__version__}")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    for tool in TOOLS:
        tool.parser(sub)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that every stage cleans up as on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def _follower() -> bool:
    """A rank other than 0 of a torchrun job (``WORLD_SIZE`` > 1): rank 0 prints for all. A
    stray ``RANK`` without a job of several processes silences nothing."""
    from mixrank.compress.calibrate.distributed import world_size_from_env

    try:
        several = world_size_from_env() > 1
    except MixrankError:
        several = False
    return several and os.environ.get("RANK", "0").strip() not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (``None``: ``sys.argv[1:]``); returns the exit code.
    With no subcommand it is ``run``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    tool: Tool = args.tool
    try:  # SIGTERM unwinds like Ctrl-C, so that nothing is left
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # main() called from a thread other than the main one
        previous = None
    try:
        result = tool.run(args)
    except MixrankError as e:
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        print(f"mixrank: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated:
        print("mixrank: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("mixrank: interrupted", file=sys.stderr)
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        print("mixrank: internal error: this is a bug in mixrank, not in your input; please "
              "report it with the traceback above and the command you ran", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    try:
        if _follower():
            pass  # under torchrun rank 0 speaks for all
        elif args.json:
            print(json.dumps(result, indent=2, default=str))
        else:
            tool.show(result)
        sys.stdout.flush()
    except BrokenPipeError:  # `mixrank inspect ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return tool.exit_code(result)
