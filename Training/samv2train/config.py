"""One training run = one YAML (or JSON/TOML) config, parsed into typed, validated dataclasses.

Unknown keys and impossible values raise InputError naming the offending key *before* any
data is read or any weight is touched, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samv2core.errors import InputError
from samv2core.image_files import check_regular_file
from samv2core.outputs import write_text_atomic

# Network stride multiples in (z, y, x): patch sizes must be divisible by these.
PATCH_MULTIPLE = (4, 16, 16)


@dataclass
class RunSection:
    name: str = "samv2-run"
    output_dir: str = "runs"  # the run directory is output_dir/name
    seed: int = 0
    iterations: int = 1000
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    validate_every: int = 100  # 0 disables validation (then "best" = last)


@dataclass
class ModelSection:
    variant: str = "lite"  # lite | full (samv2core.network.NetConfig.<variant>())
    init: str = ""  # optional safetensors file (model_io format) to fine-tune from


@dataclass
class VolumeEntry:
    path: str = ""
    modality: str = "auto"  # CT | MR | auto
    labels: str = ""  # optional label map on the image's grid
    label_set: str = ""  # volumes sharing a label_set share class ids (e.g. "totalseg_v2")
    weight: float = 1.0  # relative sampling frequency


@dataclass
class DataSection:
    volumes: list = field(default_factory=list)  # list[VolumeEntry]
    folders: list = field(default_factory=list)  # every image file (or DICOM folder) inside is used
    folder_modality: str = "auto"
    exclude: list = field(default_factory=list)  # paths held out (e.g. for benchmarks)
    spacing_mm: float = 2.0
    patch_size: list = field(default_factory=lambda: [32, 96, 96])  # (z, y, x) voxels at spacing_mm
    batch_size: int = 2  # volumes per iteration (each gives two views)
    min_foreground: float = 0.2  # min body fraction of a patch's centre (retries otherwise)


@dataclass
class AugmentSection:
    profile: str = "sam"  # sam | crosssam (aggressive intensity augmentation)
    scale: list = field(default_factory=lambda: [0.8, 1.2])
    rotation_deg: float = 10.0
    max_offset_frac: float = 0.5  # the two views' centres differ by up to this fraction of the patch
    noise_std: float = 0.02  # as a fraction of the intensity range (255)
    blur_sigma: list = field(default_factory=lambda: [0.0, 1.0])  # voxels
    contrast: list = field(default_factory=lambda: [0.8, 1.2])
    # CrossSAM extras (used when profile == crosssam, or with probability crosssam_prob otherwise)
    crosssam_prob: float = 0.0
    curve_points: list = field(default_factory=lambda: [5, 15])
    curve_prob: float = 0.9
    invert_prob: float = 0.3
    affine_deg: float = 5.0


@dataclass
class LossSection:
    temperature: float = 0.5
    fine_positives: int = 100
    fine_candidates: int = 2000
    fine_hard_negatives: int = 200
    fine_random_negatives: int = 300
    fine_ignore_mm: float = 8.0  # negatives closer than this to the positive are excluded
    coarse_positives: int = 100
    coarse_negatives: int = 200
    coarse_ignore_mm: float = 24.0
    coarse_weight: float = 1.0
    semantic_weight: float = 1.0
    semantic_temperature: float = 0.5
    semantic_prob: float = 0.4  # share of iterations drawn from labelled volumes
    semantic_voxels_per_class: int = 200
    semantic_min_voxels: int = 5
    semantic_background_class: bool = False  # label 0 as a class of its own
    # Adam/Eden purposive pruner: drop negatives whose similarity to the anchor exceeds this
    prune_false_negatives: bool = False
    prune_threshold: float = 0.9
    # Alice: cross-volume positives from embedding-aligned crops of different patients
    alice_cross_volume: bool = False
    alice_weight: float = 0.5
    alice_min_score: float = 0.7


@dataclass
class OptimSection:
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: int = 50
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 5.0


@dataclass
class CrossSAMSection:
    enabled: bool = False
    pairs: list = field(default_factory=list)  # list of {fixed: path, moving: path}
    rounds: int = 2
    iterations_per_round: int = 100
    margins_mm: list = field(default_factory=lambda: [30.0, 15.0])
    deformable: bool = True
    pair_prob: float = 0.5  # share of iterations within a round that use the registered pair
    fov_negatives: int = 100


@dataclass
class RuntimeSection:
    device: str = "auto"
    num_threads: int = 2
    bf16: bool = False  # bf16 autocast (CPU or CUDA)
    progress: bool = True


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    crosssam: CrossSAMSection = field(default_factory=CrossSAMSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    source: str = ""  # file it was read from (not part of the identity)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def identity_hash(self) -> str:
        """Hash of everything that changes the maths of the run.

        Run length, thread count, progress display and checkpoint cadence are left out so a
        run can be extended or resumed on another machine; anything else differing means a
        different experiment and resume refuses it.
        """
        d = self.to_dict()
        for key in ("name", "iterations", "checkpoint_every", "keep_checkpoints", "log_every", "output_dir"):
            d["run"].pop(key, None)
        d["runtime"] = {"bf16": d["runtime"]["bf16"]}
        # values equal to the default are left out, so adding a new option (with a default
        # that keeps the old behaviour) does not orphan existing run directories
        for name, cls in SECTIONS.items():
            defaults = dataclasses.asdict(cls())
            d[name] = {k: v for k, v in d.get(name, {}).items() if k not in defaults or v != defaults[k]}
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


SECTIONS = {
    "run": RunSection, "model": ModelSection, "data": DataSection, "augment": AugmentSection,
    "loss": LossSection, "optim": OptimSection, "crosssam": CrossSAMSection, "runtime": RuntimeSection,
}


def _coerce(section: str, key: str, default: Any, value: Any) -> Any:
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"config {where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise InputError(f"config {where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"config {where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InputError(f"config {where}: expected a string, got {value!r}")
        return str(value)
    if isinstance(default, list):
        if not isinstance(value, list):
            raise InputError(f"config {where}: expected a list, got {value!r}")
        return list(value)
    return value


def _volume_entry(value: Any, where: str) -> dict:
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise InputError(f"config {where}: expected a path or a mapping with 'path', got {value!r}")
    allowed = {f.name for f in dataclasses.fields(VolumeEntry)}
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InputError(f"config {where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    entry = {k: "" if v is None else (v if k == "weight" else str(v)) for k, v in value.items()}
    w = entry.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and w < 1e6):
        raise InputError(f"config {where}.weight: must be a positive number, got {w!r}")
    entry["weight"] = float(w)
    if not entry.get("path"):
        raise InputError(f"config {where}: 'path' is required")
    return dataclasses.asdict(VolumeEntry(**entry))


def config_from_dict(raw: dict, source: str = "", base_dir: "Path | None" = None) -> TrainConfig:
    """Build and validate a TrainConfig from a plain mapping. Relative paths are resolved
    against ``base_dir`` (the config file's folder)."""
    if not isinstance(raw, dict):
        raise InputError(f"config {source or ''}: the top level must be a mapping of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise InputError(f"config: unknown section(s) {unknown}; allowed: {sorted(SECTIONS)}")
    kwargs = {}
    for name, cls in SECTIONS.items():
        given = raw.get(name) or {}
        if not isinstance(given, dict):
            raise InputError(f"config {name}: expected a mapping, got {given!r}")
        defaults = cls()
        allowed = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(given) - allowed)
        if bad:
            raise InputError(f"config {name}: unknown key(s) {bad}; allowed: {sorted(allowed)}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in given:
                values[f.name] = _coerce(name, f.name, getattr(defaults, f.name), given[f.name])
        kwargs[name] = cls(**values)
    cfg = TrainConfig(**kwargs, source=source)
    cfg.data.volumes = [_volume_entry(v, f"data.volumes[{i}]") for i, v in enumerate(cfg.data.volumes)]
    pairs = []
    for i, p in enumerate(cfg.crosssam.pairs):
        if not isinstance(p, dict) or set(p) != {"fixed", "moving"}:
            raise InputError(f"config crosssam.pairs[{i}]: expected a mapping with exactly 'fixed' and 'moving'")
        pairs.append({"fixed": _volume_entry(p["fixed"], f"crosssam.pairs[{i}].fixed"),
                      "moving": _volume_entry(p["moving"], f"crosssam.pairs[{i}].moving")})
    cfg.crosssam.pairs = pairs
    if base_dir is not None:
        _resolve_paths(cfg, Path(base_dir))
    validate_config(cfg)
    return cfg


def _resolve(p: str, base: Path) -> str:
    if not p:
        return p
    q = Path(os.path.expandvars(os.path.expanduser(p)))
    return str(q if q.is_absolute() else (base / q).resolve())


def _resolve_paths(cfg: TrainConfig, base: Path) -> None:
    for v in cfg.data.volumes:
        v["path"] = _resolve(v["path"], base)
        v["labels"] = _resolve(v["labels"], base)
    cfg.data.folders = [_resolve(str(f), base) for f in cfg.data.folders]
    cfg.data.exclude = [_resolve(str(f), base) for f in cfg.data.exclude]
    for p in cfg.crosssam.pairs:
        for side in ("fixed", "moving"):
            p[side]["path"] = _resolve(p[side]["path"], base)
            p[side]["labels"] = _resolve(p[side]["labels"], base)
    cfg.model.init = _resolve(cfg.model.init, base)
    cfg.run.output_dir = _resolve(cfg.run.output_dir, base)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise InputError(f"config {message}")


def _range_pair(values: list, where: str, lo: float, hi: float, positive: bool = False) -> None:
    _check(len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
           f"{where}: expected [min, max] numbers, got {values!r}")
    _check(values[0] <= values[1], f"{where}: min {values[0]} > max {values[1]}")
    _check(lo <= values[0] and values[1] <= hi, f"{where}: values must lie in [{lo}, {hi}], got {values}")
    if positive:
        _check(values[0] > 0, f"{where}: values must be positive, got {values}")


def validate_config(cfg: TrainConfig) -> None:
    """Raise InputError for impossible values (the key is named in the message)."""
    r, d, a, l, o, c, rt = cfg.run, cfg.data, cfg.augment, cfg.loss, cfg.optim, cfg.crosssam, cfg.runtime
    _check(bool(r.name) and "/" not in r.name and r.name not in (".", ".."), f"run.name: invalid run name {r.name!r}")
    _check(r.iterations >= 1, f"run.iterations: must be >= 1, got {r.iterations}")
    _check(r.checkpoint_every >= 1, f"run.checkpoint_every: must be >= 1, got {r.checkpoint_every}")
    _check(r.keep_checkpoints >= 1, f"run.keep_checkpoints: must be >= 1, got {r.keep_checkpoints}")
    _check(r.log_every >= 1, f"run.log_every: must be >= 1, got {r.log_every}")
    _check(r.validate_every >= 0, f"run.validate_every: must be >= 0, got {r.validate_every}")
    _check(0 <= r.seed < 2 ** 63, f"run.seed: must be a non-negative integer, got {r.seed}")
    _check(cfg.model.variant in ("lite", "full"), f"model.variant: must be 'lite' or 'full', got {cfg.model.variant!r}")
    _check(bool(d.volumes) or bool(d.folders) or bool(c.pairs),
           "data: no training data (give data.volumes, data.folders or crosssam.pairs)")
    for v in d.volumes:
        _check(v["modality"].upper() in ("CT", "MR", "MRI", "AUTO"),
               f"data.volumes: modality must be CT, MR or auto, got {v['modality']!r}")
    _check(d.folder_modality.upper() in ("CT", "MR", "MRI", "AUTO"),
           f"data.folder_modality: must be CT, MR or auto, got {d.folder_modality!r}")
    _check(0.5 <= d.spacing_mm <= 10, f"data.spacing_mm: must be in [0.5, 10] mm, got {d.spacing_mm}")
    _check(len(d.patch_size) == 3 and all(isinstance(s, int) and not isinstance(s, bool) for s in d.patch_size),
           f"data.patch_size: expected three integers (z, y, x), got {d.patch_size!r}")
    for s, m, ax in zip(d.patch_size, PATCH_MULTIPLE, "zyx"):
        _check(s >= m and s % m == 0,
               f"data.patch_size: the {ax} size {s} must be a positive multiple of {m} (network strides {PATCH_MULTIPLE})")
    _check(d.batch_size >= 1, f"data.batch_size: must be >= 1, got {d.batch_size}")
    _check(0 <= d.min_foreground <= 1, f"data.min_foreground: must be in [0, 1], got {d.min_foreground}")
    _check(a.profile in ("sam", "crosssam"), f"augment.profile: must be 'sam' or 'crosssam', got {a.profile!r}")
    _range_pair(a.scale, "augment.scale", 0.25, 4.0, positive=True)
    _range_pair(a.blur_sigma, "augment.blur_sigma", 0.0, 10.0)
    _range_pair(a.contrast, "augment.contrast", 0.05, 20.0, positive=True)
    _range_pair(a.curve_points, "augment.curve_points", 2, 100)
    _check(0 <= a.rotation_deg <= 180, f"augment.rotation_deg: must be in [0, 180], got {a.rotation_deg}")
    _check(0 <= a.affine_deg <= 180, f"augment.affine_deg: must be in [0, 180], got {a.affine_deg}")
    _check(0 <= a.max_offset_frac < 1, f"augment.max_offset_frac: must be in [0, 1), got {a.max_offset_frac}")
    _check(a.noise_std >= 0, f"augment.noise_std: must be >= 0, got {a.noise_std}")
    for key in ("crosssam_prob", "curve_prob", "invert_prob"):
        v = getattr(a, key)
        _check(0 <= v <= 1, f"augment.{key}: a probability must be in [0, 1], got {v}")
    _check(l.temperature > 0, f"loss.temperature: must be > 0, got {l.temperature}")
    _check(l.semantic_temperature > 0, f"loss.semantic_temperature: must be > 0, got {l.semantic_temperature}")
    for key in ("fine_positives", "fine_candidates", "coarse_positives", "semantic_voxels_per_class"):
        _check(getattr(l, key) >= 1, f"loss.{key}: must be >= 1, got {getattr(l, key)}")
    for key in ("fine_hard_negatives", "fine_random_negatives", "coarse_negatives", "semantic_min_voxels"):
        _check(getattr(l, key) >= 0, f"loss.{key}: must be >= 0, got {getattr(l, key)}")
    _check(l.fine_hard_negatives + l.fine_random_negatives >= 1,
           "loss.fine_hard_negatives + fine_random_negatives: at least one negative is needed")
    _check(l.fine_hard_negatives <= l.fine_candidates,
           f"loss.fine_hard_negatives ({l.fine_hard_negatives}) cannot exceed loss.fine_candidates ({l.fine_candidates})")
    for key in ("fine_ignore_mm", "coarse_ignore_mm", "coarse_weight", "semantic_weight", "alice_weight"):
        _check(getattr(l, key) >= 0, f"loss.{key}: must be >= 0, got {getattr(l, key)}")
    _check(0 <= l.semantic_prob <= 1, f"loss.semantic_prob: a probability must be in [0, 1], got {l.semantic_prob}")
    _check(-1 < l.prune_threshold <= 1, f"loss.prune_threshold: a cosine similarity in (-1, 1], got {l.prune_threshold}")
    _check(-1 <= l.alice_min_score <= 1, f"loss.alice_min_score: a cosine similarity in [-1, 1], got {l.alice_min_score}")
    _check(o.optimizer in ("sgd", "adamw"), f"optim.optimizer: must be 'sgd' or 'adamw', got {o.optimizer!r}")
    _check(0 < o.lr <= 10, f"optim.lr: must be in (0, 10], got {o.lr}")
    _check(0 <= o.momentum < 1, f"optim.momentum: must be in [0, 1), got {o.momentum}")
    _check(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    _check(o.warmup >= 0, f"optim.warmup: must be >= 0, got {o.warmup}")
    _check(o.schedule in ("cosine", "constant"), f"optim.schedule: must be 'cosine' or 'constant', got {o.schedule!r}")
    _check(o.grad_clip >= 0, f"optim.grad_clip: must be >= 0 (0 = off), got {o.grad_clip}")
    _check(c.rounds >= 1, f"crosssam.rounds: must be >= 1, got {c.rounds}")
    _check(c.iterations_per_round >= 1, f"crosssam.iterations_per_round: must be >= 1, got {c.iterations_per_round}")
    _check(len(c.margins_mm) >= 1 and all(isinstance(m, (int, float)) and m >= 0 for m in c.margins_mm),
           f"crosssam.margins_mm: expected non-negative numbers, got {c.margins_mm!r}")
    _check(0 <= c.pair_prob <= 1, f"crosssam.pair_prob: a probability must be in [0, 1], got {c.pair_prob}")
    _check(c.fov_negatives >= 0, f"crosssam.fov_negatives: must be >= 0, got {c.fov_negatives}")
    _check(not c.enabled or bool(c.pairs), "crosssam.enabled: true needs at least one entry in crosssam.pairs")
    _check(1 <= rt.num_threads <= 256, f"runtime.num_threads: must be in [1, 256], got {rt.num_threads}")


MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_NODES = 100_000  # values in the document with every YAML alias expanded


def _expanded_size(node, memo: dict) -> int:
    """Values ``node`` stands for once every alias is expanded (shared nodes counted each
    time they are used), computed on the node graph without expanding anything."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once; the limit below still bounds the sum
    value = node.value
    if isinstance(value, list):
        total = 1
        for item in value:
            for part in (item if isinstance(item, tuple) else (item,)):
                total += _expanded_size(part, memo)
                if total > MAX_CONFIG_NODES:
                    break
        memo[key] = total
    return memo[key]


def _load_yaml(text: str, path: Path):
    """YAML through the safe loader, refused when aliases would expand it past
    MAX_CONFIG_NODES values (a few hundred bytes of nested aliases can stand for billions)."""
    import yaml  # noqa: PLC0415 - optional (the 'train' extra)

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        size = _expanded_size(node, {})
        if size > MAX_CONFIG_NODES:
            raise InputError(f"{path}: the config's YAML aliases expand to more than {MAX_CONFIG_NODES} values "
                             "(an alias bomb?); refused without expanding it")
        return loader.construct_document(node) or {}
    finally:
        loader.dispose()


def _read_raw(path: Path) -> dict:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise InputError(f"{path}: {size} bytes is far too large for a run config (at most {MAX_CONFIG_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: the config is not UTF-8 text") from None
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            return _load_yaml(text, path)
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".toml":
            import tomllib  # noqa: PLC0415 - Python >= 3.11 only

            return tomllib.loads(text)
    except InputError:
        raise
    except Exception as exc:  # parser errors: report the file and the parser's first line
        raise InputError(f"{path}: cannot parse the config ({str(exc).splitlines()[0][:200]})") from None
    raise InputError(f"{path}: unsupported config format {suffix!r} (use .yaml, .json or .toml)")


def load_config(path: "str | os.PathLike") -> TrainConfig:
    """Read and validate a run config; relative paths are taken relative to the file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: config file not found")
    check_regular_file(p, "config file")
    return config_from_dict(_read_raw(p), source=str(p.resolve()), base_dir=p.resolve().parent)


def save_config(cfg: TrainConfig, path: "str | os.PathLike") -> None:
    """Write the resolved config (absolute paths) as YAML, atomically."""
    import yaml  # noqa: PLC0415 - optional (the 'train' extra)

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
