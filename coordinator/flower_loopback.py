"""Run a Flower ServerApp against ClientApps in this process, without Ray (optional: needs `flwr`).

Flower 1.42's `run_simulation` only has a Ray backend, and `flwr[simulation]` cannot be
installed next to our pins (flwr itself wants cryptography 50 and pycryptodome 3). This
module supplies the one missing piece, a `Grid` that delivers each message straight to the
destination node's `ClientApp` with that node's persistent `Context`, so everything else is
Flower's own code: `ServerApp` -> legacy `Server` loop -> our `Strategy` -> `GridClientProxy`
-> FitIns/FitRes <-> RecordDict conversion -> `ClientApp` -> `client_fn` -> `NumPyClient`.
The Server's thread pool still runs the clients of a round concurrently.
"""
from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run


@dataclass
class Node:
    """One simulated SuperNode: its ClientApp and node config (Context persists across messages)."""

    app: Any  # flwr ClientApp
    node_config: dict[str, Any] = field(default_factory=dict)


class LoopbackGrid(Grid):
    """A Grid whose nodes are ClientApps in this process; node ids are 1..N."""

    def __init__(self, nodes: Sequence[Node], run_id: int = 1, run_config: Mapping[str, Any] | None = None):
        if not nodes:
            raise ValueError("a loopback federation needs at least one node")
        self._run = Run.create_empty(run_id)
        self._nodes = {i + 1: n for i, n in enumerate(nodes)}
        self._contexts = {i: Context(run_id=run_id, node_id=i, node_config=dict(n.node_config), state=RecordDict(),
                                     run_config=dict(run_config or {})) for i, n in self._nodes.items()}
        self._replies: dict[str, Message] = {}
        self._lock = threading.Lock()
        self.messages_sent = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def context(self, node_id: int) -> Context:
        return self._contexts[node_id]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; the reply waits for pull_messages."""
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self._nodes:
                raise ValueError(f"message for unknown node {node}; nodes are {sorted(self._nodes)}")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what a SuperLink assigns
            reply = self._nodes[node].app(msg, self._contexts[node])
            with self._lock:
                self._replies[msg.metadata.message_id] = reply
                self.messages_sent += 1
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(server_app: Any, nodes: Sequence[Node], run_config: Mapping[str, Any] | None = None) -> LoopbackGrid:
    """Run `server_app` to completion against `nodes`; returns the grid (its contexts hold node state)."""
    grid = LoopbackGrid(nodes, run_config=run_config)
    ctx = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                  run_config=dict(run_config or {}))
    server_app(grid, ctx)
    return grid
