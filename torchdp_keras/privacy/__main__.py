"""`python -m torchdp_keras.privacy`: see `torchdp_keras.privacy.cli`."""

import sys

from torchdp_keras.privacy.cli import main

sys.exit(main())
