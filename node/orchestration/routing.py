"""Routing: where a job's results go."""

from __future__ import annotations

from ..config import Config, Destination

__all__ = ["destinations_for"]


def destinations_for(config: Config, source_ae: str, source_address: str) -> tuple[list[Destination], str | None]:
    """Where a job's results go: the configured destinations, else the peer that sent the study.

    Returns the destinations and, when there are none, why.
    """
    if config.destinations:
        return list(config.destinations), None
    peer = config.peer_for(source_ae, source_address)
    if peer is None or peer.port is None:
        return [], (f"no destinations configured and the sender {source_ae or '?'} has no port in [[peers]]:"
                    " results are kept but not sent")
    host = source_address if peer.host == "*" else peer.host
    return [Destination(name=source_ae, ae_title=source_ae, host=host, port=peer.port)], None
