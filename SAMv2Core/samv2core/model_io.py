"""Model weights on disk: a ``.safetensors`` file plus a JSON model card with the same stem.

The card records the architecture (a :class:`~samv2core.network.NetConfig` as a dict), the
heads, the modality the model was trained for, the input spacing, free-form training facts
and the SHA-256 of the weights file. :func:`load_model` checks all of it and raises
:class:`~samv2core.errors.CheckpointError` with a one-line message on any problem.
Nothing here ever unpickles: weights are safetensors; official ``.pth`` checkpoints are read
by :func:`convert_official_checkpoint` with ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .device import select_device
from .errors import CheckpointError, InputError
from .network import NetConfig, SAMv2Net, build_network
from .outputs import atomic_write

FORMAT_VERSION = 1
MODALITIES = ("CT", "MR", "CT+MR")
BUNDLED_MODEL_NAME = "samv2_lite.safetensors"
# safetensors header key identifying files written by this module.
_HEADER_FORMAT = "samv2core-weights"
# Variants of the official checkpoints and the heads their matching scores use
# (SAM and CrossSAM average fine+coarse; SAMv2 also uses the semantic head).
OFFICIAL_VARIANTS = ("SAM", "SAMv2", "CrossSAM")
_MATCHING_HEADS = {"SAM": ["fine", "coarse"], "SAMv2": ["fine", "coarse", "semantic"],
                   "CrossSAM": ["fine", "coarse"]}
# Official numpy scalars that may appear in mmcv checkpoint metadata; safe to rebuild.
_NUMPY_SAFE_GLOBALS = {"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype"}
_NUMPY_NUMERIC_DTYPES = {"Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
                         "Float16", "Float32", "Float64", "Long", "ULong", "LongLong", "ULongLong", "Byte",
                         "UByte", "Short", "UShort", "Int", "UInt"}


# The model grid a card may declare: finer than 0.25 mm or coarser than 16 mm is no CT/MR
# anatomy model (and 1e9 mm would resample any scan to a single voxel).
MIN_SPACING_MM, MAX_SPACING_MM = 0.25, 16.0
MAX_PARAMETERS = 2e9  # far above any SAM variant (the full model has ~20 M)


def parameter_count(cfg: NetConfig) -> int:
    """Parameters the architecture would have, counted without allocating any (meta device)."""
    with torch.device("meta"):
        try:
            net = build_network(cfg)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"model card architecture cannot be built: {exc}") from None
    return int(sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers()))


@dataclass
class ModelCard:
    """Facts about a weights file, stored as JSON next to it (same stem, ``.json``)."""

    name: str
    architecture: dict
    heads: list
    modality: str = "CT"
    spacing_mm: float = 2.0
    training: dict = field(default_factory=dict)
    sha256: str = ""
    format_version: int = FORMAT_VERSION
    notes: str = ""
    # Heads whose cosine similarities are averaged when matching (subset of ``heads``).
    matching_heads: list = field(default_factory=list)
    storage_dtype: str = "float32"

    def __post_init__(self):
        self.heads = list(self.heads)
        self.matching_heads = list(self.matching_heads) or list(self.heads)

    @property
    def config(self) -> NetConfig:
        """The architecture as a NetConfig (CheckpointError if invalid)."""
        return NetConfig.from_dict(self.architecture, error=CheckpointError)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Raise CheckpointError if fields are inconsistent."""
        cfg = self.config
        if self.modality not in MODALITIES:
            raise CheckpointError(f"model card modality must be one of {MODALITIES}, got {self.modality!r}")
        if list(self.heads) != list(cfg.heads):
            raise CheckpointError(f"model card heads {self.heads} do not match the architecture's {list(cfg.heads)}")
        if not set(self.matching_heads) <= set(self.heads):
            raise CheckpointError(f"model card matching_heads {self.matching_heads} not among heads {self.heads}")
        if not (isinstance(self.spacing_mm, (int, float)) and MIN_SPACING_MM <= self.spacing_mm <= MAX_SPACING_MM):
            raise CheckpointError(f"model card spacing_mm must be between {MIN_SPACING_MM:g} and {MAX_SPACING_MM:g} mm "
                                  f"(the grid the network sees), got {self.spacing_mm!r}")
        params = parameter_count(cfg)
        if params > MAX_PARAMETERS:
            raise CheckpointError(f"model card architecture has {params:.3g} parameters ({params * 4 / 1e9:.0f} GB); "
                                  f"refused before allocating (at most {MAX_PARAMETERS:.0e})")
        if self.format_version != FORMAT_VERSION:
            raise CheckpointError(f"unsupported model card format_version {self.format_version!r} "
                                  f"(this version reads {FORMAT_VERSION})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelCard":
        """Card from a parsed JSON mapping; unknown/missing keys raise CheckpointError."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"model card must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"unknown model card keys: {', '.join(unknown)}")
        missing = sorted({"name", "architecture", "heads", "sha256"} - set(d))
        if missing:
            raise CheckpointError(f"model card is missing keys: {', '.join(missing)}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise CheckpointError(f"invalid model card: {exc}") from None


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on its device) and its card."""

    model: SAMv2Net
    card: ModelCard
    path: Path


def card_path_for(path: "str | Path") -> Path:
    """The JSON model card path belonging to a weights file."""
    return Path(path).with_suffix(".json")


def sha256_of(path: "str | Path") -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_state(model: SAMv2Net) -> dict[str, torch.Tensor]:
    # num_batches_tracked only matters for BN momentum=None training; it is not stored.
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def save_model(model: SAMv2Net, card: ModelCard, path: "str | Path", fp16: bool = False) -> Path:
    """Write ``model`` weights to ``path`` (.safetensors) and its card to ``path.with_suffix('.json')``.

    The card's architecture/heads/sha256/storage_dtype are filled from the model and the
    written file (the given card object is not modified). ``fp16`` stores conv weights as
    float16 (half the size); BatchNorm parameters and statistics stay float32 because small
    running variances lose too much precision in fp16. Returns the weights path.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"weights path must end in .safetensors, got {path.name}")
    if not isinstance(model, SAMv2Net):
        raise InputError(f"save_model needs a SAMv2Net, got {type(model).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    bn_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm3d)}
    tensors = {}
    for k, v in _expected_state(model).items():
        v = v.detach().to("cpu", copy=True).contiguous()
        if fp16 and v.is_floating_point() and k.rsplit(".", 1)[0] not in bn_names:
            v = v.half()
        elif v.is_floating_point():
            v = v.float()
        tensors[k] = v
    cfg = model.config
    meta = {"format": _HEADER_FORMAT, "format_version": str(FORMAT_VERSION),
            "architecture": json.dumps(cfg.to_dict(), sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    out = ModelCard(**{**card.to_dict(), "architecture": cfg.to_dict(), "heads": list(cfg.heads),
                       "sha256": sha256_of(path), "format_version": FORMAT_VERSION,
                       "storage_dtype": "float16" if fp16 else "float32"})
    if not out.matching_heads or not set(out.matching_heads) <= set(out.heads):
        out.matching_heads = list(cfg.heads)
    out.validate()
    text = json.dumps(out.to_dict(), indent=2, sort_keys=False) + "\n"
    atomic_write(card_path_for(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_card(path: "str | Path") -> ModelCard:
    """The model card next to weights file ``path`` (CheckpointError if missing or corrupt)."""
    cpath = card_path_for(path)
    if not cpath.is_file():
        raise CheckpointError(f"model card not found: {cpath}" if not cpath.exists() else
                              f"{cpath}: the model card is not a regular file")
    if cpath.stat().st_size > 1 << 20:
        raise CheckpointError(f"{cpath}: a model card is a small JSON file, this one is {cpath.stat().st_size} bytes")
    try:
        data = json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"model card {cpath.name} is not valid JSON: {exc}") from None
    try:
        card = ModelCard.from_dict(data)
        card.validate()
    except CheckpointError as exc:
        raise CheckpointError(f"model card {cpath.name}: {exc}") from None
    return card


def check_state_dict(state: Mapping[str, torch.Tensor], model: SAMv2Net, what: str = "weights") -> None:
    """Raise CheckpointError unless ``state`` has exactly ``model``'s keys with the same shapes."""
    expected = _expected_state(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{what}: {len(missing)} missing key(s), first: {', '.join(missing[:5])}")
    if unexpected:
        raise CheckpointError(f"{what}: {len(unexpected)} unexpected key(s), first: {', '.join(unexpected[:5])}")
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} shape mismatch(es), first: {'; '.join(bad[:3])}")


def _meta_network(cfg: NetConfig) -> SAMv2Net:
    with torch.device("meta"):
        return build_network(cfg)


def load_model(path: "str | Path", device: "str | torch.device" = "cpu") -> LoadedModel:
    """Load a weights file written by :func:`save_model`; returns the model in eval mode.

    Verifies the card, the checksum, the safetensors format, the architecture and every key
    and shape; any problem raises CheckpointError naming it.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise CheckpointError(f"{path}: not a regular file (a folder, pipe or device); a .safetensors file is needed")
        raise CheckpointError(f"model file not found: {path}")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path.name}: not a .safetensors model file (official .pth checkpoints are "
                              "converted first: samv2 convert-checkpoint)")
    card = read_card(path)
    digest = sha256_of(path)
    if digest != card.sha256:
        raise CheckpointError(f"checksum mismatch for {path.name}: file sha256 {digest[:12]}..., "
                              f"card says {str(card.sha256)[:12]}...")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name} is not a valid safetensors file: {exc}") from None
    check_state_dict(state, _meta_network(card.config), what=path.name)  # shapes first, nothing allocated
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path.name}: {len(bad)} weight tensor(s) hold NaN or Inf values, first: {bad[0]} "
                              "(a diverged or damaged training run)")
    model = build_network(card.config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                          strict=False)
    dev = select_device(device)
    model = model.to(dev).eval()
    return LoadedModel(model=model, card=card, path=path)


def bundled_model_path() -> Path:
    """Path of the model shipped with the package (CheckpointError if it is not there)."""
    path = Path(__file__).resolve().parent / "models" / BUNDLED_MODEL_NAME
    if not path.is_file():
        raise CheckpointError(f"bundled model not found: {path} (train one with samv2-train or convert an "
                              f"official checkpoint with 'samv2 convert-checkpoint')")
    return path


def default_model(device: "str | torch.device" = "cpu") -> LoadedModel:
    """Load the bundled model (CheckpointError if absent or invalid)."""
    return load_model(bundled_model_path(), device=device)


# --------------------------------------------------------------------------------------------
# Official (mmcv) checkpoints
# --------------------------------------------------------------------------------------------

def _unpickler_reason(exc: BaseException) -> str:
    """The informative line of torch's long weights_only error text."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[-1].strip()
            return (rest or (lines[i + 1] if i + 1 < len(lines) else ln))[:200]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _torch_load_safely(src: Path) -> Any:
    """torch.load with weights_only=True; numpy scalars in metadata are the only extra allowed."""
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_error = exc
    except Exception as exc:  # zip/pickle framing errors, truncated files, garbage bytes
        raise CheckpointError(f"{src.name} is not a readable PyTorch checkpoint: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(src)))
    except Exception:
        unsafe = set()
    if not unsafe:  # no foreign classes: the bytes themselves are not a valid checkpoint
        raise CheckpointError(f"{src.name} is not a readable PyTorch checkpoint: "
                              f"{_unpickler_reason(first_error)}") from None
    if unsafe and unsafe <= _NUMPY_SAFE_GLOBALS:
        core = getattr(np, "_core", None) or np.core
        objs = {"scalar": core.multiarray.scalar, "dtype": np.dtype}
        # (object, pickled name) pairs: the name as written by whichever numpy saved the file;
        # numpy dtype classes (Float64DType ...) are rebuilt through numpy.dtype, so allow them.
        allowed = [(objs[n.rsplit(".", 1)[1]], n) for n in unsafe if n.rsplit(".", 1)[1] in objs]
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")
                    and n[:-5] in _NUMPY_NUMERIC_DTYPES]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(src, map_location="cpu", weights_only=True)
        except Exception as exc:
            first_error = exc
    names = ", ".join(sorted(unsafe)[:5])
    raise CheckpointError(f"refusing to unpickle {src.name}: it contains non-tensor objects ({names}); "
                          f"re-save only its state_dict") from None


def _config_from_official(state: Mapping[str, torch.Tensor], semantic: bool) -> NetConfig:
    """Infer channel widths from an official state dict (shapes are checked afterwards)."""
    try:
        stages = tuple(int(state[f"backbone.layer{i}.0.conv1.conv.weight"].shape[0]) for i in range(1, 5))
        fpn = int(state["neck.lateral_convs.0.conv.weight"].shape[0])
        embed = int(state["neck.fpn_convs.0.conv.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(f"not a SAM checkpoint: key {exc.args[0]} is missing") from None
    except (AttributeError, IndexError):
        raise CheckpointError("not a SAM checkpoint: backbone/neck entries are not tensors") from None
    variant = "full" if (stages, fpn, embed) == ((64, 128, 256, 512), 128, 128) else "custom"
    return NetConfig(variant, stages, fpn, embed, semantic)


def _detect_variant(src: Path, state: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    has_semantic = any(k.startswith("semantic_head.") for k in state)
    if not has_semantic:
        return "SAM"
    cfg_text = str(meta.get("config", "")) if isinstance(meta, Mapping) else ""
    # The CrossSAM (UAE-M) framework class is "..._mri_ct"; its files are named CrossSAM_*_ct_mr_*.
    if re.search(r"mri_ct|ct_mri", cfg_text, re.I) or re.search(r"cross|ct_?mr|mri", src.name, re.I):
        return "CrossSAM"
    return "SAMv2"


def convert_official_checkpoint(src: "str | Path", dst: "str | Path", variant: str = "auto",
                                fp16: bool = False) -> ModelCard:
    """Convert an official mmcv ``.pth`` (SAM.pth, SAMv2_iter_20000.pth, CrossSAM_*.pth) to
    safetensors + card at ``dst`` (a ``.safetensors`` path). Returns the written card.

    ``variant``: 'auto' (detect from keys, metadata and file name), 'SAM', 'SAMv2' or
    'CrossSAM'. Every tensor's shape is checked against the network; mismatches fail loudly.
    """
    src, dst = Path(src), Path(dst)
    variant = {v.lower(): v for v in OFFICIAL_VARIANTS}.get(str(variant).lower(), variant)
    if variant != "auto" and variant not in OFFICIAL_VARIANTS:
        raise InputError(f"variant must be 'auto' or one of {OFFICIAL_VARIANTS}, got {variant!r}")
    if not src.is_file():
        raise CheckpointError(f"{src}: not a regular file (a folder, pipe or device)" if src.exists()
                              else f"checkpoint not found: {src}")
    if dst.suffix != ".safetensors":
        raise InputError(f"destination must end in .safetensors, got {dst.name}")
    obj = _torch_load_safely(src)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{src.name}: expected a checkpoint dict, got {type(obj).__name__}")
    meta = obj.get("meta", {}) if isinstance(obj.get("meta", {}), Mapping) else {}
    raw = obj["state_dict"] if "state_dict" in obj else obj
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{src.name}: 'state_dict' is not a mapping")

    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in raw.items():
        k = k[len("module."):] if k.startswith("module.") else k  # DataParallel wrappers
        if k.endswith("num_batches_tracked"):
            continue
        if not k.startswith(("backbone.", "neck.", "read_out_head.", "semantic_head.")):
            dropped.append(k)  # losses/extra heads that are not part of the embedding network
            continue
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{src.name}: entry {k} is a {type(v).__name__}, not a tensor")
        state[k] = v
    if not state:
        raise CheckpointError(f"{src.name}: no backbone/neck weights found (is this a SAM checkpoint?)")

    detected = _detect_variant(src, state, meta)
    chosen = detected if variant == "auto" else variant
    if chosen == "SAM":
        dropped += [k for k in state if k.startswith("semantic_head.")]
        state = {k: v for k, v in state.items() if not k.startswith("semantic_head.")}
    elif not any(k.startswith("semantic_head.") for k in state):
        raise CheckpointError(f"{src.name}: variant {chosen} needs a semantic head but the checkpoint has none")

    cfg = _config_from_official(state, semantic=chosen != "SAM")
    model = build_network(cfg)
    check_state_dict(state, model, what=src.name)
    model.load_state_dict({k: v.detach().float() for k, v in state.items()}, strict=False)
    model.eval()

    card = ModelCard(
        name=f"{chosen} ({src.stem})",
        architecture=cfg.to_dict(), heads=list(cfg.heads),
        modality="CT+MR" if chosen == "CrossSAM" else "CT",
        spacing_mm=2.0,
        training={"source": f"official {chosen} checkpoint (alibaba-damo-academy/self-supervised-anatomical-"
                            f"embedding-v2)", "source_file": src.name, "source_sha256": sha256_of(src),
                  "iterations": meta.get("iter") if isinstance(meta.get("iter"), int) else None},
        notes=(f"converted by samv2core.model_io.convert_official_checkpoint; detected variant {detected}; "
               f"dropped {len(dropped)} non-network entries"),
        matching_heads=_MATCHING_HEADS[chosen],
    )
    save_model(model, card, dst, fp16=fp16)
    return read_card(dst)
