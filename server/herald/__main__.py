"""``python -m herald``: the command line."""

from __future__ import annotations

from herald.cli import main

raise SystemExit(main())
