"""Products that read the same token, made as one matrix-vector product (off unless SHARP_GEMV_GROUPS=1).

Why: in a one-token decode step each attention reads the same hidden row three times (q, k and v)
and each MLP twice (gate and up). The small products are latency-bound: on an H200 sharp's kernel
read Qwen2.5-VL-7B's k and v (512 x 3584) at 0.88 TB/s, 4.2 us each, against q's 2.8 TB/s
(docs/benchmarks.md, "The matrix-vector kernel"). One product over the rows of all three reads the
same bytes in one launch, at the long product's rate: 28 layers x (3 + 2) launches become 28 x 2.

How: `group_products(text_model)` copies the weights (and biases) of each attention's q, k and v,
and of each MLP's gate and up, into one (n_1 + n_2 [+ n_3], k) tensor and makes each module's
parameter a view of its rows: the same values and state dict, and no memory beyond the load's
transient copy. The group's first module, called on one token where gemv takes it, computes the
whole product and keeps the other parts for the calls that follow with the same input tensor (the
modelling code calls q, k, v and gate, up in that order on one hidden row); the others return theirs.
Every other call (prefill, a batch, another input, a follower called first, torch.compile) goes the
module's own way, so the result never depends on the order transformers calls them in.

Off until research/gpu-notes.md's check on a GPU (the decode step's time and cuda_check with it on);
the CPU tests compare greedy answers and logits with it on and off under Triton's interpreter.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from sharp_cli.models.gemv import GemvLinear, gemv_op, takes_one_token

SWITCH = "SHARP_GEMV_GROUPS"  # =1: one product per attention's q, k, v and per MLP's gate, up
DEFAULT = "0"
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def on() -> bool:
    return os.environ.get(SWITCH, DEFAULT) == "1"


class ProductGroup:
    """The grouped weight (n_1 + ... , k), its bias or None, each member's rows, and the parts of the
    last one-token product with the input they were made from (until every follower took its part)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
        self.weight, self.bias, self.sizes = weight, bias, sizes
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.waiting: set[int] = set()

    def lead(self, x: torch.Tensor) -> torch.Tensor:
        self.parts = gemv_op(x, self.weight, self.bias).split(self.sizes, dim=-1)
        self.input, self.waiting = x, set(range(1, len(self.sizes)))
        return self.parts[0]

    def follow(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        if x is not self.input or index not in self.waiting:
            return None
        self.waiting.discard(index)
        part = self.parts[index]
        if not self.waiting:  # all taken: hold no tensor between steps
            self.input, self.parts = None, ()
        return part


class GroupedGemvLinear(GemvLinear):
    """A GemvLinear that is member `index` of a ProductGroup (index 0 leads)."""

    group: ProductGroup
    index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_one_token(x, self.weight) and not torch.compiler.is_compiling():
            if self.index == 0:
                return self.group.lead(x)
            part = self.group.follow(self.index, x)
            if part is not None:
                return part
        return super().forward(x)


def group_products(text_model) -> int:
    """Groups the q, k, v and the gate, up GemvLinears of every module under `text_model` that has
    them all with one input width, dtype and device, and biases on all or none; returns how many groups."""
    groups = 0
    for module in text_model.modules():
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if _groupable(members):
                _group(members)
                groups += 1
    return groups


def _groupable(members) -> bool:
    if not all(type(m) is GemvLinear for m in members):
        return False
    first = members[0].weight
    return all(m.weight.shape[1] == first.shape[1] and m.weight.dtype == first.dtype and m.weight.device == first.device
               and m.weight.is_contiguous() for m in members) and len({m.bias is None for m in members}) == 1


def _group(members) -> None:
    with torch.no_grad():
        weight = torch.cat([m.weight for m in members])  # (sum of rows, k)
        bias = torch.cat([m.bias for m in members]) if members[0].bias is not None else None
    sizes = [m.weight.shape[0] for m in members]
    group = ProductGroup(weight, bias, sizes)
    start = 0
    for index, (member, rows) in enumerate(zip(members, sizes)):
        member.weight = nn.Parameter(weight[start:start + rows], requires_grad=member.weight.requires_grad)
        if bias is not None:
            member.bias = nn.Parameter(bias[start:start + rows], requires_grad=member.bias.requires_grad)
        member.__class__ = GroupedGemvLinear
        member.group, member.index = group, index
        start += rows
