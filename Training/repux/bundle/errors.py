"""``BundleError`` and a typed reader for JSON objects whose every error names file, key and expectation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from repux.errors import InputError


class BundleError(InputError):
    """A bundle, label file or checkpoint that cannot be used.

    The message names the file, the key (dotted, e.g. ``preprocessing.spacing``) and what was expected.
    """


def is_int(value: Any) -> bool:
    """True for JSON integers (``bool`` is an ``int`` in Python but not a number here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for finite JSON numbers."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def shown(value: Any, limit: int = 80) -> str:
    """``repr`` of a value, shortened so that an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JsonFields:
    """Typed access to one JSON object read from ``source``.

    Args:
        data: the parsed JSON value expected to be an object.
        source: what to name in errors, usually the file path.
        path: dotted key of this object inside the file ("" for the top level).
    """

    def __init__(self, data: Any, source: str, path: str = "") -> None:
        self.source = source
        self.path = path
        if not isinstance(data, dict):
            where = f"key '{path}'" if path else "top level"
            raise BundleError(f"{source}: {where}: expected a JSON object, got {shown(data)}")
        self.data: dict[str, Any] = data

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def key(self, name: str) -> str:
        """The dotted key of ``name`` inside the file."""
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, expected: str, got: Any) -> BundleError:
        return BundleError(f"{self.source}: key '{self.key(name)}': expected {expected}, got {shown(got)}")

    def only(self, allowed: Iterable[str]) -> None:
        """Refuse keys outside ``allowed``: a misspelt key would otherwise be silently ignored."""
        allowed = list(allowed)
        for name in self.data:
            if name not in allowed:
                raise BundleError(
                    f"{self.source}: unknown key '{self.key(name)}' (expected only {', '.join(allowed)})"
                )

    def get(self, name: str, expected: str, check: Callable[[Any], bool] = lambda value: True) -> Any:
        """The value of a required key that passes ``check``; ``expected`` describes a valid value."""
        if name not in self.data:
            raise BundleError(f"{self.source}: key '{self.key(name)}' is missing (expected {expected})")
        value = self.data[name]
        if not check(value):
            raise self.error(name, expected, value)
        return value

    def integer(self, name: str, minimum: int | None = None) -> int:
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        return self.get(name, expected, lambda v: is_int(v) and (minimum is None or v >= minimum))

    def number(self, name: str) -> float:
        return float(self.get(name, "a number", is_number))

    def string(self, name: str) -> str:
        return self.get(name, "a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")

    def text(self, name: str) -> str:
        """A string that may be empty (descriptions)."""
        return self.get(name, "a string", lambda v: isinstance(v, str))

    def boolean(self, name: str) -> bool:
        return self.get(name, "true or false", lambda v: isinstance(v, bool))

    def array(self, name: str) -> list:
        return self.get(name, "a JSON array", lambda v: isinstance(v, list))

    def obj(self, name: str) -> "JsonFields":
        return JsonFields(self.get(name, "a JSON object", lambda v: isinstance(v, dict)), self.source, self.key(name))
