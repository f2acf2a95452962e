"""The documentation shows real output: the README's example is what `make render` prints."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from kpgen.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def _makefile_render_args() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    seed = re.search(r"^SEED\s*:=\s*(.+)$", makefile, re.M)
    flags = re.search(r"^SEED_NODE_FLAGS\s*:=\s*(.+)$", makefile, re.M)
    assert seed and flags, "the Makefile defines SEED and SEED_NODE_FLAGS for `make render`"
    return ["render", "-f", str(ROOT / seed.group(1).strip()), *flags.group(1).split()]


def test_readme_example_is_the_real_output_of_make_render() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Example: `make render`", 1)[1]
    shown = re.search(r"```\n(.*?)```", section, re.S)
    assert shown, "the README's example section has a code block"
    result = CliRunner().invoke(main, _makefile_render_args())
    assert result.exit_code == 0
    assert shown.group(1) == result.stdout
