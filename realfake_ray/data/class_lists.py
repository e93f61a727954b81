"""Class-name lists shipped with the package: ``data.classes_file: imagenet1k`` names one instead of a file.

Example:
    >>> shipped_class_list("imagenet1k").endswith("imagenet1k_classes.txt"), shipped_class_list("s3://b/c.txt")
    (True, None)
"""

from __future__ import annotations

import os

__all__ = ["SHIPPED_CLASS_LISTS", "shipped_class_list"]

# name -> file in the lines format ("n01440764 tench"), beside this module (package data)
SHIPPED_CLASS_LISTS = {"imagenet1k": os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet1k_classes.txt")}


def shipped_class_list(spec: str) -> str | None:
    """The local path of the shipped list that ``spec`` names, or None when ``spec`` is a file's URL."""
    return SHIPPED_CLASS_LISTS.get(spec)
