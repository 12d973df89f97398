"""`python -m miniai ...`: the command line (see `miniai.cli`)."""
from .cli import main

if __name__ == '__main__': raise SystemExit(main())
