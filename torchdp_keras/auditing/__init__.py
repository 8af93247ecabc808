"""Privacy auditing: empirical lower bounds on the epsilon of a training run.

An audit measures how well a membership test tells apart training runs (or
canaries) with and without an example, and turns that into a lower bound on
epsilon that holds with probability at least `confidence`. A lower bound
above the epsilon the accountant reports means the implementation, or its
privacy analysis, is broken; a lower bound below it proves nothing either way
(audits are not estimates of the true epsilon).

* `torchdp_keras.auditing.bounds` (numpy and scipy only): Clopper-Pearson
  intervals, the classical many-run audit from counts or scores, and the
  one-run audit of Steinke, Nasr and Jagielski (2023).
* `audit_dp_training` (imports keras and torch when called): trains a DP
  model once with canaries, each included with probability 1/2, and reports
  the one-run lower bound next to the epsilon the model claims.

Example:
    >>> from torchdp_keras.auditing import one_run_epsilon_lower_bound
    >>> round(one_run_epsilon_lower_bound(num_guesses=100, num_correct=100), 3)
    3.493
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from torchdp_keras.auditing.bounds import (
    AuditResult,
    clopper_pearson_interval,
    epsilon_lower_bound_from_counts,
    epsilon_lower_bound_from_scores,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)

_LAZY = {
    "TrainingAuditReport": "torchdp_keras.auditing.canaries",
    "audit_dp_training": "torchdp_keras.auditing.canaries",
    "make_canaries": "torchdp_keras.auditing.canaries",
    "per_example_losses": "torchdp_keras.auditing.canaries",
}

__all__ = [
    "AuditResult",
    "clopper_pearson_interval",
    "epsilon_lower_bound_from_counts",
    "epsilon_lower_bound_from_scores",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torchdp_keras.auditing' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from torchdp_keras.auditing.canaries import (  # noqa: F401
        TrainingAuditReport,
        audit_dp_training,
        make_canaries,
        per_example_losses,
    )
