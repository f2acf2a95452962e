"""The ``kpgen`` command: the console script, and ``python -m kpgen``."""

import gc
import sys

from kpgen import missing_module


def entry() -> None:
    """Run the kpgen command. The cyclic garbage collector is off from the start: a one-shot
    command's imports and objects all live to its end, and the collector would only walk
    them again and again (docs/performance.md); ``kpgen run`` turns it on again."""
    gc.disable()
    try:
        from kpgen.cli.main import command
    except ModuleNotFoundError as error:  # a Python without kpgen's dependencies
        print(missing_module(error), file=sys.stderr)
        sys.exit(1)
    command()


if __name__ == "__main__":
    entry()
