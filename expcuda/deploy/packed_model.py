"""``expcuda.load_packed``: the module that runs an ``expcuda-packed`` file.

Between the quantized layers only integer codes travel (uint8, NHWC); each packed layer is one
``expcuda.deploy.packed_conv2d`` per scale group, the integer accumulator, the max-pool on it and the
folded BatchNorm + quantizer as per-channel thresholds. The full-precision first and last layers run
the float ops of the collapsed model, so its codes and logits are reproduced.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expcuda.deploy import fold
from expcuda.deploy.export import FORMAT, VERSION


class PackedFormatError(ValueError):
    """The file is not a loadable ``expcuda-packed`` model; the message names the file and what is wrong."""


def _conv2d(x, planes, channels, a_bits, w_bits, stride, padding):
    import expcuda.deploy as deploy
    return deploy.packed_conv2d(x, planes, channels, a_bits, w_bits, stride, padding)


def _pool(v: Tensor, spec: dict | None, exact32: bool = False) -> Tensor:
    """Max-pool an NHWC accumulator as the float model pools its conv output (positive scale).
    ``exact32``: every value is an integer below 2**24, so float32 holds it exactly."""
    if spec is None:
        return v
    dtype = v.dtype
    nchw = v.permute(0, 3, 1, 2).to(torch.float32 if exact32 else torch.float64)
    out = F.max_pool2d(nchw, spec["kernel_size"], spec["stride"], spec["padding"], spec["dilation"],
                       spec["ceil_mode"])
    out = out.permute(0, 2, 3, 1)
    return (out.to(dtype) if dtype != torch.float64 else out).contiguous()


class PackedConv(nn.Module):
    """One packed low-precision layer: codes in, codes out."""

    def __init__(self, spec: dict, t: dict[str, Tensor]):
        super().__init__()
        self.spec = spec
        self.register_buffer("planes", t["planes"])
        self.register_buffer("gain", t["gain"].to(torch.float64))
        a, w = spec["a_code"], spec["w_code"]
        kh, kw = spec["kernel_size"]
        #: the largest |accumulator| any input can give (the export clamps thresholds to +-(bound+1))
        self.bound = fold.accumulator_bound(fold.Coding(a["bits"], a["mult"], a["add"]),
                                            fold.Coding(spec["w_bits"], w["mult"], w["add"]),
                                            kh * kw * spec["in_channels"])
        #: the accumulator's integer type: int32 where it cannot overflow (half the memory traffic)
        self.work = torch.int32 if spec["integer"] and self.bound + 1 <= fold.INT32_MAX else torch.int64
        thr = t["thresholds"]
        if spec["integer"]:  # clamping to +-(bound+1) changes no comparison with a reachable value
            thr = thr.to(torch.int64).clamp(-(self.bound + 1), self.bound + 1).to(self.work)
        self.register_buffer("thresholds", thr if spec["integer"] else thr.to(torch.float64))
        self.register_buffer("direction", t["direction"])
        self._borders: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}

    def _group_conv(self, x: Tensor, group) -> tuple[Tensor, Tensor]:
        """(S, T) over the taps of one scale group (rows r0:r1, cols c0:c1 of the kernel)."""
        s = self.spec
        r0, r1, c0, c1 = group
        kh, kw = s["kernel_size"]
        args = (s["in_channels"], s["a_code"]["bits"], s["w_bits"])
        if (r0, r1, c0, c1) == (0, kh, 0, kw):
            return _conv2d(x, self.planes, *args, s["stride"], s["padding"])
        p, st = s["padding"], s["stride"]
        xp = F.pad(x, (0, 0, p, p, p, p)) if p else x
        ho = (x.shape[1] + 2 * p - kh) // st + 1
        wo = (x.shape[2] + 2 * p - kw) // st + 1
        part = xp[:, r0:r0 + st * (ho - 1) + (r1 - r0), c0:c0 + st * (wo - 1) + (c1 - c0)].contiguous()
        return _conv2d(part, self.planes[:, r0:r1, c0:c1].contiguous(), *args, st, 0)

    def borders(self, h: int, w: int) -> list[tuple[Tensor, Tensor]]:
        """(U, N) per scale group for an h x w input: the sums of q and the counts over the in-bounds
        taps, i.e. S and T of an all-ones input (cached per input size)."""
        key = (h, w)
        if key not in self._borders:
            ones = torch.ones(1, h, w, self.spec["in_channels"], dtype=torch.uint8, device=self.planes.device)
            self._borders[key] = [(u[0].to(self.work), n[0].to(self.work))
                                  for u, n in (self._group_conv(ones, g) for g in self.spec["groups"])]
        return self._borders[key]

    def accumulate(self, x: Tensor) -> Tensor:
        """The layer's accumulator v (NHWC), z = gain * v: int64 for one scale group, else float64."""
        s = self.spec
        ma, ca = s["a_code"]["mult"], s["a_code"]["add"]
        mw, cw = s["w_code"]["mult"], s["w_code"]["add"]
        total = None
        for g, (group, (u, n)) in enumerate(zip(s["groups"], self.borders(x.shape[1], x.shape[2]))):
            S, T = self._group_conv(x, group)
            acc = S.to(self.work)
            if ma * mw != 1:
                acc = acc * (ma * mw)
            if ma * cw:
                acc = acc + (ma * cw) * T.to(self.work).unsqueeze(-1)
            if ca:
                acc = acc + ((ca * mw) * u + (ca * cw) * n.unsqueeze(-1))
            if s["integer"]:
                return acc
            term = acc.to(torch.float64) * self.gain[g].expand(s["out_channels"])
            total = term if total is None else total + term
        return total

    def forward(self, x: Tensor) -> Tensor:
        v = _pool(self.accumulate(x), self.spec["pool"], self.spec["integer"] and self.bound < 2**24)
        v = v * self.direction.to(v.dtype)
        o = self.spec["out_channels"]
        if self.thresholds.shape[1] == 1:
            return (v >= self.thresholds[:, 0]).to(torch.uint8)
        flat = v.reshape(-1, o).t().contiguous()
        codes = torch.searchsorted(self.thresholds, flat, right=True)
        return codes.t().reshape(v.shape).to(torch.uint8)


class PackedModel(nn.Module):
    """stem (float) -> codes -> packed layers -> decoded activations -> fc (float)."""

    def __init__(self, config: dict, t: dict[str, Tensor]):
        super().__init__()
        from expcuda.nn.quantizers import ActivationQuantizer

        self.config = config
        st = config["stem"]
        conv = nn.Conv2d(st["in_channels"], st["out_channels"], st["kernel_size"], st["stride"], st["padding"],
                         st["dilation"], st["groups"], bias=st["bias"])
        bn = nn.BatchNorm2d(st["out_channels"], eps=st["bn_eps"])
        act = st["act"]
        aq = ActivationQuantizer(act["kind"], act["bits"])
        with torch.no_grad():
            conv.weight.copy_(t["stem.conv.weight"].float())
            if st["bias"]:
                conv.bias.copy_(t["stem.conv.bias"].float())
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, key).copy_(t[f"stem.bn.{key}"].float())
            if act["kind"] == "lsq":
                aq.step.fill_(act["step"])
        pool = st["pool"]
        mods = [conv] + ([nn.MaxPool2d(pool["kernel_size"], pool["stride"], pool["padding"], pool["dilation"],
                                       ceil_mode=pool["ceil_mode"])] if pool else []) + [bn, aq]
        self.stem = nn.Sequential(*mods)
        self.layers = nn.ModuleList(PackedConv(spec, {k.split(".", 2)[2]: v for k, v in t.items()
                                                      if k.startswith(f"layers.{i}.")})
                                    for i, spec in enumerate(config["layers"]))
        fc = config["fc"]
        self.fc = nn.Linear(fc["in_features"], fc["out_features"])
        with torch.no_grad():
            self.fc.weight.copy_(t["fc.weight"].float())
            self.fc.bias.copy_(t["fc.bias"].float())
        self.eval()

    def stem_codes(self, x: Tensor) -> Tensor:
        act = self.config["stem"]["act"]
        # the convolution as the collapsed model computes it (NCHW: the same sums, bit for bit),
        # the rest (max-pool, BatchNorm, the quantizer: elementwise or exact) on a channels_last
        # copy, whose max-pool is vectorized over channels, and which the NHWC codes need anyway
        a = self.stem[0](x).contiguous(memory_format=torch.channels_last)
        for module in self.stem[1:]:
            a = module(a)
        return fold.codes_from_values(act["kind"], act["bits"], a, act["step"]).permute(0, 2, 3, 1).contiguous()

    def codes(self, x: Tensor) -> list[Tensor]:
        """The activation codes (uint8 NHWC) after the stem and after every packed layer."""
        out = [self.stem_codes(x)]
        for layer in self.layers:
            out.append(layer(out[-1]))
        return out

    def head(self, codes: Tensor) -> Tensor:
        act = self.config["fc"]["in_act"]
        a = fold.values_from_codes(act["kind"], act["bits"], codes, act["step"])
        # an NCHW copy: flatten then gives the collapsed model's row layout (and its matmul path)
        return self.fc(torch.flatten(a.permute(0, 3, 1, 2).contiguous(), 1))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.config["stem"]["in_channels"]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"input must be a (N, {self.config['stem']['in_channels']}, H, W) tensor, got {got}")
        c = self.stem_codes(x.float())
        for layer in self.layers:
            c = layer(c)
        return self.head(c)


# --------------------------------------------------------------------------- loading

def _expected_shapes(config: dict) -> dict[str, tuple[str, list[int]]]:
    """The tensor dtype and shape each config entry implies."""
    fdt = config["float_dtype"]
    st = config["stem"]
    kh, kw = st["kernel_size"]
    out = {"stem.conv.weight": (fdt, [st["out_channels"], st["in_channels"] // st["groups"], kh, kw])}
    if st["bias"]:
        out["stem.conv.bias"] = (fdt, [st["out_channels"]])
    for key in ("weight", "bias", "running_mean", "running_var"):
        out[f"stem.bn.{key}"] = (fdt, [st["out_channels"]])
    prev = st["out_channels"]
    for i, s in enumerate(config["layers"]):
        if s["in_channels"] != prev:
            raise ValueError(f"layer {s['name']} takes {s['in_channels']} channels but the layer before "
                             f"gives {prev}")
        o, (kh, kw) = s["out_channels"], s["kernel_size"]
        n = 1 if s["act"]["kind"] == "sign" else 2 ** s["act"]["bits"] - 1
        out[f"layers.{i}.planes"] = ("uint8", [o, kh, kw, s["w_bits"], (s["in_channels"] + 7) // 8])
        out[f"layers.{i}.gain"] = (("float32", "float64"), [len(s["groups"]), None])  # 1 or O columns
        out[f"layers.{i}.thresholds"] = (("int32", "int64") if s["integer"] else "float64", [o, n])
        out[f"layers.{i}.direction"] = ("int8", [o])
        prev = o
    fc = config["fc"]
    out["fc.weight"] = (fdt, [fc["out_features"], fc["in_features"]])
    out["fc.bias"] = (fdt, [fc["out_features"]])
    return out


def _check_tensors(source: str, config: dict, tensors: dict[str, Tensor]) -> None:
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise PackedFormatError(f"{source}: the tensors do not match the config (missing: "
                                f"{', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'})")
    for name, (dtype, shape) in expected.items():
        t = tensors[name]
        got_dtype = str(t.dtype).replace("torch.", "")
        ok_dtype = got_dtype in dtype if isinstance(dtype, tuple) else got_dtype == dtype
        want = list(shape)
        if name.endswith(".gain"):
            o = config["layers"][int(name.split(".")[1])]["out_channels"]
            want[1] = t.shape[1] if t.dim() == 2 and t.shape[1] in (1, o) else o
        if not ok_dtype or list(t.shape) != want:
            dtypes = " or ".join(dtype) if isinstance(dtype, tuple) else dtype
            raise PackedFormatError(f"{source}: tensor {name} is {got_dtype} {list(t.shape)} but the config "
                                    f"implies {dtypes} {want}")


def from_bytes(data: bytes, source: str = "<bytes>") -> PackedModel:
    """The PackedModel of a file's bytes; PackedFormatError naming ``source`` for anything wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise PackedFormatError(f"{source}: not a complete safetensors file (truncated or corrupt?): {exc}") from None
    if metadata.get("format") != FORMAT:
        raise PackedFormatError(f"{source}: format {metadata.get('format')!r} is not {FORMAT!r} (an "
                                "lp_model.safetensors loads with expcuda.train.export.load)")
    if metadata.get("version") != str(VERSION):
        raise PackedFormatError(f"{source}: {FORMAT} version {metadata.get('version')!r} is not supported "
                                f"(this expcuda reads version {VERSION})")
    try:
        config = json.loads(metadata["config"])
        if config.get("format") != FORMAT or config.get("version") != VERSION:
            raise ValueError(f"the config says format {config.get('format')!r} version {config.get('version')!r}")
        _check_tensors(source, config, tensors)
        model = PackedModel(config, tensors)
    except PackedFormatError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        what = f"missing entry {exc}" if isinstance(exc, KeyError) else str(exc)
        raise PackedFormatError(f"{source}: the config does not describe a packed model: {what}") from None
    return model


def load_packed(path: str) -> PackedModel:
    """The model ``expcuda.export`` wrote to ``path``, in eval mode."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path, got {type(path).__name__}")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise PackedFormatError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    return from_bytes(data, os.fspath(path))
