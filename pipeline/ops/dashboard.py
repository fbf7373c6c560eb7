"""``pipeline dashboard``: optuna-dashboard over a study's Optuna storage, served from this process.

The storage is opened the way every command opens it (``ops.manage.open_existing``: a torn journal
repaired, a database error with its password masked) and handed to ``optuna_dashboard.run_server``
as an object, so its URL, and a database password in it, never appear on a command line (``ps``).
"""

from __future__ import annotations

import sys

from pipeline.config import StudyConfig
from pipeline.errors import UsageError
from pipeline.ops.manage import open_existing
from pipeline.urls import redact

try:
    import optuna_dashboard
except ImportError:  # the optional `dashboard` extra
    optuna_dashboard = None

INSTALL = "optuna-dashboard is not installed: pip install -e '.[dashboard]' (make dashboard installs it)"


def dashboard_main(cfg: StudyConfig, storage: str | None, host: str, port: int) -> int:
    """Serve the dashboard on ``host:port`` until stopped (Ctrl-C ends it with exit 0)."""
    if optuna_dashboard is None:
        raise UsageError(INSTALL)
    opened, spec = open_existing(cfg, storage)
    print(f"optuna-dashboard over {redact(spec)} (study {cfg.name})", file=sys.stderr, flush=True)
    optuna_dashboard.run_server(opened, host=host, port=port)  # blocks; bottle returns on Ctrl-C
    return 0
