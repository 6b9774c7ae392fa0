"""
txcluster: run a Twisted/Klein web app on every core.

A twistd plugin master binds the port once and supervises N worker
processes; each worker adopts the port and serves the app.
"""

from typing import Any

__all__ = ["Cluster", "WorkerInfo"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that the master (which imports txcluster.tap) never loads
    # klein or the app's dependencies.
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'txcluster' has no attribute {name!r}")
