"""python -m dllm.train (see dllm.train.run)."""
import sys

from .run import main

sys.exit(main())
