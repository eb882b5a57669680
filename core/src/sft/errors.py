"""Errors meant for people: what went wrong, where, and what to do.

`SftError` and its subclasses are caught by the CLI and printed without a traceback (exit code 2
for configuration mistakes, 1 otherwise). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


class SftError(Exception):
    """A user-facing error; the message says what to do."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One problem in a config: key path, message and an optional hint."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = self.path or "<root>"
        return f"{where}: {self.message}" + (f" ({self.hint})" if self.hint else "")


class ConfigError(SftError):
    """Every problem found in a config, reported at once."""

    exit_code = 2

    def __init__(self, problems: Iterable[Problem], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        head = "Config is not well-formed" + (f" ({source})" if source else "")
        lines = [f"{head}, found the following {len(self.problems)} error(s):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class UnknownNameError(SftError):
    """A name that no registry knows; lists what exists and suggests the closest."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "") -> None:
        known = sorted(known)
        self.suggestion = did_you_mean(name, known)
        msg = f"unknown {kind} {name!r}"
        if self.suggestion:
            msg += f"; did you mean {self.suggestion!r}?"
        msg += f" installed: {', '.join(known) if known else '(none)'}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate to a misspelled name, or None."""
    matches = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None
