"""``python -m convfactor``: the same command line as ``convfactor``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
