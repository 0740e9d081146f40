"""The node graph that the PC engine relaxes.

A PC graph is a list of value nodes in topological order. Each node holds a callable ``fn``
(usually a sub-module of an ordinary ``nn.Module``) and the names of its parents; its prediction
is ``mu = fn(*parent_values)``. The input node is clamped to the data; the last node is the
output, whose energy is the task loss. Merges with two parents (add, concat) are ordinary nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Node:
    """A value node: ``mu = fn(*values[parents])``."""

    name: str
    fn: Callable[..., torch.Tensor]
    parents: tuple[str, ...]


class PCGraph:
    """Validated topological list of nodes with their children and depth.

    Example::

        graph = PCGraph([Node("h", nn.Linear(4, 8), ("input",)),
                         Node("out", nn.Linear(8, 2), ("h",))])
        logits = graph.forward(torch.randn(5, 4))
    """

    def __init__(self, nodes: Sequence[Node], input_name: str = "input",
                 input_check: Callable[[torch.Tensor], None] | None = None) -> None:
        if not nodes:
            raise ValueError("a PC graph needs at least one node")
        self.nodes = list(nodes)
        self.input_name = input_name
        self.input_check = input_check
        seen = {input_name}
        for node in self.nodes:
            if node.name in seen:
                raise ValueError(f"duplicate node name {node.name!r}")
            missing = [p for p in node.parents if p not in seen]
            if missing:
                raise ValueError(
                    f"node {node.name!r} has parents {missing} that are not defined before it; "
                    "list the nodes in topological order"
                )
            if not node.parents:
                raise ValueError(f"node {node.name!r} has no parents")
            seen.add(node.name)
        self.output = self.nodes[-1].name
        self.hidden = [n.name for n in self.nodes[:-1]]
        self.children: dict[str, list[Node]] = {name: [] for name in seen}
        for node in self.nodes:
            for p in set(node.parents):
                self.children[p].append(node)
        dead = [n for n in self.hidden if not self.children[n]]
        if dead:
            raise ValueError(f"hidden nodes {dead} feed no other node; the output must be last")
        depth = {input_name: 0}
        for node in self.nodes:
            depth[node.name] = 1 + max(depth[p] for p in node.parents)
        self.depth = depth[self.output]
        self.modules = nn.ModuleList(n.fn for n in self.nodes if isinstance(n.fn, nn.Module))

    def to(self, *args, **kwargs) -> PCGraph:
        """Move or cast every node module (as ``nn.Module.to``); returns the graph."""
        self.modules.to(*args, **kwargs)
        return self

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter reachable from the nodes, each once."""
        return [p for p in self.modules.parameters() if p.requires_grad]

    def node_parameters(self, node: Node) -> list[nn.Parameter]:
        if not isinstance(node.fn, nn.Module):
            return []
        return [p for p in node.fn.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain feedforward pass through the nodes; returns the output node's value."""
        values = {self.input_name: x}
        for node in self.nodes:
            values[node.name] = node.fn(*(values[p] for p in node.parents))
        return values[self.output]


def sequential_graph(layers: Sequence[nn.Module], names: Sequence[str] | None = None,
                     input_check: Callable[[torch.Tensor], None] | None = None) -> PCGraph:
    """A chain graph: one node per entry of ``layers`` (each may itself be a small Sequential)."""
    names = list(names) if names is not None else [f"layer{i}" for i in range(len(layers))]
    if len(names) != len(layers):
        raise ValueError(f"{len(names)} names for {len(layers)} layers")
    nodes, parent = [], "input"
    for name, layer in zip(names, layers):
        nodes.append(Node(name, layer, (parent,)))
        parent = name
    return PCGraph(nodes, input_check=input_check)
