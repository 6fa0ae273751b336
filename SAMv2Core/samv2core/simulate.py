"""Simulated follow-up scans with an exactly known ground truth.

No real same-patient follow-up pairs are bundled: a follow-up is made from a real scan by a
known small rigid motion, a smooth random deformation, intensity/contrast change and noise
(optionally a field-of-view crop or an MR-like intensity remapping). Every result produced on
such pairs must be reported as "on simulated follow-ups".

Two protocols: ``simulate_followup`` (mild: same voxel grid, small motion; used by the
registration tests) and ``simulate_hard_followup`` with :class:`FollowupProtocol` (the
click-to-match benchmark protocol of issue 10: own voxel grid, 85% z coverage, large motion,
B-spline deformation, contrast-phase change). ``change_lesion`` grows or shrinks a labelled
lesion before simulating; ``body_points`` draws random evaluation points in the body.
``simulate_offcentre_pair`` (issue 12's registration protocol) and ``rigidly_moved`` (a known
rigid motion of one scan of a real scanner-aligned pair) serve the registration benchmark.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .affine import matrix_of, random_rigid, sitk_affine
from .errors import InputError
from .preprocess import body_mask
from .volume import Modality, Volume


@dataclass(frozen=True, eq=False)
class SimulatedPair:
    baseline: Volume
    followup: Volume
    transform: sitk.Transform  # maps follow-up LPS points to baseline LPS points (resampling direction)
    params: dict

    def truth_matrix(self) -> np.ndarray:
        """4x4 baseline LPS -> follow-up LPS (the inverse of ``transform``; linear simulations only)."""
        return np.linalg.inv(matrix_of(self.transform))

    def map_points(self, baseline_lps) -> np.ndarray:
        """Ground truth: where baseline LPS points (N, 3) lie in the follow-up, LPS (N, 3)."""
        pts = np.asarray(baseline_lps, dtype=np.float64).reshape(-1, 3)
        out = np.empty_like(pts)
        for n, b in enumerate(pts):
            p = b.copy()
            step = 1.0
            best = np.inf
            for _ in range(200):  # damped fixed-point inversion of p -> T(p) (T is near identity)
                err = np.asarray(self.transform.TransformPoint(tuple(p))) - b
                norm = float(np.linalg.norm(err))
                if norm < 1e-4:
                    break
                if norm > best:  # overshooting (large rotation + deformation): smaller steps
                    step *= 0.5
                best = min(best, norm)
                p -= step * err
            out[n] = p
        return out


def _random_field(volume: Volume, rng: np.random.Generator, amplitude_mm: float, control_mm: float) -> sitk.Image:
    corners = volume.corners_lps()
    lo, hi = corners.min(0) - 20, corners.max(0) + 20
    spacing = 4.0
    size = [int(np.ceil((h - l) / spacing)) + 1 for l, h in zip(lo, hi)]
    coarse_size = [max(2, int(np.ceil((h - l) / control_mm)) + 1) for l, h in zip(lo, hi)]
    coarse = rng.normal(size=coarse_size[::-1] + [3])
    img = sitk.GetImageFromArray(coarse, isVector=True)
    img.SetOrigin(tuple(lo))
    img.SetSpacing(tuple((h - l) / (c - 1) for l, h, c in zip(lo, hi, coarse_size)))
    field = sitk.Resample(img, size, sitk.Transform(), sitk.sitkBSpline, tuple(lo), (spacing,) * 3,
                          (1, 0, 0, 0, 1, 0, 0, 0, 1), 0.0, sitk.sitkVectorFloat64)
    arr = sitk.GetArrayFromImage(field)
    peak = np.linalg.norm(arr, axis=-1).max()
    arr *= amplitude_mm / max(peak, 1e-9)
    out = sitk.GetImageFromArray(arr, isVector=True)
    out.CopyInformation(field)
    return out


def mr_like(array: np.ndarray) -> np.ndarray:
    """Map CT HU to a T1-like contrast (fat bright, soft tissue mid, fluid/bone/air dark)."""
    hu = np.asarray(array, dtype=np.float32)
    xp = [-1024, -900, -200, -100, 0, 40, 80, 300, 1000, 3071]
    fp = [0, 5, 350, 420, 120, 250, 300, 90, 40, 30]
    return np.interp(hu, xp, fp).astype(np.float32)


def simulate_followup(volume: Volume, seed: int = 0, rotation_deg: float = 4.0, translation_mm: float = 8.0,
                      deformation_mm: float = 5.0, control_mm: float = 60.0, noise: float = 0.02,
                      contrast: float = 0.05, crop_fraction: float | None = None, mr: bool = False) -> SimulatedPair:
    """A follow-up of ``volume`` with known motion. Returns a SimulatedPair; the input is untouched.

    rotation_deg / translation_mm: maximum rigid motion; deformation_mm: peak smooth displacement;
    noise: Gaussian noise std as a fraction of the intensity range; contrast: max relative gain
    change; crop_fraction: keep this fraction of the z extent (a smaller field of view);
    mr: remap a CT to an MR-like contrast (for cross-modality tests).
    """
    if crop_fraction is not None and not 0.1 <= crop_fraction <= 1.0:
        raise InputError(f"crop_fraction must be in [0.1, 1], got {crop_fraction}")
    rng = np.random.default_rng(seed)
    centre = volume.corners_lps().mean(0)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(tuple(centre))
    rigid.SetRotation(*np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3)))
    rigid.SetTranslation(tuple(rng.uniform(-translation_mm, translation_mm, 3)))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(rigid)
    if deformation_mm > 0:
        composite.AddTransform(sitk.DisplacementFieldTransform(_random_field(volume, rng, deformation_mm, control_mm)))

    ref = volume.to_sitk()
    if crop_fraction is not None and crop_fraction < 1.0:
        z = volume.array.shape[0]
        keep = max(1, int(round(z * crop_fraction)))
        start = int(rng.integers(0, z - keep + 1))
        ref = ref[:, :, start: start + keep]
    fill = float(volume.array.min())
    moved = sitk.Resample(volume.to_sitk(), ref, composite, sitk.sitkLinear, fill, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(moved)
    lo, hi = np.percentile(volume.array[:: max(1, volume.array.shape[0] // 16)], [1, 99])
    gain = 1.0 + rng.uniform(-contrast, contrast)
    arr = (arr - lo) * gain + lo + rng.normal(0, noise * (hi - lo), arr.shape).astype(np.float32)
    modality = volume.modality
    if mr:
        arr = mr_like(arr)
        modality = Modality.MR
    out = Volume(arr.astype(np.float32), moved.GetSpacing(), moved.GetOrigin(),
                 np.array(moved.GetDirection()).reshape(3, 3), modality, f"{volume.name}_simfollowup{seed}")
    params = {"seed": seed, "rotation_deg_max": rotation_deg, "translation_mm_max": translation_mm,
              "deformation_mm_peak": deformation_mm, "noise": noise, "contrast": contrast,
              "crop_fraction": crop_fraction, "mr_like": mr, "simulated": True}
    return SimulatedPair(volume, out, composite, params)


# --- the hard follow-up protocol (issue 10) ---------------------------------------------------
@dataclass(frozen=True)
class FollowupProtocol:
    """Ranges of the hard follow-up simulation; every value is drawn uniformly per pair."""

    spacing_scale: tuple[float, float] = (0.8, 1.5)  # follow-up voxel spacing / baseline, per axis
    z_coverage: float = 0.85  # share of the baseline's z extent the follow-up covers (random offset)
    rotation_deg: float = 8.0  # per axis
    translation_mm: float = 15.0  # per axis
    bspline_mm: float = 16.0  # cubic B-spline coefficients uniform in +-this, per component
    control_mm: float = 50.0  # B-spline control-point spacing
    phase_band_hu: tuple[float, float] = (20.0, 90.0)  # soft tissue that enhances (contrast phase)
    phase_gain_hu: tuple[float, float] = (30.0, 90.0)  # how much it gains
    gain: tuple[float, float] = (0.9, 1.1)
    offset_hu: float = 20.0
    noise_hu: float = 15.0

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _bspline(box_lo: np.ndarray, box_hi: np.ndarray, rng: np.random.Generator, amplitude_mm: float,
             control_mm: float) -> sitk.BSplineTransform:
    """A cubic B-spline transform over the box with coefficients uniform in +-amplitude_mm."""
    lo, hi = box_lo - control_mm, box_hi + control_mm
    mesh = [max(1, int(np.ceil((h - l) / control_mm))) for l, h in zip(lo, hi)]
    ref = sitk.Image([2, 2, 2], sitk.sitkUInt8)
    ref.SetOrigin(tuple(lo))
    ref.SetSpacing(tuple(hi - lo))
    bs = sitk.BSplineTransformInitializer(ref, mesh, 3)
    bs.SetParameters(tuple(rng.uniform(-amplitude_mm, amplitude_mm, len(bs.GetParameters()))))
    return bs


def _phase_weight(hu: np.ndarray, band: tuple[float, float], ramp: float = 10.0) -> np.ndarray:
    """1 inside the HU band, 0 outside, linear ramps of ``ramp`` HU (no artificial edges)."""
    lo, hi = band
    return np.clip(np.minimum(hu - (lo - ramp), (hi + ramp) - hu) / ramp, 0.0, 1.0).astype(np.float32)


def simulate_hard_followup(volume: Volume, seed: int = 0,
                           protocol: FollowupProtocol = FollowupProtocol()) -> SimulatedPair:
    """A follow-up CT of ``volume`` as hard as a real one (issue 10 protocol); the input is untouched.

    The follow-up has its own voxel grid (spacing x0.8-1.5 per axis, same direction), covers
    85% of the baseline's z extent at a random offset, and shows the baseline through a rigid
    motion and a smooth cubic B-spline deformation, with a contrast-phase change (soft tissue
    gains HU), a global gain/offset and Gaussian noise. ``map_points`` is the exact truth.
    """
    if volume.modality is not Modality.CT:
        raise InputError("the hard follow-up protocol models CT (Hounsfield units); got " + volume.modality.value)
    p = protocol
    rng = np.random.default_rng(seed)
    corners = volume.corners_lps()
    box_lo, box_hi = corners.min(0), corners.max(0)
    centre = corners.mean(0)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(tuple(centre))
    rigid.SetRotation(*np.deg2rad(rng.uniform(-p.rotation_deg, p.rotation_deg, 3)))
    rigid.SetTranslation(tuple(rng.uniform(-p.translation_mm, p.translation_mm, 3)))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(rigid)
    if p.bspline_mm > 0:
        composite.AddTransform(_bspline(box_lo - 30, box_hi + 30, rng, p.bspline_mm, p.control_mm))

    # the follow-up's own grid: same direction, new spacing, 85% of the z extent at a random offset
    scale = rng.uniform(*p.spacing_scale, 3)
    spacing = np.asarray(volume.spacing) * scale
    extent = (np.asarray(volume.size_xyz) - 1) * np.asarray(volume.spacing)
    size = np.maximum(1, np.floor(extent / spacing).astype(int) + 1)
    z_keep = max(1, int(np.floor(p.z_coverage * extent[2] / spacing[2])) + 1)
    z0_mm = rng.uniform(0.0, max(0.0, extent[2] - (z_keep - 1) * spacing[2]))
    size[2] = z_keep
    origin = volume.index_to_lps([0.0, 0.0, z0_mm / volume.spacing[2]])
    ref = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    ref.SetSpacing(tuple(float(v) for v in spacing))
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetDirection(tuple(volume.direction.ravel()))
    fill = float(volume.array.min())
    moved = sitk.Resample(volume.to_sitk(), ref, composite, sitk.sitkLinear, fill, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(moved)
    phase = rng.uniform(*p.phase_gain_hu)
    gain = rng.uniform(*p.gain)
    offset = rng.uniform(-p.offset_hu, p.offset_hu)
    arr = arr + phase * _phase_weight(arr, p.phase_band_hu)
    arr = arr * gain + offset + rng.normal(0.0, p.noise_hu, arr.shape).astype(np.float32)
    out = Volume(arr.astype(np.float32), moved.GetSpacing(), moved.GetOrigin(),
                 np.array(moved.GetDirection()).reshape(3, 3), Modality.CT, f"{volume.name}_hardfollowup{seed}")
    params = {"seed": seed, "protocol": p.to_dict(), "spacing_mm": [round(float(v), 3) for v in spacing],
              "z_offset_mm": round(float(z0_mm), 1), "phase_gain_hu": round(float(phase), 1),
              "gain": round(float(gain), 3), "offset_hu": round(float(offset), 1), "simulated": True}
    return SimulatedPair(volume, out, composite, params)


def change_lesion(volume: Volume, label: np.ndarray, change_mm: float, seed: int = 0) -> tuple[Volume, np.ndarray]:
    """``volume`` with the labelled lesion grown (change_mm > 0) or shrunk (< 0) by ``|change_mm|``.

    The lesion boundary moves by change_mm (a Euclidean distance on the voxel grid): grown
    voxels take the lesion's own intensities (resampled from it, with its texture), voxels
    the lesion gives up take the median of the tissue around it. Returns the new volume and
    the lesion centre (label centroid) in LPS: the point whose follow-up position is the truth.
    """
    lab = np.asarray(label) > 0
    if lab.shape != volume.array.shape or not lab.any():
        raise InputError("the lesion label must be a non-empty mask on the volume's grid")
    rng = np.random.default_rng(seed)
    sp = np.asarray(volume.spacing)[::-1]  # (z, y, x)
    centre = volume.index_to_lps(np.argwhere(lab).mean(0)[::-1])
    arr = np.array(volume.array, dtype=np.float32)
    inside = arr[lab]
    if change_mm > 0:
        dist = ndimage.distance_transform_edt(~lab, sampling=sp)
        grown = (dist > 0) & (dist <= change_mm)
        arr[grown] = rng.choice(inside, int(grown.sum())) + rng.normal(0, 0.25 * inside.std(), int(grown.sum()))
    elif change_mm < 0:
        depth = ndimage.distance_transform_edt(lab, sampling=sp)
        lost = lab & (depth <= -change_mm)
        shell = (ndimage.distance_transform_edt(~lab, sampling=sp) > 0) & \
            (ndimage.distance_transform_edt(~lab, sampling=sp) <= 6.0)
        around = arr[shell]
        arr[lost] = np.median(around) + rng.normal(0, max(1.0, 0.5 * around.std()), int(lost.sum()))
    return volume.with_array(arr, f"{volume.name}_lesion{change_mm:+g}mm"), centre


def body_points(volume: Volume, count: int, seed: int = 0, erode_mm: float = 10.0) -> np.ndarray:
    """``count`` random LPS points (N, 3) inside the body mask eroded by ``erode_mm`` (not only landmarks)."""
    mask = body_mask(volume)
    sp = np.asarray(volume.spacing)[::-1]
    inner = ndimage.distance_transform_edt(mask, sampling=sp) > erode_mm
    idx = np.argwhere(inner)
    if len(idx) == 0:
        raise InputError(f"{volume.name or 'volume'}: no body voxel deeper than {erode_mm:g} mm")
    rng = np.random.default_rng(seed)
    pick = idx[rng.choice(len(idx), min(count, len(idx)), replace=False)].astype(np.float64)
    pick += rng.uniform(-0.5, 0.5, pick.shape)  # anywhere in the voxel, not only at centres
    return volume.index_to_lps(pick[:, ::-1])


def moved_box(volume: Volume, to_new: np.ndarray, lo_idx, hi_idx, spacing) -> sitk.Image:
    """The index box [lo_idx, hi_idx] (continuous x, y, z) of ``volume`` carried by the rigid map
    ``to_new`` (volume LPS -> new LPS) and resampled on its own grid there: axes = the volume's
    axes rotated with the map, ``spacing`` (x, y, z) mm. Linear interpolation, the volume's
    minimum outside."""
    lo_idx, hi_idx = np.asarray(lo_idx, float), np.asarray(hi_idx, float)
    m_src = volume.index_to_lps_matrix
    extent = (hi_idx - lo_idx) * np.asarray(volume.spacing)
    size = [max(2, int(np.floor(e / s)) + 1) for e, s in zip(extent, spacing)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(tuple(float(v) for v in spacing))
    ref.SetOrigin(tuple(float(v) for v in to_new[:3, :3] @ (m_src[:3, :3] @ lo_idx + m_src[:3, 3]) + to_new[:3, 3]))
    ref.SetDirection(tuple(float(v) for v in (to_new[:3, :3] @ volume.direction).ravel()))
    return sitk.Resample(volume.to_sitk(), ref, sitk_affine(np.linalg.inv(to_new)), sitk.sitkLinear,
                         float(volume.array.min()), sitk.sitkFloat32)


def rigidly_moved(volume: Volume, seed: int = 0, rotation_deg=(8.0, 12.0), offset_mm=(15.0, 25.0),
                  name: str = "") -> tuple[Volume, np.ndarray]:
    """``volume`` moved by a seeded random rigid motion (rotation in ``rotation_deg`` about a
    random axis through its centre, translation in ``offset_mm``) and resampled on its own moved
    grid (same size and spacing, axes turned with it); returns the moved volume and the 4x4
    truth mapping ``volume`` LPS points to the moved volume's LPS points. Used to perturb one of
    two scanner-aligned real scans (e.g. the same-patient prostate T2 and DWI)."""
    rng = np.random.default_rng([zlib.crc32(f"{volume.name} rigid".encode()), seed])
    truth = random_rigid(rng, volume.corners_lps().mean(0), rotation_deg, offset_mm)
    img = moved_box(volume, truth, np.zeros(3), np.asarray(volume.size_xyz, float) - 1, volume.spacing)
    return Volume.from_sitk(img, volume.modality, name=name or f"{volume.name}_moved{seed}"), truth


def simulate_offcentre_pair(volume: Volume, seed: int = 0, contrast: str = "same", fov_fraction=(0.35, 0.5),
                            rotation_deg=(5.0, 20.0), offset_mm=(60.0, 120.0), spacing_mm=(1.0, 2.5),
                            noise: float = 0.02) -> SimulatedPair:
    """A follow-up that is an OFF-CENTRE field-of-view crop of ``volume`` after a large rigid motion,
    on its own voxel grid (the registration benchmark's protocol, issue 12).

    The crop keeps ``fov_fraction`` (range) of the extent along the longest physical axis and
    75-100% along the others, pushed towards one end of each axis; the rigid motion rotates by
    ``rotation_deg`` (range) about a random axis and translates by ``offset_mm`` (range); the
    follow-up's axes turn with it and its spacing is drawn from ``spacing_mm`` per axis (never
    finer than half the source's). ``contrast``: 'same' (noise and gain), 'mr-like' (CT to a
    T1-like, non-monotonic map, flagged MR) or 'gamma' (MR gamma remap). ``transform`` maps
    follow-up points to ``volume`` points; ``map_points`` gives the truth the other way.
    """
    if contrast not in ("same", "mr-like", "gamma"):
        raise InputError(f"contrast must be 'same', 'mr-like' or 'gamma', got {contrast!r}")
    rng = np.random.default_rng([zlib.crc32(f"{volume.name} {contrast}".encode()), seed])
    fraction = rng.uniform(*fov_fraction)
    size = np.asarray(volume.size_xyz, float) - 1
    longest = int(np.argmax(size * np.asarray(volume.spacing)))
    lo, hi = np.zeros(3), size.copy()
    for a in range(3):
        keep = (fraction if a == longest else rng.uniform(0.75, 1.0)) * size[a]
        u = rng.uniform(0.0, 0.15) if rng.random() < 0.5 else rng.uniform(0.85, 1.0)
        lo[a] = u * (size[a] - keep)
        hi[a] = lo[a] + keep
    m_src = volume.index_to_lps_matrix
    centre = m_src[:3, :3] @ ((lo + hi) / 2) + m_src[:3, 3]
    to_new = random_rigid(rng, centre, rotation_deg, offset_mm)
    spacing = np.maximum(rng.uniform(*spacing_mm, 3), np.asarray(volume.spacing) / 2)
    img = moved_box(volume, to_new, lo, hi, spacing)
    arr = sitk.GetArrayFromImage(img)
    p1, p99 = np.percentile(volume.array[:: max(1, volume.array.shape[0] // 16)], [1, 99])
    arr = arr + rng.normal(0, noise * (p99 - p1), arr.shape).astype(np.float32)
    modality = volume.modality
    if contrast == "same":
        arr = (arr - p1) * rng.uniform(0.95, 1.05) + p1
    elif contrast == "mr-like":
        arr = mr_like(arr) * rng.uniform(0.8, 1.2) + rng.normal(0, 3.0, arr.shape).astype(np.float32)
        modality = Modality.MR
    else:
        arr = p99 * np.clip(arr / max(p99, 1e-6), 0, None) ** rng.uniform(0.7, 1.4)
    out = Volume.from_sitk(img, modality, name=f"{volume.name}_offcentre{seed}").with_array(arr.astype(np.float32))
    params = {"seed": seed, "contrast": contrast, "fov_fraction_longest_axis": round(float(fraction), 3),
              "rotation_deg": round(float(np.degrees(np.arccos(np.clip((np.trace(to_new[:3, :3]) - 1) / 2, -1, 1)))), 2),
              "offset_mm": round(float(np.linalg.norm(to_new[:3, :3] @ centre + to_new[:3, 3] - centre)), 1),
              "spacing_mm": [round(float(v), 2) for v in spacing], "simulated": True}
    return SimulatedPair(volume, out, sitk_affine(np.linalg.inv(to_new)), params)


def insert_lesion(volume: Volume, centre_lps, radii_mm, hu: float, seed: int = 0,
                  texture_hu: float = 10.0) -> tuple[Volume, np.ndarray]:
    """``volume`` with an ellipsoidal lesion of mean ``hu`` inserted (a simulated lesion).

    The ellipsoid's axes are the LPS axes scaled by ``radii_mm`` (x, y, z); voxels whose
    centre is inside take ``hu`` plus Gaussian texture (``texture_hu``); a one-voxel rim
    blends with the tissue by the fraction of the voxel inside (partial volume).

    Returns:
        (new volume, (z, y, x) bool mask of the voxels whose centre is inside the ellipsoid).
    """
    centre = np.asarray(centre_lps, dtype=np.float64).reshape(3)
    radii = np.asarray(radii_mm, dtype=np.float64).reshape(3)
    if not np.all(radii > 0):
        raise InputError(f"lesion radii must be positive, got {radii.tolist()}")
    rng = np.random.default_rng(seed)
    reach = radii.max() + 2 * max(volume.spacing)
    corners = centre + np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * reach
    ijk = volume.lps_to_index(corners)
    lo = np.maximum(np.floor(ijk.min(0)).astype(int), 0)
    hi = np.minimum(np.ceil(ijk.max(0)).astype(int) + 1, np.asarray(volume.size_xyz))
    arr = np.array(volume.array, dtype=np.float32)
    mask = np.zeros(arr.shape, bool)
    if np.any(hi <= lo):
        return volume.with_array(arr), mask
    k, j, i = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo[::-1], hi[::-1])), indexing="ij")
    lps = volume.index_to_lps(np.stack([i, j, k], -1).reshape(-1, 3).astype(np.float64))
    r = np.linalg.norm((lps - centre) / radii, axis=1).reshape(k.shape)  # 1 on the surface
    # fraction inside: a linear ramp one voxel wide across the surface (in units of the radius)
    step = np.mean(volume.spacing) / radii.min()
    frac = np.clip((1.0 - r) / step + 0.5, 0.0, 1.0)
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    lesion = hu + rng.normal(0.0, texture_hu, frac.shape)
    arr[box] = (frac * lesion + (1 - frac) * arr[box]).astype(np.float32)
    mask[box] = r <= 1.0
    return volume.with_array(arr, f"{volume.name}_lesion"), mask
