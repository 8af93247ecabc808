"""TF Privacy's `privacy.analysis.compute_dp_sgd_privacy_lib`."""

from torchdp_keras.accounting.analysis import (
    compute_dp_sgd_privacy,
    compute_dp_sgd_privacy_statement,
)

__all__ = ["compute_dp_sgd_privacy", "compute_dp_sgd_privacy_statement"]
