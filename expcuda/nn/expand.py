"""``expand``: turn a model's conv -> BN -> activation chains into EXP-Net blocks; ``collapse``: back.

Chains are found in two shapes: consecutive children of an ``nn.Sequential``
(``Conv2d``, optional ``MaxPool2d``/``AvgPool2d``, ``BatchNorm2d``, an
activation), as in torchvision's VGG; and ``convK`` / ``bnK`` attribute pairs
of a module (torchvision's BasicBlock / Bottleneck), where every pair but the
last is followed by the module's own activation and the last meets the
residual sum (those blocks get ``activation=False``).  Existing
``LowPrecisionConv2d`` blocks count as chains too.  Convolutions are numbered
in model order, 0 being the first, so ``layers="456"`` is the paper's
partial expansion of conv4..conv6.  Chains not selected become plain
low-precision blocks.  Projection shortcuts (a ``Conv2d, BatchNorm2d``
Sequential with no activation) stay full precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expcuda.nn.block import ExpandedConv2d, LowPrecisionConv2d

ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU)
POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d)
#: options of ExpandedConv2d that a plain low-precision block also takes
LP_OPTIONS = ("w_quant", "w_bits", "a_quant", "a_bits", "w_eta", "w_granularity")


@dataclass
class _Chain:
    index: int                      # the conv's number in model order
    name: str                       # qualified name of the conv (or block)
    parent: nn.Module
    conv_key: Union[int, str]       # how the parent holds the conv
    conv: nn.Module
    bn: Optional[nn.BatchNorm2d] = None
    pool: Optional[nn.Module] = None
    drop: tuple = ()                # parent keys replaced by Identity (pool, bn, activation)
    activation: bool = True
    outer_activation: bool = False  # the parent applies its own activation after the block


def _is_block_conv(m: nn.Module) -> bool:
    return isinstance(m, LowPrecisionConv2d) and not (isinstance(m, ExpandedConv2d) and m.expanded)


def _conv_like(model: nn.Module):
    """(name, module) of every convolution and block in model order, not looking inside blocks."""
    out = []

    def walk(prefix, mod):
        for key, child in mod.named_children():
            name = f"{prefix}{key}"
            if isinstance(child, (LowPrecisionConv2d, nn.Conv2d, ConcatInput)):
                out.append((name, child))
            else:
                walk(name + ".", child)
    walk("", model)
    return out


def _find_chains(model: nn.Module) -> tuple[list[_Chain], dict[int, str]]:
    convs = _conv_like(model)
    index = {id(m): i for i, (_, m) in enumerate(convs)}
    names = {i: n for i, (n, _) in enumerate(convs)}
    chains = []
    for qual, parent in model.named_modules():
        if isinstance(parent, (LowPrecisionConv2d, ConcatInput)):
            continue
        prefix = f"{qual}." if qual else ""
        if isinstance(parent, nn.Sequential):
            kids = list(parent)
            for i, m in enumerate(kids):
                if _is_block_conv(m):
                    chains.append(_Chain(index[id(m)], prefix + str(i), parent, i, m))
                elif type(m) is nn.Conv2d and id(m) in index:
                    j, pool = i + 1, None
                    if j < len(kids) and isinstance(kids[j], POOL_TYPES):
                        pool, j = kids[j], j + 1
                    if not (j < len(kids) and isinstance(kids[j], nn.BatchNorm2d)):
                        continue
                    if j + 1 >= len(kids) or not isinstance(kids[j + 1], ACTIVATION_TYPES):
                        continue  # e.g. a projection shortcut: stays full precision
                    drop = tuple(range(i + 1, j + 2))
                    chains.append(_Chain(index[id(m)], prefix + str(i), parent, i, m, kids[j], pool, drop))
        else:
            kids = dict(parent.named_children())
            pairs = sorted(k[4:] for k, m in kids.items() if k.startswith("conv") and k[4:].isdigit()
                           and (type(m) is nn.Conv2d or _is_block_conv(m)))
            pairs = [k for k in pairs if _is_block_conv(kids[f"conv{k}"]) or
                     isinstance(kids.get(f"bn{k}"), nn.BatchNorm2d)]
            has_act = any(isinstance(m, ACTIVATION_TYPES) for m in kids.values())
            if not pairs or not has_act:
                continue
            pairs.sort(key=int)
            for k in pairs:
                conv = kids[f"conv{k}"]
                last = k == pairs[-1]
                if _is_block_conv(conv):
                    chains.append(_Chain(index[id(conv)], f"{prefix}conv{k}", parent, f"conv{k}", conv,
                                         activation=conv.aq.activation, outer_activation=not last))
                else:
                    chains.append(_Chain(index[id(conv)], f"{prefix}conv{k}", parent, f"conv{k}", conv,
                                         kids[f"bn{k}"], None, (f"bn{k}",), activation=not last,
                                         outer_activation=not last))
    chains.sort(key=lambda c: c.index)
    return chains, names


def _parse_layers(layers, names: dict[int, str]) -> Optional[set[int]]:
    if layers is None:
        return None
    if isinstance(layers, str):
        if not layers.isdigit():
            raise ValueError(f"layers as a string must be conv numbers like '456', got {layers!r}")
        layers = [int(ch) for ch in layers]
    by_name = {n: i for i, n in names.items()}
    picked = set()
    for item in layers:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"layers: no convolution named {item!r}; they are {list(by_name)}")
            picked.add(by_name[item])
        elif isinstance(item, int) and not isinstance(item, bool) and item in names:
            picked.add(item)
        else:
            raise ValueError(f"layers: {item!r} is not a conv number 0..{len(names) - 1} or name")
    return picked


def _set(parent: nn.Module, key, module: nn.Module) -> None:
    if isinstance(key, int):
        parent[key] = module
    else:
        setattr(parent, key, module)


def _geometry(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups)


@torch.no_grad()
def _copy_conv_bn(block: LowPrecisionConv2d, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    block.lp_conv.weight.copy_(conv.weight)
    block.lp_bn.load_state_dict(bn.state_dict())
    block.lp_bn.eps, block.lp_bn.momentum = bn.eps, bn.momentum
    if conv.bias is not None:  # BN removes a constant shift; in eval it moves the running mean
        block.lp_bn.running_mean.sub_(conv.bias)
    block.wq.init_from(block.lp_conv.weight)


@torch.no_grad()
def _copy_lp(dst: LowPrecisionConv2d, src: LowPrecisionConv2d) -> None:
    """The LP part of src (conv, BN, quantizer parameters) into dst."""
    for name in ("lp_conv", "lp_bn", "wq", "aq"):
        getattr(dst, name).load_state_dict(getattr(src, name).state_dict())


def expand(model: nn.Module, layers=None, skip_first_last: bool = True, **block_options) -> nn.Module:
    """Replace conv -> BN -> activation chains by ExpandedConv2d blocks (in place; returns model).

    The conv and BN weights go into the LP branch; the FP branch starts fresh.
    ``layers``: conv numbers (0 = first conv, ``"456"`` or ``[4, 5, 6]``) or
    qualified names to expand; the other chains become plain low-precision
    blocks.  ``skip_first_last`` keeps the first conv, and the last one when
    the model has no Linear layer, full precision (DoReFa-Net, XNOR-Net).
    """
    chains, names = _find_chains(model)
    picked = _parse_layers(layers, names)
    if skip_first_last and names:
        skipped = {0}
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            skipped.add(len(names) - 1)
        if picked is not None and picked & skipped:
            raise ValueError(f"layers {sorted(picked & skipped)} are the first/last convolution, kept "
                             "full precision by skip_first_last=True")
        chains = [c for c in chains if c.index not in skipped]
    if picked is not None:
        missing = picked - {c.index for c in chains}
        if missing:
            raise ValueError(f"layers: conv {sorted(missing)} ({', '.join(names[i] for i in sorted(missing))}) "
                             "is not followed by BatchNorm2d and an activation, so it cannot be expanded")
    if block_options.get("expand", True) is False:
        raise ValueError("expand: block option expand=False makes no sense here")
    lp_options = {k: v for k, v in block_options.items() if k in LP_OPTIONS}
    producers = []
    for chain in chains:
        selected = picked is None or chain.index in picked
        if not selected and isinstance(chain.conv, LowPrecisionConv2d):
            continue
        if chain.outer_activation and block_options.get("a_quant") == "sign":
            raise ValueError(f"a_quant='sign' cannot be used at {chain.name}: its parent applies its "
                             "own activation after the block (a ReLU would zero the -1s)")
        options = dict(block_options) if selected else dict(lp_options)
        if not chain.activation:
            options["a_quant"], options["activation"] = "none", False
            if options.get("combine") == "concat":
                raise ValueError(f"combine='concat' is impossible at {chain.name}: its output meets a "
                                 "residual sum, which needs the original channel count")
        src = chain.conv
        pool = chain.pool if chain.pool is not None else getattr(src, "pool", None)
        if isinstance(src, LowPrecisionConv2d):
            options.setdefault("w_quant", src.wq.kind)
            options.setdefault("w_bits", src.wq.bits)
            options.setdefault("a_quant", src.aq.kind)
            options.setdefault("a_bits", src.aq.bits)
            options.setdefault("activation", src.aq.activation)
            geometry = _geometry(src.lp_conv)
        else:
            geometry = _geometry(src)
        cls = ExpandedConv2d if selected else LowPrecisionConv2d
        block = cls(**geometry, pool=pool, **options)
        ref = src.lp_conv.weight if isinstance(src, LowPrecisionConv2d) else src.weight
        block.to(device=ref.device, dtype=ref.dtype)
        if isinstance(src, LowPrecisionConv2d):
            _copy_lp(block, src)
        else:
            _copy_conv_bn(block, src, chain.bn)
        block.train(src.training)
        _set(chain.parent, chain.conv_key, block)
        for key in chain.drop:
            _set(chain.parent, key, nn.Identity())
        if selected and block.combine == "concat":
            producers.append((chain.name, block))
    for name, producer in producers:
        _link_consumer(model, name, producer)
    return model


def _link_consumer(model: nn.Module, name: str, producer: ExpandedConv2d) -> None:
    """Widen the layer that reads the concat block's output by its FP channels."""
    order = _conv_like(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = [n for n, _ in order]
    pos = names.index(name)
    after = [(n, m) for n, m in order[pos + 1:]]
    consumer = after[0] if after else None
    if consumer is None and linears:
        consumer = linears[0]
    if consumer is None:
        raise ValueError(f"combine='concat' at {name}: no layer after it to take the FP channels")
    cname, cons = consumer
    extra, c = producer.fp_channels, producer.out_channels
    if isinstance(cons, LowPrecisionConv2d):
        if cons.in_channels != c:
            raise ValueError(f"combine='concat' at {name}: the next layer {cname} takes {cons.in_channels} "
                             f"channels, expected {c}")
        cons.widen_input(extra, producer)
        return
    if isinstance(cons, nn.Conv2d) and cons.in_channels == c and cons.groups == 1:
        wrapped = ConcatInput(cons, extra, producer)
    elif isinstance(cons, nn.Linear) and cons.in_features % c == 0:
        wrapped = ConcatInput(cons, extra * (cons.in_features // c), producer)
    else:
        raise ValueError(f"combine='concat' at {name}: cannot widen the next layer {cname} "
                         f"({type(cons).__name__}) by {extra} input channels")
    parent_name, _, key = cname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    _set(parent, int(key) if isinstance(parent, nn.Sequential) else key, wrapped)


class ConcatInput(nn.Module):
    """A Conv2d or Linear fed by a concat block: extra input weights for its FP channels.

    While the producer's f is 0 the extra inputs are all zero and are not
    read at all, so the output is the original layer's to the last bit.
    """

    def __init__(self, layer: nn.Module, extra: int, producer: ExpandedConv2d):
        super().__init__()
        self.layer, self.extra = layer, extra
        w = layer.weight
        shape = (w.shape[0], extra, *w.shape[2:])
        self.extra_weight = nn.Parameter(torch.empty(shape, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.extra_weight, a=5 ** 0.5)
        self.__dict__["_producer"] = producer

    @property
    def n_in(self) -> int:
        return self.layer.weight.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        if self.__dict__["_producer"].f_is_zero:
            return self.layer(x[:, : self.n_in].contiguous())
        w = torch.cat([self.layer.weight, self.extra_weight], dim=1)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


def collapse(model: nn.Module) -> nn.Module:
    """Replace every expanded block by its plain low-precision block (in place; returns model).

    Needs f == 0 everywhere; the layers that read a concat block's output
    lose their FP-channel weights, leaving exactly the original topology.
    Everything is checked and every replacement built before the model is
    touched, so a refused collapse leaves the model as it was.
    """
    _check_collapsible(model)
    plan = []  # (parent, key, replacement or None for a consumer that only drops its extra inputs)
    for qual, parent in list(model.named_modules()):
        for key, child in list(parent.named_children()):
            if isinstance(child, ExpandedConv2d):
                plan.append((parent, key, _plain_block(child)))
            elif isinstance(child, ConcatInput):
                plan.append((parent, key, child.layer))
            elif isinstance(child, LowPrecisionConv2d) and child.in_extra:
                plan.append((parent, key, None))
    for parent, key, new in plan:
        if new is None:
            child = getattr(parent, key)
            child.in_extra, child.lp_extra = 0, None
            child.__dict__["_producer"] = None
        else:
            _set(parent, int(key) if isinstance(parent, nn.Sequential) else key, new)
    return model


def _check_collapsible(model: nn.Module) -> None:
    """Refuse, naming the layers, a model that collapse cannot reduce exactly."""
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, ExpandedConv2d) and m.expanded}
    live = {n: float(m.f) for n, m in blocks.items() if not m.f_is_zero}
    if live:
        listing = ", ".join(f"{n} (f={v:g})" for n, v in live.items())
        raise RuntimeError(f"collapse needs f == 0 in every expanded block; not yet at: {listing}. "
                           "Finish the decay (or call block.set_f(0)) first")
    linked = {id(m.__dict__.get("_producer")) for m in model.modules()
              if isinstance(m, (LowPrecisionConv2d, ConcatInput))}
    unlinked = [n for n, m in blocks.items() if m.combine == "concat" and id(m) not in linked]
    if unlinked:
        raise ValueError(
            f"collapse: the concat block(s) {', '.join(unlinked)} feed their FP channels to a layer that "
            "was not linked to them, so collapse cannot drop those channels' input weights exactly (the "
            "layer would still expect them). Build the model with expcuda.expand, or give the next block "
            "the producer's out_channels as in_channels and call "
            "next_block.widen_input(producer.fp_channels, producer); the model was left unchanged")


def _plain_block(child: ExpandedConv2d) -> LowPrecisionConv2d:
    """The plain low-precision block equal to ``child`` at f == 0, with its weights."""
    new = LowPrecisionConv2d(**_geometry(child.lp_conv), w_quant=child.wq.kind,
                             w_bits=child.wq.bits, a_quant=child.aq.kind,
                             a_bits=child.aq.bits, pool=child.pool,
                             activation=child.aq.activation,
                             w_eta=getattr(child.wq, "eta", None),
                             w_granularity=getattr(child.wq, "granularity", "pixel"),
                             bn_eps=child.lp_bn.eps, bn_momentum=child.lp_bn.momentum)
    ref = child.lp_conv.weight
    new.to(device=ref.device, dtype=ref.dtype)
    _copy_lp(new, child)
    new.train(child.training)
    return new
