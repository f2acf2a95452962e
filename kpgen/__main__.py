import sys

from kpgen import missing_module

try:
    from kpgen.cli.main import entry
except ModuleNotFoundError as error:  # a Python without kpgen's dependencies
    print(missing_module(error), file=sys.stderr)
    sys.exit(1)

entry()
