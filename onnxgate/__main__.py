"""`python -m onnxgate` runs the `onnxgate` command."""

import sys

from onnxgate.server.cli import main

sys.exit(main())
