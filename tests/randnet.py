"""Random CNN generator for property tests: convs (plain, grouped, depthwise), BN, ReLU,
residual adds, concats (also concat of concats), splits (also split then concat), flatten into
linear layers. Also the "masked" reference: the original model with given channels zeroed."""

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
        return feats[-1]


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


@st.composite
def random_cnn(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    """A random CNN (eval mode) and an input batch."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    in_ch, hw = 3, draw(st.sampled_from([4, 6]))
    b = _Builder(draw, in_ch)
    cur = b.conv(0)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["conv", "residual", "concat", "split", "split_cat", "cat_cat"]))
        if op == "conv":
            cur = b.conv(cur)
        elif op == "residual":
            cur = b.residual(cur)
        elif op in ("concat", "cat_cat"):
            cur = b.concat(cur, twice=op == "cat_cat")
        elif op in ("split", "split_cat") and b.chans[cur] >= 4:
            cur = b.split(cur, then_cat=op == "split_cat")
    head_name = b.new_name()
    hidden = draw(st.integers(3, 10))
    b.layers[head_name] = nn.Sequential(nn.Flatten(), nn.Linear(b.chans[cur] * hw * hw, hidden), nn.ReLU())
    b.program.append(("layer", cur, head_name))
    out_name = b.new_name()
    b.layers[out_name] = nn.Linear(hidden, 5)
    b.program.append(("layer", b.feature(hidden), out_name))
    b.feature(5)
    model = RandNet(b.program, b.layers).eval()
    x = torch.randn(2, in_ch, hw, hw)
    return model, x


@torch.no_grad()
def zero_channels(module: nn.Module, side: str, idxs: list[int]) -> None:
    """Zero what channels ``idxs`` of ``module`` contribute (the masked reference of a prune)."""
    if not idxs:
        return
    ix = torch.tensor(idxs)
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
