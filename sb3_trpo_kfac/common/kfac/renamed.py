"""Keywords accepted under their former name, with a DeprecationWarning: old code and configurations keep working."""

import warnings
from typing import Any

from sb3_trpo_kfac.common.validation import ArgumentTypeError


def renamed_keywords(
    owner: str, given: dict[str, Any], renames: dict[str, str], current: dict[str, Any]
) -> dict[str, Any]:
    """
    The values of keywords given under their old names, by their new names.

    :param owner: the callable's name (for messages)
    :param given: the keywords the callable did not recognise
    :param renames: old name -> new name
    :param current: the new names' values as called, and their defaults: ``{name: (value, default)}``
    :return: ``{new name: value}``
    :raises TypeError: for a keyword that is neither known nor renamed, or an old name given with its new one
    """
    out = {}
    for old, value in given.items():
        new = renames.get(old)
        if new is None:
            raise ArgumentTypeError(f"{owner}() got an unexpected keyword argument {old!r}")
        called, default = current[new]
        if called is not default and called != default:
            raise ArgumentTypeError(f"{owner}() got both `{old}` (its old name) and `{new}`; give `{new}` only")
        warnings.warn(f"{owner}: `{old}` is deprecated, use `{new}`", DeprecationWarning, stacklevel=3)
        out[new] = value
    return out
