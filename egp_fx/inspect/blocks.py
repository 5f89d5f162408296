"""Which block of the model each graph node belongs to (the unit of the diff and the picture).

A block is a module-path prefix: `layer2.0` in a ResNet, `features.3` in a MobileNet,
`layers.1.blocks.0` in a timm Swin, `blocks.3` in a ViT. It is found from the module path of the
node (its call_module target, or the innermost entry of node.meta["nn_module_stack"], which
torch.fx's tracer records with the type of every enclosing module):

- the path is cut after the deepest index into a plain container (nn.Sequential / ModuleList /
  ModuleDict) whose element holds two or more conv/linear layers: `layer1.0.downsample.0` stops
  at `layer1.0` (the downsample element is one conv), `layers.1.blocks.0.attn.qkv` at
  `layers.1.blocks.0`;
- a cut that lands on a stage (a container of such blocks, or a module with one as a child)
  takes one more component: `layers.1.downsample.reduction` -> `layers.1.downsample`,
  `features.0.0` -> `features.0`.

Module types come from the recorded stacks, not from the GraphModule: fx rebuilds the
intermediate containers of a traced model as plain nn.Module objects.
Nodes with no module (top-level functions such as torch.flatten, nodes a rewrite added) take the
block of their first input that has one; placeholders and the output are "(input)"/"(output)".
"""
from __future__ import annotations

from collections import defaultdict

import torch.fx as fx
from torch import nn

from egp_fx.ir.attrs import CAPTURE_META_KEY
from egp_fx.ir.ops import Ops
from egp_fx.pipeline.measures import WEIGHTED

INPUT_BLOCK = "(input)"
OUTPUT_BLOCK = "(output)"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _strip(path: str, prefix: str) -> str:
    return path[len(prefix):] if prefix and (path + ".").startswith(prefix) else path


def _stack_paths(node: fx.Node, prefix: str = "") -> list[tuple[str, type | None]]:
    out = []
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path, cls = value if isinstance(value, tuple) else (value, None)
        path = _strip(str(path), prefix)
        if path:
            out.append((path, cls if isinstance(cls, type) else None))
    return out


def module_path(node: fx.Node, prefix: str = "") -> str | None:
    """The module a node was captured inside (None at top level); `prefix` is the capture's."""
    if node.op == "call_module":
        return str(node.target)
    stack = _stack_paths(node, prefix)
    if stack:
        return stack[-1][0]
    if node.op == "get_attr" and "." in str(node.target):
        return _strip(str(node.target).rsplit(".", 1)[0], prefix) or None
    return None


class BlockNamer:
    """Maps module paths and nodes to block names; learns the module tree from a traced graph."""

    def __init__(self, gm: fx.GraphModule):
        self._types: dict[str, type | None] = {}
        self._children: dict[str, set[str]] = defaultdict(set)
        self._weighted: dict[str, set[str]] = defaultdict(set)
        self._cache: dict[str, str] = {}
        info = gm.meta.get(CAPTURE_META_KEY)
        self.prefix = info.prefix if info is not None else ""
        ops = Ops(gm)
        modules = ops.modules
        for node in gm.graph.nodes:
            for path, cls in _stack_paths(node, self.prefix):
                self._add_path(path, cls)
            path = module_path(node, self.prefix)
            if path is None:
                continue
            self._add_path(path, type(modules[path]) if node.op == "call_module"
                           and path in modules else None)
            if ops(node).role in WEIGHTED:
                item = path if node.op == "call_module" else f"{path}:{node.name}"
                parts = path.split(".")
                for i in range(1, len(parts) + 1):
                    self._weighted[".".join(parts[:i])].add(item)

    def _add_path(self, path: str, cls: type | None) -> None:
        if cls is not None or path not in self._types:
            self._types[path] = cls
        head, _, _ = path.rpartition(".")
        while head:
            self._children[head].add(path)
            self._types.setdefault(head, None)
            head, path = head.rpartition(".")[0], head

    def _is_container(self, path: str) -> bool:
        """A plain container; a path never entered as a module (timm loops over its blocks) counts
        as one when all its children are indices."""
        cls = self._types.get(path)
        if cls is None:
            children = self._children[path]
            return bool(children) and all(c.rpartition(".")[2].isdigit() for c in children)
        return cls in _CONTAINERS

    def _is_block(self, path: str) -> bool:
        """`path` is an element of a plain container and holds two or more conv/linear layers."""
        parent = path.rpartition(".")[0]
        return bool(parent) and self._is_container(parent) and len(self._weighted[path]) >= 2

    def _holds_blocks(self, path: str) -> bool:
        return self._is_container(path) and any(self._is_block(e) for e in self._children[path])

    def _is_stage(self, path: str) -> bool:
        """A container of blocks, or a module with such a container as a child."""
        return self._holds_blocks(path) or any(self._holds_blocks(c) for c in self._children[path])

    def block_of_path(self, path: str) -> str:
        """The block name of a module path."""
        if path not in self._cache:
            parts = path.split(".")
            end = 1
            for i in range(2, len(parts) + 1):
                if self._is_block(".".join(parts[:i])):
                    end = i
            if end < len(parts) and self._is_stage(".".join(parts[:end])):
                end += 1
            self._cache[path] = ".".join(parts[:end])
        return self._cache[path]

    def blocks(self, gm: fx.GraphModule) -> dict[str, str]:
        """Node name -> block name for every node of `gm` (the traced graph or a rewritten one)."""
        out: dict[str, str] = {}
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                out[node.name] = INPUT_BLOCK
            elif node.op == "output":
                out[node.name] = OUTPUT_BLOCK
            else:
                path = module_path(node, self.prefix)
                if path is not None:
                    out[node.name] = self.block_of_path(path)
                else:
                    inherited = [out[i.name] for i in node.all_input_nodes
                                 if out.get(i.name) not in (None, INPUT_BLOCK)]
                    out[node.name] = inherited[0] if inherited else INPUT_BLOCK
        return out


def stage_of(block: str) -> str:
    """The stage a block sits in: the block name without its last index (`layer2.0` -> `layer2`)."""
    head, _, tail = block.rpartition(".")
    return head if head and tail.isdigit() else block
