"""``python -m tep`` is the ``tep`` command."""
from tep.server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
