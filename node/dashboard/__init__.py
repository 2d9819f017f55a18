"""The web dashboard: what arrived, what was decided, results to look at, deliveries to retry.

Served by the node process on its own port (``dashboard.host``, ``dashboard.port``), on its own
thread and event loop, reading the node's SQLite database through connections of its own; see
README "Dashboard". :mod:`.settings` (configuration), :mod:`.access` (login, roles, sessions,
CSRF), :mod:`.app` (pages and actions), :mod:`.pages` (what each page shows).
"""

from __future__ import annotations

from ..config import Config
from ..operations.state import NodeState
from ..operations.webserver import BackgroundServer
from .app import Hooks, create_app
from .ids import load_key
from ..config import DashboardSettings

__all__ = ["DashboardServer", "Hooks"]


class DashboardServer:
    """The dashboard of one running node.

    Raises
    ------
    OSError
        If ``dashboard.host:dashboard.port`` cannot be bound.
    """

    def __init__(self, config: Config, settings: DashboardSettings, hooks: Hooks) -> None:
        self.state = NodeState(config)
        try:
            app = create_app(config, settings, self.state, hooks, load_key(config.data / "dashboard.key"))
            self.server = BackgroundServer(app, settings.host, settings.port, "dashboard", threads=4, max_requests=64)
        except BaseException:
            self.state.close()
            raise

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.state.close()
