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


def check_on_policy_arguments(learning_rate: object, n_steps: object, gamma: object, gae_lambda: object) -> None:
    """
    The checks every on-policy algorithm here shares (SB3's ``OnPolicyAlgorithm`` makes none of them).

    :param learning_rate: a positive number, or a schedule (callable)
    :param n_steps: steps per environment per rollout, >= 1
    :param gamma: discount factor in [0, 1]
    :param gae_lambda: GAE factor in [0, 1]
    """
    if not callable(learning_rate):
        check_float("learning_rate", learning_rate, low=0.0, low_inclusive=False)
    check_int("n_steps", n_steps, minimum=1)
    check_float("gamma", gamma, 0.0, 1.0)
    check_float("gae_lambda", gae_lambda, 0.0, 1.0)
