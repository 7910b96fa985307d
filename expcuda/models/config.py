"""The one config that decides a model: architecture, which layers expand, and how they quantize.

It is a dataclass so it serializes to JSON: ``lp_model.json`` holds the
collapsed model's config, and ``build(ModelConfig.from_json(...))`` rebuilds
the exact topology that ``lp_model.safetensors`` fills.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

from expcuda.nn.quantizers import BINARY
from expcuda.quant import WEIGHT_KINDS

MODES = ("exp", "lp", "fp")  # EXP-Net (expanded), the low-precision baseline, full precision
INPUT_SIZE = {"svhn_net": 40, "vgg16_bn": 32, "alexnet_bn": 224, "preresnet20": 32, "resnet18": 224}
VERSION = 1
#: quantizers whose bit-width is fixed, and the value recorded for them (32: not quantized)
FIXED_BITS = {**{name: 1 for name in BINARY}, "none": 32}
FIXED_BITS_WHY = {**{name: WEIGHT_KINDS[name].binary_why for name in BINARY if name in WEIGHT_KINDS},
                  "sign": "sign activations are binary", "none": "'none' leaves them full precision"}
DEFAULT_BITS = 2


@dataclass
class ModelConfig:
    """Everything needed to build a model; ``mode`` picks EXP-Net, the LP baseline or full precision.

    ``expand_layers``: which low-precision convolutions get a full-precision
    branch, numbered from 1 in forward order (the first conv is full precision
    and not counted): "all", "none", digits ("456", the paper's partial
    expansion) or a comma list ("10,11,12").
    """

    arch: str = "svhn_net"
    width: float = 1.0
    num_classes: int = 10
    in_channels: int = 3
    mode: str = "exp"
    expand_layers: str = "all"
    w_quant: str = "dorefa"
    w_bits: Optional[int] = None  # None: DEFAULT_BITS, or the fixed width of xnor / sign / none
    a_quant: str = "dorefa"
    a_bits: Optional[int] = None
    scheme: int = 2
    combine: str = "add"
    fp_ratio: float = 1.0
    fp_activation: Optional[str] = None

    def __post_init__(self):
        if self.arch not in INPUT_SIZE:
            raise ValueError(f"arch must be one of {', '.join(INPUT_SIZE)}, got {self.arch!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.width, (int, float)) or not 0 < self.width <= 4:
            raise ValueError(f"width must be a number in (0, 4], got {self.width!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        self.w_bits = _resolve_bits("w_bits", self.w_quant, self.w_bits)
        self.a_bits = _resolve_bits("a_bits", self.a_quant, self.a_bits)
        self.expand_layers = str(self.expand_layers)
        self.expanded_set()  # validates the syntax now, not at build time

    @property
    def input_size(self) -> int:
        return INPUT_SIZE[self.arch]

    def expanded_set(self) -> Optional[set[int]]:
        """The 1-based LP layer numbers to expand; None means all."""
        spec = self.expand_layers.strip().lower()
        if spec in ("all", ""):
            return None
        if spec == "none":
            return set()
        parts = spec.split(",") if "," in spec else list(spec)
        if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"expand_layers must be 'all', 'none', digits like '456' or a list like "
                             f"'10,11,12' (layers numbered from 1), got {self.expand_layers!r}")
        return {int(p) for p in parts}

    def expands(self, layer: int) -> bool:
        """Whether LP layer number ``layer`` (1-based) gets an FP branch."""
        if self.mode != "exp":
            return False
        chosen = self.expanded_set()
        return chosen is None or layer in chosen

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"version": VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        version = d.pop("version", VERSION)
        if version != VERSION:
            raise ValueError(f"model config version {version} is not supported (this expcuda reads {VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


def _resolve_bits(name: str, kind: str, bits):
    """The bit-width a config records: the fixed one for a quantizer that has no choice (also
    when a config written before that rule says DEFAULT_BITS, which such quantizers ignored)."""
    if kind in FIXED_BITS:
        if bits in (None, FIXED_BITS[kind], DEFAULT_BITS):
            return FIXED_BITS[kind]
        raise ValueError(f"{name}={bits!r}: {kind} has no bit-width to set ({FIXED_BITS_WHY[kind]}); "
                         f"leave {name} out")
    return DEFAULT_BITS if bits is None else bits
