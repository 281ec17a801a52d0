import sys

from tvm_cim.cli.main import main

sys.exit(main())
