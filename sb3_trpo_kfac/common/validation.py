"""Constructor argument checks: a bad value fails at construction with an error naming the argument."""

import numbers


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """
    :param name: argument name shown in the error
    :param value: the value given
    :param minimum: smallest allowed value (inclusive)
    :return: the value as an int
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def check_float(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """
    :param name: argument name shown in the error
    :param value: the value given (any real number, not a bool)
    :param low: lower bound, or None
    :param high: upper bound, or None
    :param low_inclusive: whether ``low`` itself is allowed
    :param high_inclusive: whether ``high`` itself is allowed
    :return: the value as a float
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    too_low = low is not None and (value < low or (value == low and not low_inclusive))
    too_high = high is not None and (value > high or (value == high and not high_inclusive))
    if too_low or too_high or value != value:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"`{name}` must be in {interval}, got {value}")
    return value
