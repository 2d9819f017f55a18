"""Shared fixtures: a node process per test, on a free port of 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.peers import NodeProcess, free_port


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator:
    """Start nodes with given settings; all are stopped at the end of the test."""
    started: list[NodeProcess] = []

    def start(name: str = "node", **settings) -> NodeProcess:
        node = NodeProcess(folder=tmp_path / name, port=free_port(), settings=settings)
        node.folder.mkdir(parents=True, exist_ok=True)
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def node(node_factory) -> NodeProcess:
    """A node with the test defaults: open to this machine, quiet time 1 s."""
    return node_factory()
