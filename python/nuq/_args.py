"""Argument checks shared by nuq's Python functions. Each error names the function and the argument as the
caller wrote it (``quantize: bits must be 2, 3 or 4, got 5``), before anything reaches the C++ library,
whose own messages speak of the weight or the file at fault."""
from __future__ import annotations

import math
import os
from typing import Optional, Union

Fraction = Union[float, str]
PathLike = Union[str, "os.PathLike[str]"]

# A sparse or outlier fraction above this, given as a number, is far more likely a percentage typed as a
# fraction (0.45 for 0.45%) than a wish: 20% of the weights in fp16 + indices costs over 6 bits per weight
# on top of the dense part. Such numbers are refused; a percent string ("45%") states the intent.
MAX_PLAIN_FRACTION = 0.2


def bits(fn: str, value: object, allowed: tuple[int, ...] = (2, 3, 4), name: str = "bits") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int ({', '.join(map(str, allowed))}), got {value!r}")
    if value not in allowed:
        raise ValueError(f"{fn}: {name} must be {', '.join(map(str, allowed[:-1]))} or {allowed[-1]}, got {value}")
    return value


def fraction(fn: str, name: str, value: object) -> float:
    """A fraction of the weights in [0, 1): a number (0.0045) or a percent string ('0.45%').

    Numbers above MAX_PLAIN_FRACTION are refused with a message saying how to write what was probably
    meant; percent strings are taken at their word."""
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ValueError(f"{fn}: {name} takes a number (0.0045) or a percent string ('0.45%'), got {value!r}")
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ValueError(f"{fn}: {name}: {value!r} is not a percentage such as '0.45%'") from None
        if not (math.isfinite(percent) and 0 <= percent < 100):
            raise ValueError(f"{fn}: {name} must be a percentage in [0%, 100%), got {value!r}")
        return percent / 100
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number (0.0045) or a percent string ('0.45%'), got {value!r}")
    f = float(value)
    if not (math.isfinite(f) and 0 <= f < 1):
        raise ValueError(f"{fn}: {name} must be a fraction in [0, 1) such as 0.0045 (or a percent string "
                         f"such as '0.45%'), got {value!r}")
    if f > MAX_PLAIN_FRACTION:
        raise ValueError(
            f"{fn}: {name}={value!r} would keep {f * 100:g}% of the weights; {name} is a fraction, so 0.45% is "
            f"0.0045 (or the string '0.45%'). Fractions above {MAX_PLAIN_FRACTION} are refused as probable "
            f"percentages: pass '{f * 100:g}%' if you mean {f * 100:g}%")
    return f


def path(fn: str, name: str, value: object) -> str:
    if isinstance(value, (str, os.PathLike)):
        p = os.fspath(value)
        if isinstance(p, str) and p:
            return p
    raise TypeError(f"{fn}: {name} must be a path (str or os.PathLike), got {value!r}")


def optional_path(fn: str, name: str, value: object) -> Optional[str]:
    return None if value is None else path(fn, name, value)


def integer(fn: str, name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def choice(fn: str, name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{fn}: {name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value
