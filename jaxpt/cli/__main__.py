"""``python -m jaxpt.cli ...`` is ``jaxpt ...``."""

from jaxpt.cli import main

raise SystemExit(main())
