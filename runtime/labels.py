"""Class labels given as numbers or names (ImageNet synonyms for 1000-class models, or a bundle's own names)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

from .errors import InputError


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, ...], ...]:
    """Line i of the ImageNet class list: the comma-separated synonyms of label i."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text()
    return tuple(tuple(s.strip() for s in line.split(",")) for line in text.splitlines() if line.strip())


def class_names(num_classes: int, names: Sequence[str] | None = None) -> Sequence[Sequence[str]] | None:
    """Synonyms per class: the bundle's own names, else ImageNet's for 1000-class models, else None."""
    if names:
        return [(n,) for n in names]
    return imagenet_classes() if num_classes == 1000 else None


def parse_labels(items: Sequence[str | int], num_classes: int, names: Sequence[str] | None = None) -> list[int]:
    """Each item a class index or a class name (case-insensitive, any synonym); one clear error otherwise."""
    table = class_names(num_classes, names)
    labels = []
    for item in items:
        text = str(item).strip()
        if text.lstrip("-").isdecimal():              # not isdigit: int() refuses digits such as '²'
            value = int(text) if len(text) <= 20 else None      # int() refuses more than 4300 digits
            if value is None or not 0 <= value < num_classes:
                shown = value if value is not None else f"{text[:20]}..."
                raise InputError(f"label {shown} is out of range: this model has classes 0..{num_classes - 1}")
            labels.append(value)
            continue
        if table is None:
            raise InputError(f"label {text!r} is not a number and this {num_classes}-class model has no class names")
        matches = [i for i, synonyms in enumerate(table) if text.lower() in (s.lower() for s in synonyms)]
        if not matches:
            raise InputError(f"unknown class name {text!r}; use a class index or a name such as "
                             f"{', '.join(repr(s[0]) for s in table[:3])}")
        if len(matches) > 1:
            raise InputError(f"class name {text!r} is ambiguous: classes {matches}; use the index")
        labels.append(matches[0])
    if not labels:
        raise InputError("no labels given")
    return labels


def label_name(label: int, num_classes: int, names: Sequence[str] | None = None) -> str:
    table = class_names(num_classes, names)
    return table[label][0] if table else str(label)
