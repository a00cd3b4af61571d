"""Small rules shared by the whole package, each written once.

- ``check_positive_int``: the one positive-integer check (counts: steps, probes, k, ...).
- ``DTYPES`` / ``parse_dtype`` / ``dtype_name``: the one map between dtype names and torch dtypes.
- ``std_error``: the standard error of a mean over samples (nan for fewer than two).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["DTYPES", "check_positive_int", "dtype_name", "parse_dtype", "std_error"]

#: Names accepted for a dtype (CLI flags, JSON configs, API strings) and the dtype they mean.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def check_positive_int(name: str, value) -> int:
    """``value`` as an ``int`` if it is an integer ≥ 1 (not a bool), else a ``ValueError``.

    >>> check_positive_int("num_steps", 3)
    3
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def parse_dtype(dtype, what: str = "dtype") -> torch.dtype | None:
    """A ``torch.dtype`` from a dtype or one of the names in ``DTYPES`` (None stays None).

    >>> parse_dtype("bf16")
    torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(
            f"{what} must be one of float32, float64, bfloat16, float16; got {dtype!r}"
        )
    return DTYPES[key]


def dtype_name(dtype) -> str | None:
    """The short name of a dtype (``torch.bfloat16`` -> ``"bfloat16"``); None stays None.

    >>> dtype_name(torch.float32)
    'float32'
    """
    if dtype is None:
        return None
    return str(parse_dtype(dtype)).replace("torch.", "")


def std_error(samples) -> float:
    """Standard error of the mean of ``samples``: ``std(ddof=1) / sqrt(n)``; nan when n < 2.

    >>> round(std_error([1.0, 3.0]), 6)
    1.0
    """
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    return float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
