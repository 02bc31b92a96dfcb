"""``python -m hfweight.search``: the ``hfweight search-mixture`` command (:mod:`hfweight.search.cli`)."""

from .cli import main

raise SystemExit(main())
