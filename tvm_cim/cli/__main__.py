"""``python -m tvm_cim.cli``: the ``tvm-cim`` program."""

import sys

from tvm_cim.cli.main import main

sys.exit(main())
