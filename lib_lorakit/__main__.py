import os
import sys

# This process is lorakit's own: before torch loads, ask MKL to give its per-thread GEMM buffers back
# after each call instead of keeping them (one set per torch thread: on 16 cores a bake peaked 40-60 MB
# higher with them kept).
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

from .cli import leave, main  # noqa: E402

if sys.flags.inspect:  # python -i: stay in the interpreter afterwards
    sys.exit(main())
try:
    code = main()
except SystemExit as e:  # argparse: --help, usage errors
    code = e.code
leave(code)
