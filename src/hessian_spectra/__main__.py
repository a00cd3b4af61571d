"""``python -m hessian_spectra`` = the ``hessian-spectra`` command."""

import sys

from .cli import main

sys.exit(main())
