"""One base class for every error this toolkit raises on purpose.

The command lines catch `MaskbitError` and print its first line; anything else (a TypeError, a KeyError from
a bug) keeps its traceback, so programming errors are never disguised as bad input. Each subclass also
derives from the builtin it refines (ValueError for bad input, RuntimeError for an environment that cannot
run something), so callers that catch the builtin keep working.
"""

from __future__ import annotations


class MaskbitError(Exception):
    """Base of all errors that describe bad input or an unusable environment, not a bug."""


class InputError(MaskbitError, ValueError):
    """A value given by the user or read from a file is missing, of the wrong type or out of range."""


class MissingDependencyError(MaskbitError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


def require(module: str, extra: str, purpose: str):
    """Import `module` or raise MissingDependencyError naming `pip install 'maskbit[extra]'`."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{purpose} needs {module.split('.')[0]}: pip install 'maskbit[{extra}]'") \
            from None
