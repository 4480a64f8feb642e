import sys

from .cli import leave, main

if sys.flags.inspect:  # python -i: stay in the interpreter afterwards
    sys.exit(main())
try:
    code = main()
except SystemExit as e:  # argparse: --help, usage errors
    code = e.code
leave(code)
