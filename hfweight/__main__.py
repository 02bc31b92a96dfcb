"""``python -m hfweight ...``: the ``hfweight`` command (:mod:`hfweight.cli`)."""

from hfweight.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
