"""An argparse parser whose usage errors are one line, for every command of the project.

argparse prints the whole usage block and then the error; in a terminal or a log that buries the
one thing the user needs. Here a usage error is `<prog>: error: <what> (see <prog> --help)` and exit
code 2, as before. Subcommand parsers made by `add_subparsers` are of the same class.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def positive_int(value: str) -> int:
    """An argparse `type`: a whole number of at least 1, or a usage error saying what was given."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n
