"""Privacy accounting for DP-SGD (numpy and scipy only: no torch, no keras).

Two accountants share one interface (`compose`, `get_epsilon`, `steps`,
`history`, `state_dict`/`load_state_dict`):

* `PRVAccountant`: numerical composition of privacy random variables (Gopi,
  Lee and Wutschitz 2021), by default on dominating and dominated lattice
  pairs (connect-the-dots, Doroshenko et al. 2022); tight, the default
  everywhere in torchdp_keras;
* `RDPAccountant`: Renyi DP, for compatibility with older reports.

Plus the functions users call to plan and report a run:
`compute_dp_sgd_privacy`, `compute_dp_sgd_privacy_statement`,
`get_privacy_budget`, `calibrate_noise_multiplier`.
"""

from torchdp_keras.accounting.analysis import (
    calibrate_noise_multiplier,
    compute_dp_sgd_privacy,
    compute_dp_sgd_privacy_statement,
    default_delta,
    get_privacy_budget,
    make_accountant,
)
from torchdp_keras.accounting.base import Accountant
from torchdp_keras.accounting.prv import PRVAccountant  # noqa: F401
from torchdp_keras.accounting.rdp import RDPAccountant

__all__ = [
    "Accountant",
    "PRVAccountant",
    "RDPAccountant",
    "calibrate_noise_multiplier",
    "compute_dp_sgd_privacy",
    "compute_dp_sgd_privacy_statement",
    "default_delta",
    "get_privacy_budget",
    "make_accountant",
]
