"""Config regexes as Istio and Envoy run them: RE2 (Envoy's safe_regex), not Python's `re`.

RE2 matches in time linear in the input, so a route regex such as `^/(a+)+$` cannot be
turned into a CPU denial of service by a crafted path (Python's backtracking `re` takes
minutes on 40 characters of it and would stall the whole event loop). The syntax is RE2's
too: backreferences and lookaround are config errors, as Istio's validation reports them.
"""

from __future__ import annotations

import re2


class RegexError(ValueError):
    """RE2 cannot compile the pattern; the message is RE2's reason."""


class Regex:
    """A compiled RE2 pattern with the two operations routing needs."""

    __slots__ = ("_compiled", "pattern")

    def __init__(self, pattern: str) -> None:
        options = re2.Options()
        options.log_errors = False  # RE2 would print parse errors to stderr; we raise them
        try:
            self._compiled = re2.compile(pattern, options=options)
        except re2.error as exc:
            reason = exc.args[0] if exc.args else exc
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            raise RegexError(str(reason)) from None
        self.pattern = pattern

    @property
    def groups(self) -> int:
        return int(self._compiled.groups)

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of `text` matches (Envoy's safe_regex matchers are anchored)."""
        # Bytes take the wrapper's short path (a str is re-encoded with offset bookkeeping).
        return self._compiled.fullmatch(text.encode("utf-8", "surrogateescape")) is not None

    def sub(self, replacement: str, text: str) -> str:
        """Every match replaced (Envoy's regex_rewrite); `replacement` in Python's syntax
        (\\g<0> for the whole match, \\1 … for groups)."""
        return str(self._compiled.sub(replacement, text))

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"
