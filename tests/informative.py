"""One guard for every image / tensor comparison in the real-host suites (tests/webui, tests/comfyui).

A comparison of two broken outputs proves nothing: two all-black images (a NaN decoded to 0), two NaN
tensors (`nan <= tol * nan` is False, but `abs(a - b).max() == 0` on two zero images is True) or two
constant images agree trivially. Each compared value must first be finite and not constant.
"""
from __future__ import annotations


def _as_float_array(x):
    import numpy as np

    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_informative(*values, name: str = "output"):
    """Assert each value (numpy array, torch tensor, or PIL-decoded image array) is finite and not
    constant (its max differs from its min). Returns the values, so it can wrap a comparison's operands."""
    import numpy as np

    for i, v in enumerate(values):
        a = _as_float_array(v)
        assert a.size > 0, f"{name}[{i}] is empty"
        assert np.isfinite(a).all(), f"{name}[{i}] has {int((~np.isfinite(a)).sum())} non-finite values of {a.size}"
        lo, hi = float(a.min()), float(a.max())
        assert hi > lo, f"{name}[{i}] is constant ({lo}): a degenerate output (black image, NaN decoded to 0, ...)"
    return values if len(values) != 1 else values[0]
