"""`python -m miniai ...`: the command line (see `miniai.app.cli`)."""
from .app.cli import main

if __name__ == '__main__': raise SystemExit(main())
