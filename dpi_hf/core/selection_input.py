"""What :func:`~dpi_hf.core.select_core` reads: parameter-name patterns, and the ``deltas`` it reads once per pass.

* :func:`filter_parameter_names` — the ``include``/``exclude`` patterns every engine entry point shares;
* :class:`_Source` — the considered ``(name, tensor)`` pairs of a mapping, a re-iterable, a callable or a one-shot
  iterator, readable once per selection pass and checked to yield the same names and shapes on every pass.

Torch only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from .errors import DPIConfigError

__all__ = ["filter_parameter_names"]

_GLOB_CHARS = frozenset("*?[")


# ---------------------------------------------------------------------------------------------------- name patterns
def _patterns(patterns: str | Iterable[str] | None, arg: str) -> tuple[str, ...] | None:
    """Validate ``include``/``exclude``: None, one string, or an iterable of strings."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    try:
        out = tuple(patterns)
    except TypeError:
        raise DPIConfigError(
            f"{arg}={patterns!r} is not a list of name patterns; pass e.g. {arg}=['*embed_tokens*', 'norm']."
        ) from None
    bad = [p for p in out if not isinstance(p, str) or not p]
    if bad:
        raise DPIConfigError(f"{arg} holds {bad!r}, which are not non-empty strings; pass name patterns as strings.")
    return out


def _matches(name: str, pattern: str) -> bool:
    # A pattern with a glob character must match the whole name; a plain pattern matches anywhere in the name,
    # so "embed_tokens" and "*embed_tokens*" mean the same.
    if _GLOB_CHARS.intersection(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def filter_parameter_names(
    names: Iterable[str],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[str]:
    """The names to consider, in input order.

    A name is kept when it matches at least one ``include`` pattern (every name does when ``include`` is None) and
    no ``exclude`` pattern. Matching is case-sensitive. A pattern that contains a glob character (``*``, ``?`` or
    ``[``) is an :mod:`fnmatch` glob matched against the whole name (``"*.bias"``, ``"model.layers.[0-3].*"``); any
    other pattern is a plain substring (``"embed_tokens"`` matches ``"model.embed_tokens.weight"``).

    Args:
        names: parameter names.
        include: patterns of names to consider; None (default) considers every name. A single string is one pattern.
        exclude: patterns of names to leave out; None (default) leaves out nothing. Exclusion wins over inclusion.

    Returns:
        The kept names, in the order of ``names``.
    """
    inc = _patterns(include, "include")
    exc = _patterns(exclude, "exclude")
    return [
        n
        for n in names
        if (inc is None or any(_matches(n, p) for p in inc)) and not (exc and any(_matches(n, p) for p in exc))
    ]


def _nothing_left_error(names: list[str], include, exclude) -> DPIConfigError:
    if not names:
        return DPIConfigError("deltas is empty; pass at least one (name, update magnitude tensor).")
    shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
    return DPIConfigError(
        f"include={list(include) if include is not None else None} and exclude="
        f"{list(exclude) if exclude is not None else None} leave none of the {len(names)} parameters ({shown}); "
        "loosen the patterns (plain patterns match substrings, patterns with *?[ are globs over the whole name)."
    )


# ---------------------------------------------------------------------------------------------------- input source
class _Source:
    """The considered (name, tensor) pairs of ``deltas``, readable once per selection pass.

    Keeps the names and shapes seen on the first pass and checks that every later pass yields the same ones.
    """

    def __init__(self, deltas, include, exclude, single_pass: bool):
        self._include, self._exclude = include, exclude
        self._mapping: Mapping | None = None
        self._factory: Callable[[], Iterable] | None = None
        self._names: list[str] | None = None  # considered names, known up front for a mapping
        self._shapes: list[tuple[int, ...]] | None = None
        self._passes = 0
        self._all: list[str] = []  # every name of the first pass, considered or not, for error messages
        if isinstance(deltas, Mapping):
            keys = list(deltas.keys())
            bad = [k for k in keys if not isinstance(k, str)]
            if bad:
                raise DPIConfigError(f"deltas has non-string keys {bad[:3]!r}; key it by parameter name.")
            self._names = filter_parameter_names(keys, include, exclude)
            if not self._names:
                raise _nothing_left_error(keys, include, exclude)
            self._mapping = deltas
        elif isinstance(deltas, torch.nn.Module):
            raise DPIConfigError(
                "deltas is a model; pass its update magnitudes instead: update_magnitudes(model, reference)."
            )
        elif isinstance(deltas, (torch.Tensor, str, bytes)):
            raise DPIConfigError(
                f"deltas is a {type(deltas).__name__}; pass a mapping name → magnitude tensor, an iterable of "
                "(name, tensor) pairs, or a callable returning such an iterator."
            )
        elif callable(deltas):
            self._factory = deltas
        elif isinstance(deltas, Iterable):
            if iter(deltas) is deltas and not single_pass:
                # A one-shot iterator (e.g. a generator) cannot be read three times: keep the tensors it yields
                # (references only, never concatenated) for the later passes.
                kept = [(n, t) for n, t in self._checked(deltas, self._all) if self._considered(n)]
                self._factory = lambda: iter(kept)
            else:
                self._factory = lambda: iter(deltas)
        else:
            raise DPIConfigError(
                f"deltas of type {type(deltas).__name__} is not supported; pass a mapping name → tensor, an "
                "iterable of (name, tensor) pairs, or a callable returning such an iterator."
            )

    def _considered(self, name: str) -> bool:
        return bool(filter_parameter_names([name], self._include, self._exclude))

    @staticmethod
    def _checked(pairs: Iterable, record: list[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise DPIConfigError(
                    f"deltas yielded {type(item).__name__} {str(item)[:60]!r}; it must yield (name, tensor) pairs."
                )
            if record is not None:
                record.append(item[0])
            yield item

    def known_shapes(self) -> list[tuple[int, ...]] | None:
        """Shapes of the considered tensors when they are available without computing any (else None)."""
        if self._mapping is None:
            return None
        shapes_of = getattr(self._mapping, "shapes", None)
        if callable(shapes_of):  # a lazy mapping that knows its shapes (UpdateMagnitudes) computes nothing here
            shapes = shapes_of()
            return [shapes[n] for n in self._names]
        if isinstance(self._mapping, dict):
            values = [self._mapping[n] for n in self._names]
            if all(isinstance(v, torch.Tensor) for v in values):
                return [tuple(v.shape) for v in values]
        return None

    def iterate(self, wanted: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Considered pairs in order; with ``wanted``, only those names (a mapping never reads the others)."""
        first = self._passes == 0
        self._passes += 1
        if self._mapping is not None:
            for pos, name in enumerate(self._names):
                if wanted is None or name in wanted:
                    yield name, self._tensor(name, self._mapping[name], pos, first)
            return
        pairs = self._factory()
        if not isinstance(pairs, Iterable):
            raise DPIConfigError(
                f"the deltas callable returned {type(pairs).__name__}; it must return an iterator of (name, tensor)."
            )
        seen: list[str] = []
        # names are recorded on the first pass, unless a kept one-shot iterator recorded them already
        for name, value in self._checked(pairs, self._all if first and not self._all else None):
            if not self._considered(name):
                continue
            pos = len(seen)
            seen.append(name)
            if first:
                if name in seen[:-1]:
                    raise DPIConfigError(f"deltas yields parameter {name!r} twice; yield each parameter once.")
            elif pos >= len(self._names) or self._names[pos] != name:
                raise self._changed_error()
            if wanted is None or name in wanted:
                yield name, self._tensor(name, value, pos, first)
        if first:
            self._names = seen
        elif len(seen) != len(self._names):
            raise self._changed_error()

    def _tensor(self, name: str, value, pos: int, first: bool) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise DPIConfigError(
                f"deltas[{name!r}] is {getattr(value, 'dtype', type(value).__name__)}; pass a floating-point tensor "
                "of update magnitudes |θ − θ0|."
            )
        shape = tuple(value.shape)
        if first:
            if self._shapes is None:
                self._shapes = []
            self._shapes.append(shape)
        elif self._shapes[pos] != shape:
            raise self._changed_error()
        return value

    def _changed_error(self) -> DPIConfigError:
        return DPIConfigError(
            "deltas yielded different parameters (names, order or shapes) on a later pass; a global selection "
            "reads the deltas two or three times, so pass a mapping, a list, or a callable returning the same "
            "sequence each time."
        )

    def all_names(self) -> list[str]:
        """Every name ``deltas`` holds (considered or not), for error messages."""
        return list(self._mapping.keys()) if self._mapping is not None else list(self._all)

