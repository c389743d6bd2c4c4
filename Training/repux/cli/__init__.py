"""The ``repux`` command: one subcommand per job, each in its own module of this package.

Every subcommand module defines ``HELP`` (one line), ``configure(parser)`` and
``run(args) -> int``, and imports torch only inside ``run`` so that ``repux --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from repux import __version__
from repux.errors import InputError
from repux.large_pages import enable_large_pages

#: subcommand name -> module in this package, in the order ``repux --help`` lists them.
SUBCOMMANDS = {
    "segment": "segment",
    "rank": "rank",
    "serve": "serve",
    "evaluate": "evaluate",
    "train": "train",
    "import-checkpoint": "import_checkpoint",
    "models": "models",
    "make-phantoms": "make_phantoms",
    "demo": "demo",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repux",
        description="RepUX-Net organ segmentation: segment CTs, train and fine-tune with "
        "Bayesian frequency re-parameterization, manage model bundles.",
    )
    parser.add_argument("--version", action="version", version=f"repux {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"repux.cli.{module_name}")
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    enable_large_pages()  # before torch's first allocation
    args = build_parser().parse_args(argv)
    from repux.progress import cancel_exit_code, cancel_on_sigterm
    from repux.supervision import watch_for_stop

    cancel_on_sigterm()
    watch_for_stop()  # a job of the Slicer module: stop when Slicer is gone or asks
    try:
        return int(args.run(args) or 0)
    except (InputError, FileExistsError, FileNotFoundError) as error:
        print(f"repux {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"repux {args.command}: cancelled", file=sys.stderr)
        return cancel_exit_code()


if __name__ == "__main__":
    sys.exit(main())
