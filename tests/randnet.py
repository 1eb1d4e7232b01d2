"""Random CNN generator for property tests: convs (plain, grouped, depthwise), BN, ReLU,
residual adds, concats (also concat of concats), splits (also split then concat), flatten into
linear layers. Also the "masked" reference: the original model with given channels zeroed.

:func:`random_hostile_cnn` draws the same nets plus "hostile" ops that hide sizes from the
autograd trace (sizes in module attributes, sizes derived from ``x.shape`` or from another
tensor's shape, detached / ``no_grad`` branches, reductions over the channel dim); each is a
small module below (:data:`HOSTILE_OPS`), and :func:`hostile_example` builds a fixed tiny net
around one of them."""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import strategies as st


class SplitSizes(nn.Module):
    """Channel split whose sizes live in an attribute (the graph keeps it up to date)."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(x, self.sizes, dim=1)


# --------------------------------------------------------------------------------------------
# Hostile ops: sizes the autograd trace does not see
# --------------------------------------------------------------------------------------------


class ScaleByShape(nn.Module):
    """``x * scale.view(self.shape)``: a bare parameter viewed with a size kept in an attribute."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.shape = (1, c, 1, 1)
        self.scale = nn.Parameter(torch.empty(c).uniform_(0.5, 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(self.shape)


class WidthReshape(nn.Module):
    """``x.reshape(n, self.width, h, w)``: an identity reshape whose channel count is an attribute."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.width = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return x.reshape(n, self.width, h, w)


class ChannelCheck(nn.Module):
    """``assert x.shape[1] == self.channels``: a size checked, not used by any op."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels, f"expected {self.channels} channels, got {x.shape[1]}"
        return x


class HalfSum(nn.Module):
    """``x.view(b, c // 2, 2, h, w).sum(2)``: sizes derived from the same tensor's shape (channel
    pairs ``2i, 2i + 1`` summed into channel ``i``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, c // 2, 2, h, w).sum(2)


class ReshapeLike(nn.Module):
    """``x.reshape(ref.shape)``: a reshape whose sizes come from another tensor."""

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return x.reshape(ref.shape[0], ref.shape[1], ref.shape[2], ref.shape[3])


class DetachedBranch(nn.Module):
    """``x + conv(x.detach())``: a branch that leaves autograd, added back to the main path."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x.detach())


class NoGradConv(nn.Module):
    """A convolution applied under ``torch.no_grad()`` (its output has no autograd history)."""

    def __init__(self, c: int, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.conv(x)


class MeanGate(nn.Module):
    """``x * x.mean(1, keepdim=True)``: a reduction over channels (not a normalisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.mean(1, keepdim=True)


class ChannelSoftmax(nn.Module):
    """``softmax(x, dim=1)``: a reduction over channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=1)


class HandRMSNorm(nn.Module):
    """``x * rsqrt(mean(x ** 2, 1) + eps)``: a hand-written RMS normalisation over channels (may be
    pruned like a norm layer; the pruned output is then not exactly the masked one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-5)


#: The hostile op kinds of :func:`random_hostile_cnn` and :func:`hostile_example`.
HOSTILE_OPS: tuple[str, ...] = (
    "scale",
    "width",
    "check",
    "halfsum",
    "reshape_like",
    "detached",
    "nograd",
    "mean",
    "softmax",
    "rmsnorm",
)
#: Hostile ops that make the pruned output differ from the masked one even when pruned correctly.
INEXACT_OPS: frozenset[str] = frozenset({"rmsnorm"})
#: Hostile ops that reduce over channels without being a normalisation (their groups are refused).
REDUCTION_OPS: frozenset[str] = frozenset({"mean", "softmax"})


class RandNet(nn.Module):
    """Interprets a small program over a list of feature maps."""

    def __init__(self, program: list[tuple], layers: nn.ModuleDict) -> None:
        super().__init__()
        self.program = program
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for op, *args in self.program:
            if op == "layer":
                src, name = args
                feats.append(self.layers[name](feats[src]))
            elif op == "add":
                a, b = args
                feats.append(feats[a] + feats[b])
            elif op == "cat":
                feats.append(torch.cat([feats[i] for i in args[0]], dim=1))
            elif op == "split":
                src, name = args
                feats.extend(self.layers[name](feats[src]))
            elif op == "relu":
                feats.append(torch.relu(feats[args[0]]))
            elif op == "layer2":
                src, ref, name = args
                feats.append(self.layers[name](feats[src], feats[ref]))
        return feats[-1]


#: The ops of the plain random CNN (see :meth:`_Builder.plain`).
PLAIN_OPS = ("conv", "residual", "concat", "split", "split_cat", "cat_cat")


class _Builder:
    """The state of one :func:`random_cnn` draw: channels per feature map, layers, program."""

    def __init__(self, draw: st.DrawFn, in_ch: int) -> None:
        self.draw = draw
        self.chans = [in_ch]
        self.layers = nn.ModuleDict()
        self.program: list[tuple] = []
        self.counter = 0

    def new_name(self) -> str:
        self.counter += 1
        return f"l{self.counter}"

    def feature(self, channels: int) -> int:
        """A new feature map with ``channels`` channels; its index."""
        self.chans.append(channels)
        return len(self.chans) - 1

    def conv_module(self, c: int, out: int | None) -> nn.Conv2d:
        """A random convolution from ``c`` channels (to ``out`` when given)."""
        draw = self.draw
        kind = draw(st.sampled_from(["plain", "plain", "grouped", "depthwise"]))
        forced = out
        if out is None:
            out = draw(st.integers(2, 8))
        mod: nn.Conv2d | None = None
        if kind == "depthwise" and c >= 2:
            mult = draw(st.sampled_from([1, 2]))
            if forced is None or forced == c * mult:
                mod = nn.Conv2d(c, c * mult, 3, padding=1, groups=c)
            elif forced == c:
                mod = nn.Conv2d(c, c, 3, padding=1, groups=c)
        elif kind == "grouped" and c % 2 == 0 and out % 2 == 0 and c >= 4:
            mod = nn.Conv2d(c, out, 3, padding=1, groups=2)
        if mod is None:
            mod = nn.Conv2d(c, out, draw(st.sampled_from([1, 3])), padding="same", bias=draw(st.booleans()))
        return mod

    def conv(self, src: int, out: int | None = None) -> int:
        """A conv (+ maybe BatchNorm) + ReLU layer on feature ``src``; the new feature's index."""
        mod = self.conv_module(self.chans[src], out)
        seq: list[nn.Module] = [mod]
        if self.draw(st.booleans()):
            bn = nn.BatchNorm2d(mod.out_channels)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
            seq.append(bn)
        seq.append(nn.ReLU())
        name = self.new_name()
        self.layers[name] = nn.Sequential(*seq)
        self.program.append(("layer", src, name))
        return self.feature(mod.out_channels)

    def plain(self, cur: int, op: str) -> int:
        """Apply one of :data:`PLAIN_OPS` to feature ``cur``; the new feature (``cur`` when a split
        has too few channels)."""
        if op == "conv":
            return self.conv(cur)
        if op == "residual":
            return self.residual(cur)
        if op in ("concat", "cat_cat"):
            return self.concat(cur, twice=op == "cat_cat")
        if op in ("split", "split_cat") and self.chans[cur] >= 4:
            return self.split(cur, then_cat=op == "split_cat")
        return cur

    def residual(self, cur: int) -> int:
        branch = self.conv(cur, out=self.chans[cur])
        self.program.append(("add", cur, branch))
        return self.feature(self.chans[cur])

    def concat(self, cur: int, twice: bool) -> int:
        """A conv on ``cur`` concatenated to it (and, ``twice``, a conv of that conv after)."""
        chans = self.chans
        other = self.conv(cur)
        self.program.append(("cat", [cur, other]))
        cur = self.feature(chans[cur] + chans[other])
        if twice:
            third = self.conv(other)
            self.program.append(("cat", [cur, third]))
            cur = self.feature(chans[cur] + chans[third])
        return cur

    def split(self, cur: int, then_cat: bool) -> int:
        """A split of ``cur`` in two, a conv on the first part, then the second part concatenated
        to it (``then_cat``) or a conv of the second part added to it."""
        chans = self.chans
        a = self.draw(st.integers(2, chans[cur] - 2))
        name = self.new_name()
        self.layers[name] = SplitSizes([a, chans[cur] - a])
        self.program.append(("split", cur, name))
        chans.extend([a, chans[cur] - a])
        first, second = len(chans) - 2, len(chans) - 1
        left = self.conv(first)
        if then_cat:
            self.program.append(("cat", [second, left]))
            return self.feature(chans[second] + chans[left])
        right = self.conv(second, out=chans[left])
        self.program.append(("add", left, right))
        return self.feature(chans[left])


class _HostileBuilder(_Builder):
    """A :class:`_Builder` that can also add the :data:`HOSTILE_OPS`; ``ops`` lists those added.
    With ``fixed`` it draws nothing: plain 3x3 convs and fixed sizes (:func:`hostile_example`)."""

    def __init__(self, draw: st.DrawFn | None, in_ch: int) -> None:
        super().__init__(draw, in_ch)  # type: ignore[arg-type]
        self.fixed = draw is None
        self.ops: list[str] = []

    def pick(self, strategy: st.SearchStrategy, fixed: int) -> int:
        """A drawn value, or ``fixed`` when the builder is fixed."""
        return fixed if self.fixed else self.draw(strategy)

    def module(self, src: int, mod: nn.Module, channels: int) -> int:
        """``mod`` applied to feature ``src``, giving ``channels`` channels; the new feature."""
        name = self.new_name()
        self.layers[name] = mod
        self.program.append(("layer", src, name))
        return self.feature(channels)

    def conv(self, src: int, out: int | None = None) -> int:
        """A random conv layer (see :meth:`_Builder.conv`), or conv 3x3 + ReLU when fixed."""
        if not self.fixed:
            return super().conv(src, out)
        out = self.chans[src] if out is None else out
        return self.module(src, nn.Sequential(nn.Conv2d(self.chans[src], out, 3, padding=1), nn.ReLU()), out)

    def hostile(self, cur: int, op: str) -> int:
        """Hostile op ``op`` on feature ``cur``; the new current feature."""
        self.ops.append(op)
        c = self.chans[cur]
        if op == "scale":
            return self.module(cur, ScaleByShape(c), c)
        if op == "width":
            return self.module(cur, WidthReshape(c), c)
        if op == "check":
            return self.module(cur, ChannelCheck(c), c)
        if op == "halfsum":
            cur = self.conv(cur, out=self.pick(st.sampled_from([4, 6, 8]), 8))
            return self.module(cur, HalfSum(), self.chans[cur] // 2)
        if op == "reshape_like":
            other = self.conv(cur, out=c)
            name = self.new_name()
            self.layers[name] = ReshapeLike()
            self.program.append(("layer2", other, cur, name))
            return self.feature(c)
        if op == "detached":
            return self.module(cur, DetachedBranch(c), c)
        if op == "nograd":
            mod = NoGradConv(c, self.pick(st.integers(2, 8), 6))
            cur = self.module(cur, mod, mod.conv.out_channels)
            self.program.append(("relu", cur))
            return self.feature(mod.conv.out_channels)
        if op == "mean":
            return self.module(cur, MeanGate(), c)
        if op == "softmax":
            return self.module(cur, ChannelSoftmax(), c)
        if op == "rmsnorm":
            return self.module(cur, HandRMSNorm(), c)
        raise ValueError(op)


@st.composite
def random_cnn(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """A random CNN (eval mode) and an input batch."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    in_ch, hw = 3, draw(st.sampled_from([4, 6]))
    b = _Builder(draw, in_ch)
    cur = b.conv(0)
    for _ in range(draw(st.integers(1, 5))):
        cur = b.plain(cur, draw(st.sampled_from(PLAIN_OPS)))
    return _finish(b, cur, draw(st.integers(3, 10)), hw, in_ch)


def _finish(b: _Builder, cur: int, hidden: int, hw: int, in_ch: int) -> tuple[nn.Module, torch.Tensor]:
    """Flatten + linear + ReLU (the last prunable layer) and the linear head; the model, an input."""
    head_name = b.new_name()
    b.layers[head_name] = nn.Sequential(nn.Flatten(), nn.Linear(b.chans[cur] * hw * hw, hidden), nn.ReLU())
    b.program.append(("layer", cur, head_name))
    out_name = b.new_name()
    b.layers[out_name] = nn.Linear(hidden, 5)
    b.program.append(("layer", b.feature(hidden), out_name))
    b.feature(5)
    model = RandNet(b.program, b.layers).eval()
    return model, torch.randn(2, in_ch, hw, hw)


@st.composite
def random_hostile_cnn(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """A random CNN (eval mode) with at least one hostile op, an input batch, and the hostile ops
    it contains (names from :data:`HOSTILE_OPS`, in program order). The head is the last layer."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    in_ch, hw = 3, draw(st.sampled_from([4, 6]))
    b = _HostileBuilder(draw, in_ch)
    cur = b.conv(0)
    ops = draw(st.lists(st.sampled_from(list(PLAIN_OPS) + list(HOSTILE_OPS) * 2), min_size=0, max_size=4))
    ops.insert(draw(st.integers(0, len(ops))), draw(st.sampled_from(HOSTILE_OPS)))
    for op in ops:
        cur = b.hostile(cur, op) if op in HOSTILE_OPS else b.plain(cur, op)
    if draw(st.booleans()):
        cur = b.conv(cur)
    model, x = _finish(b, cur, draw(st.integers(3, 10)), hw, in_ch)
    return model, x, b.ops


def hostile_example(op: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A fixed tiny net around hostile op ``op``: conv 3->8 + BN + ReLU, the op, conv -> 6 + ReLU,
    flatten + linear ->4 + ReLU, linear head 4->5 (the last layer). Eval mode, input 2x3x4x4."""
    torch.manual_seed(seed)
    b = _HostileBuilder(None, 3)
    b.layers["l0"] = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU())
    b.program.append(("layer", 0, "l0"))
    cur = b.hostile(b.feature(8), op)
    cur = b.conv(cur, out=6)
    return _finish(b, cur, 4, 4, 3)


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 1.5)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    return bn


@torch.no_grad()
def zero_channels(module: nn.Module | torch.Tensor, side: str, idxs: list[int], dim: int = 0) -> None:
    """Zero what channels ``idxs`` of ``module`` contribute (the masked reference of a prune).

    ``module`` may be a bare parameter (channels along ``dim``; ``side`` does not matter)."""
    if not idxs:
        return
    ix = torch.tensor(idxs)
    if isinstance(module, torch.Tensor):  # a bare parameter, channels along ``dim``
        module.index_fill_(dim, ix, 0.0)
        return
    if isinstance(module, nn.Conv2d):
        g = module.groups
        if side == "out" or (g > 1 and g == module.in_channels):
            if g > 1 and g == module.in_channels and side == "in":
                mult = module.out_channels // module.in_channels
                ix = torch.tensor([i * mult + j for i in idxs for j in range(mult)])
            module.weight[ix] = 0
            if module.bias is not None:
                module.bias[ix] = 0
        else:
            per_in = module.in_channels // g
            per_out = module.out_channels // g
            for i in idxs:
                grp = i // per_in
                module.weight[grp * per_out : (grp + 1) * per_out, i % per_in] = 0
    elif isinstance(module, nn.BatchNorm2d):
        module.weight[ix] = 0
        module.bias[ix] = 0
    elif isinstance(module, nn.Linear):
        if side == "out":
            module.weight[ix] = 0
            module.bias[ix] = 0
        else:
            module.weight[:, ix] = 0
    else:
        raise TypeError(type(module))
