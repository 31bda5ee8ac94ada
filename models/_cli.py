"""What the three commands (fedasync-agent, fedasync-coordinator, fedasync-sim) share on their
command line: ``--version``, a checked ``--log-level`` and one-line usage errors."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from fedasync_iot.models._errors import ConfigError
from fedasync_iot.models._logging import check_level

DISTRIBUTION = "fedasync-iot"  # pyproject.toml's [project] name


def make_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """An `argparse.ArgumentParser` (so typed: its subparsers are then plain ones for mypy,
    though of the same class) whose usage errors are one line."""
    return _OneLineErrors(**kwargs)


class _OneLineErrors(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error of ours: fedasync-sim's usage
    alone is twenty lines, which bury the one that says what is wrong. Exit status 2."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument (\S+): ", r"\1: ", message)  # "--seeds: expected ..."
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def version() -> str:
    """This installation's version, from the distribution's metadata."""
    from importlib import metadata  # only for --version: the agent starts without it

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install the project)"


class _Version(argparse.Action):
    """``--version``; unlike argparse's own, reads the metadata only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        sys.stdout.write(f"{parser.prog} {version()}\n")  # stdout, as argparse's own does
        parser.exit(0)


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_Version)


def log_level(text: str) -> str:
    """An argparse type: a logging level name in any case, returned in upper case."""
    try:
        return check_level(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("log_level ")) from None
