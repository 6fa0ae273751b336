"""Registration benchmark (issue 4): SAM-rigid / SAM-affine / +coarse / +deformable versus
ANTs (antspyx) and elastix (itk-elastix), on the same pairs, in one run, one table.

Run:  python Testing/Benchmarks/benchmark_registration.py [--model PATH] [--quick] [--no-peers] [--json OUT]

Pairs
* SIMULATED from a real CT: a follow-up made with a known motion (rigid, or affine with
  scaling; optionally a smooth deformation), noise and a contrast change; optionally a 50%
  field-of-view crop and an MR-like intensity remap (cross-modality). Source scans: the
  TotalSegmentator example CT (3 mm) and, at native clinical resolution, the pyradiomics lung
  CT (512 x 512 x 48 at 0.57 x 0.57 x 5 mm). fixed = simulated follow-up, moving = the real
  scan; the point error is exact (ground-truth map at evaluation points every 15 mm inside the
  fixed body whose true position is inside the moving image). No real follow-up pair exists in
  the data: these are simulations.
* INTER-PATIENT real CTs with TotalSegmentator labels (model outputs, not manual ground truth):
  Dice of the shared labels after warping the moving labels onto the fixed grid. Fixed = the
  whole 3 mm CT of patient A, whose labels exist for its first 30 slices (Dice is measured in
  that slab); moving = a 40 mm contrast-CT slab of patient B (31 labels) and a chest CT crop of
  patient C (aorta and T12 masks).

SAM rows: "+refine" adds the intensity refinement of the linear map (LNCC, or MIND-SSC across
modalities; RegistrationOptions.refine, on by default); rows without it are the pure SAM fit.

Columns: time = wall clock of the whole method (SAM rows include embedding both images
without cache; "reg" = SAM stages after embedding), peak = peak resident memory above the
baseline during the method (Linux VmHWM, reset before each method), err = point error (mm),
Dice = mean over shared labels, fold = % of fixed-body voxels with det(Jacobian) <= 0 of the
complete map (deformable methods).

Peer settings (stated in the output too): ANTs = ants.registration defaults for
type_of_transform Rigid / Affine / SyN (Mattes MI, 4-level pyramid, SyN iterations (40, 20, 0),
centre-of-mass initialisation); elastix = itk-elastix default 'affine' and 'bspline' parameter
maps (Mattes MI, 4 resolutions, 256 iterations, 2048 random samples) plus centre-of-gravity
initialisation; the B-spline map uses 3 resolutions and a 20 mm final control-point spacing.
Peers get the inputs resampled to at least 3 mm per axis (Gaussian pre-filter, linear) unless
the method is marked "(native)": then they run on the scans' own grids, as ants.registration
and elastix are used by default. SAM always works on its own 2 mm model grid.
Threads: ITK 2 (ANTs, elastix); torch 2 (--torch-threads; use 1 when other jobs share the
cores); the deformable loop itself runs on 1 thread (DeformableOptions.cpu_threads).
"""
from __future__ import annotations

import os

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")  # before itk / ants are imported

import argparse
import json
import sys
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/, for repo_paths
from bench_table import fitted_table, fmt, print_machine_load  # noqa: E402
from repo_paths import REPO, SHARED  # noqa: E402
sys.path.insert(0, str(REPO))

from samv2core.preprocess import body_mask, resample_to_model_grid  # noqa: E402
from samv2core.registration import DeformableOptions, RegistrationOptions, register  # noqa: E402
from samv2core.registration.sampling import grid_points_in_mask  # noqa: E402
from samv2core.registration.svf import jacobian_determinant  # noqa: E402
from samv2core.simulate import simulate_followup  # noqa: E402
from samv2core.volume import Volume, load_volume  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


# --- measurement helpers ------------------------------------------------------------------------
def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak resident memory above the starting level while the block runs (MB).

    Resets the kernel's high-water mark (VmHWM) through /proc/self/clear_refs when allowed,
    else samples VmRSS every 20 ms.
    """

    def __enter__(self):
        self.base = _rss_kb("VmRSS:")
        self.samples = [self.base]
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm = True
        except OSError:
            self.hwm = False
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.samples.append(_rss_kb("VmRSS:"))
            time.sleep(0.02)

    def __exit__(self, *exc):
        if self.hwm:
            peak = _rss_kb("VmHWM:")
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self.samples)
        self.mb = max(0.0, (peak - self.base) / 1024.0)
        return False


@dataclass
class Row:
    case: str
    method: str
    seconds: float | None = None
    reg_seconds: float | None = None
    peak_mb: float | None = None
    err_mean: float | None = None
    err_p90: float | None = None
    dice: float | None = None
    fold: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# --- data -----------------------------------------------------------------------------------------
def affine_followup(volume: Volume, seed: int, crop_fraction: float | None, max_scale: float = 0.06,
                    rotation_deg: float = 5.0, translation_mm: float = 10.0, noise: float = 0.02):
    """A follow-up with a known AFFINE motion (rotation, per-axis scaling, translation).

    Returns (follow-up Volume, sitk.AffineTransform mapping follow-up LPS points to the scan).
    """
    rng = np.random.default_rng(seed)
    from scipy.spatial.transform import Rotation

    c = volume.corners_lps().mean(0)
    a = Rotation.from_euler("xyz", rng.uniform(-rotation_deg, rotation_deg, 3), degrees=True).as_matrix()
    a = a @ np.diag(1.0 + rng.uniform(-max_scale, max_scale, 3))
    t = sitk.AffineTransform(3)
    t.SetCenter(tuple(c))
    t.SetMatrix(tuple(a.ravel()))
    t.SetTranslation(tuple(rng.uniform(-translation_mm, translation_mm, 3)))
    ref = volume.to_sitk()
    if crop_fraction:
        z = volume.array.shape[0]
        keep = int(round(z * crop_fraction))
        start = int(rng.integers(0, z - keep + 1))
        ref = ref[:, :, start:start + keep]
    out = sitk.Resample(volume.to_sitk(), ref, t, sitk.sitkLinear, float(volume.array.min()), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)
    lo, hi = np.percentile(volume.array[::4], [1, 99])
    arr = arr + rng.normal(0, noise * (hi - lo), arr.shape).astype(np.float32)
    vol = Volume.from_sitk(out, volume.modality, name=f"{volume.name}_affine{seed}").with_array(arr)
    return vol, t


@dataclass
class Case:
    name: str
    fixed: Volume
    moving: Volume
    kind: str  # "points" or "dice"
    methods: list
    truth: object = None  # sitk transform fixed -> moving (points)
    fixed_labels: sitk.Image | None = None
    moving_labels: sitk.Image | None = None
    labels: tuple = ()
    mode: str = "affine"
    eval_points: np.ndarray | None = None
    truth_points: np.ndarray | None = None
    body: np.ndarray | None = None  # fixed body mask on the fixed grid (for folding)
    eval_mask: np.ndarray | None = None  # where the fixed labels are defined (Dice is measured there)


def _eval_points(case: Case) -> None:
    fm = resample_to_model_grid(case.fixed, 2.0)
    pts = grid_points_in_mask(fm, body_mask(fm), 15.0, border_mm=10.0, max_points=3000)
    truth = np.array([case.truth.TransformPoint(tuple(p)) for p in pts])
    keep = case.moving.contains_lps(truth, tolerance_voxels=-2.0)
    case.eval_points, case.truth_points = pts[keep], truth[keep]


def _read_seg(path: Path) -> sitk.Image:
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkUInt16)


def _masks_to_labels(reference: Path, masks: dict) -> sitk.Image:
    ref = sitk.ReadImage(str(reference))
    out = np.zeros(sitk.GetArrayFromImage(ref).shape, np.uint16)
    for label, path in masks.items():
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
        out[m] = label
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(ref)
    return img


SAM_LINEAR = ["SAM-rigid", "SAM-affine", "SAM-rigid+refine", "SAM-affine+refine"]
SAM_ALL = ["SAM-affine", "SAM-affine+refine", "SAM-affine+coarse", "SAM-affine+coarse+deformable",
           "SAM-affine+refine+coarse+deformable"]
PEERS_LINEAR = ["ANTs Rigid", "ANTs Affine", "elastix affine"]
PEERS_DEF = ["ANTs Affine", "ANTs SyN", "elastix affine", "elastix affine+B-spline"]
NATIVE = " (native)"  # peer method suffix: run on the native grids instead of >= 3 mm input


def build_cases(quick: bool) -> list[Case]:
    ct = load_volume(SHARED / "ct" / "totalseg_example" / "ct_3mm.nii.gz", "CT")
    ct = Volume(ct.array, ct.spacing, ct.origin, ct.direction, "CT", "ct3mm", dict(ct.meta))
    cases = []

    p = simulate_followup(ct, seed=11, rotation_deg=5.0, translation_mm=10.0, deformation_mm=0.0)
    cases.append(Case("sim CT rigid, full FOV", p.followup, ct, "points", ["initial"] + SAM_LINEAR + PEERS_LINEAR,
                      truth=p.transform, mode="rigid"))
    p = simulate_followup(ct, seed=12, rotation_deg=5.0, translation_mm=10.0, deformation_mm=0.0, crop_fraction=0.5)
    cases.append(Case("sim CT rigid, 50% FOV", p.followup, ct, "points", ["initial"] + SAM_LINEAR + PEERS_LINEAR,
                      truth=p.transform, mode="rigid"))
    if not quick:
        fu, t = affine_followup(ct, seed=13, crop_fraction=0.5)
        cases.append(Case("sim CT affine (+-6% scale), 50% FOV", fu, ct, "points",
                          ["initial", "SAM-affine", "SAM-affine+refine", "ANTs Affine", "elastix affine"], truth=t,
                          mode="affine"))
    p = simulate_followup(ct, seed=14, rotation_deg=5.0, translation_mm=10.0, deformation_mm=0.0, crop_fraction=0.5,
                          mr=True)
    cases.append(Case("sim CT->MR-like rigid, 50% FOV", p.followup, ct, "points",
                      ["initial", "SAM-rigid", "SAM-rigid+refine", "SAM-rigid+refine+deformable", "ANTs Rigid",
                       "elastix affine"], truth=p.transform, mode="rigid"))
    if not quick:
        p = simulate_followup(ct, seed=16, rotation_deg=4.0, translation_mm=8.0, deformation_mm=8.0, control_mm=60.0,
                              mr=True)
        cases.append(Case("sim CT->MR-like rigid + 8 mm smooth deformation", p.followup, ct, "points",
                          ["initial", "SAM-affine+refine", "SAM-affine+refine+coarse+deformable", "ANTs Affine",
                           "ANTs SyN", "elastix affine", "elastix affine+B-spline"], truth=p.transform,
                          mode="affine"))
    p = simulate_followup(ct, seed=15, rotation_deg=4.0, translation_mm=8.0, deformation_mm=8.0, control_mm=60.0)
    cases.append(Case("sim CT rigid + 8 mm smooth deformation", p.followup, ct, "points",
                      ["initial"] + SAM_ALL + PEERS_DEF, truth=p.transform, mode="affine"))
    # native clinical resolution (512 x 512 x 48 at 0.57 x 0.57 x 5 mm, pyradiomics lung CT):
    # peers run on the native grid (their default use) and, for comparison, on >= 3 mm input
    lung = load_volume(SHARED / "ct" / "radiomics_lung1" / "image.nrrd", "CT")
    lung = Volume(lung.array, lung.spacing, lung.origin, lung.direction, "CT", "lung1", dict(lung.meta))
    p = simulate_followup(lung, seed=21, rotation_deg=5.0, translation_mm=10.0, deformation_mm=0.0)
    cases.append(Case("native lung CT rigid, full FOV", p.followup, lung, "points",
                      ["initial"] + SAM_LINEAR + [m + NATIVE for m in PEERS_LINEAR] + ["ANTs Rigid"],
                      truth=p.transform, mode="rigid"))
    if not quick:
        p = simulate_followup(lung, seed=22, rotation_deg=4.0, translation_mm=8.0, deformation_mm=8.0, control_mm=60.0)
        cases.append(Case("native lung CT rigid + 8 mm smooth deformation", p.followup, lung, "points",
                          ["initial"] + SAM_ALL + [m + NATIVE for m in ("ANTs SyN", "elastix affine+B-spline")]
                          + ["ANTs SyN"], truth=p.transform, mode="affine"))
    for c in cases:
        _eval_points(c)

    # inter-patient real CTs with TotalSegmentator labels. Fixed: the whole 3 mm CT (patient A);
    # its labels exist for 30 of its slices (ct_3mm_30slices / seg_3mm_30slices: the LAST 30
    # slices, although their header keeps the full scan's origin), so Dice is measured there.
    a30 = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED / "ct" / "totalseg_example" / "ct_3mm_30slices.nii.gz")))
    a_seg30 = _read_seg(SHARED / "ct" / "totalseg_example" / "seg_3mm_30slices.nii.gz")
    n30 = a30.shape[0]
    k0 = int(np.argmin([np.abs(ct.array[k:k + n30] - a30).mean() for k in range(ct.array.shape[0] - n30 + 1)]))
    assert np.abs(ct.array[k0:k0 + n30] - a30).mean() < 1.0, "the 30-slice CT is not a block of the full CT"
    a_lab = np.zeros(ct.array.shape, np.uint16)
    a_lab[k0:k0 + n30] = sitk.GetArrayFromImage(a_seg30)
    a_seg = sitk.GetImageFromArray(a_lab)
    a_seg.CopyInformation(ct.to_sitk())
    slab = np.zeros(ct.array.shape, bool)
    slab[k0:k0 + n30] = True
    b_ct = load_volume(SHARED / "ct" / "totalseg_dicom" / "dicom", "CT")
    b_seg = _read_seg(SHARED / "ct" / "totalseg_dicom" / "seg.nii.gz")
    cases.append(Case("inter-patient CT B (40 mm slab) -> A", ct, b_ct, "dice", ["initial"] + SAM_ALL + PEERS_DEF,
                      fixed_labels=a_seg, moving_labels=b_seg, labels=_shared_labels(a_seg30, b_seg),
                      eval_mask=slab))
    if not quick:
        aorta = SHARED / "ct" / "totalseg_aorta"
        c_ct = load_volume(aorta / "ct_1.5mm.nii.gz", "CT")
        c_seg = _masks_to_labels(aorta / "ct_1.5mm.nii.gz", {52: aorta / "masks" / "aorta.nii.gz",
                                                             32: aorta / "masks" / "vertebrae_T12.nii.gz"})
        cases.append(Case("inter-patient CT C (chest) -> A (aorta, T12)", ct, c_ct, "dice",
                          ["initial", "SAM-affine", "SAM-affine+coarse+deformable", "ANTs Affine", "ANTs SyN",
                           "elastix affine", "elastix affine+B-spline"],
                          fixed_labels=a_seg, moving_labels=c_seg, labels=(32, 52), eval_mask=slab))
    for c in cases:
        fm = c.fixed
        c.body = body_mask(fm)
    return cases


def _shared_labels(a: sitk.Image, b: sitk.Image, min_voxels: int = 50) -> tuple:
    ua, ca = np.unique(sitk.GetArrayFromImage(a), return_counts=True)
    ub, cb = np.unique(sitk.GetArrayFromImage(b), return_counts=True)
    sa = {int(u) for u, c in zip(ua, ca) if u > 0 and c >= min_voxels}
    sb = {int(u) for u, c in zip(ub, cb) if u > 0 and c >= min_voxels}
    return tuple(sorted(sa & sb))


# --- evaluation ---------------------------------------------------------------------------------------
class Mapping:
    """A method's fixed -> moving map: point transform, label resampling, total displacement field."""

    def __init__(self, points_fn, labels_fn, field_fn=None):
        self.points = points_fn
        self.labels = labels_fn
        self.field = field_fn


def sitk_mapping(transform: sitk.Transform) -> Mapping:
    def points(p):
        return np.array([transform.TransformPoint(tuple(map(float, q))) for q in p])

    def labels(lab: sitk.Image, ref: Volume):
        return sitk.Resample(lab, ref.to_sitk(), transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)

    def field_(ref: Volume):
        f = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, ref.to_sitk().GetSize(),
                                              ref.origin, ref.spacing, tuple(ref.direction.ravel()))
        return sitk.GetArrayFromImage(f)

    return Mapping(points, labels, field_)


def evaluate(case: Case, mapping: Mapping, deformable: bool) -> dict:
    out = {}
    if case.kind == "points":
        err = np.linalg.norm(mapping.points(case.eval_points) - case.truth_points, axis=1)
        out["err_mean"], out["err_p90"] = float(err.mean()), float(np.percentile(err, 90))
    else:
        warped = sitk.GetArrayFromImage(mapping.labels(case.moving_labels, case.fixed))
        fixed = sitk.GetArrayFromImage(case.fixed_labels)
        if case.eval_mask is not None:  # labels only known there: ignore the rest of the fixed grid
            warped, fixed = warped[case.eval_mask], fixed[case.eval_mask]
        dices = []
        for lab in case.labels:
            a, b = fixed == lab, warped == lab
            dices.append(2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))
        out["dice"] = float(np.mean(dices)) if dices else None
        out["dice_per_label"] = dict(zip(map(int, case.labels), map(lambda d: round(d, 3), dices)))
    if deformable and mapping.field is not None:
        disp = mapping.field(case.fixed)  # (z, y, x, 3) total displacement, LPS mm, on the fixed grid
        if disp is None:
            return out
        # Jacobian of x -> x + u(x) in index directions: det is invariant to the (orthonormal) direction
        u = np.moveaxis(disp @ case.fixed.direction, -1, 0)  # components along the index axes
        det = jacobian_determinant(u, case.fixed.spacing)
        body = case.body
        out["fold"] = 100.0 * float(np.count_nonzero(det[body] <= 0)) / max(1, int(body.sum()))
    return out


# --- methods --------------------------------------------------------------------------------------------
class SamRunner:
    def __init__(self, model_path: str | None):
        from samv2core.embed import Embedder
        from samv2core.models import resolve_model

        resolved = resolve_model(model_path, device="cpu", allow_untrained=True)
        self.label = resolved.label
        self.trained = resolved.trained
        self.embedder = Embedder(resolved.model, device="cpu")
        self.embed_seconds: dict[int, float] = {}

    def embed_time(self, volume: Volume) -> float:
        """Cold embedding time of ``volume`` (measured once; later runs hit the cache)."""
        key = id(volume)
        if key not in self.embed_seconds:
            t = time.perf_counter()
            self.embedder.embed(volume)
            self.embed_seconds[key] = time.perf_counter() - t
        return self.embed_seconds[key]

    def run(self, case: Case, method: str):
        mode = "rigid" if method.startswith("SAM-rigid") else "affine"
        coarse = "coarse" in method
        deformable = "deformable" in method
        opts = RegistrationOptions(require_physical_overlap=case.kind == "points", refine="refine" in method,
                                   deformable=DeformableOptions(device="cpu"))
        embed = self.embed_time(case.fixed) + self.embed_time(case.moving)
        res = register(case.fixed, case.moving, mode=mode, coarse=coarse, deformable=deformable,
                       embedder=self.embedder, options=opts)
        rep = res.report
        reg_s = rep["timing"]["total_s"] - rep["timing"].get("embedding_s", 0.0)
        note = f"{rep['linear']['inliers']}/{rep['linear']['matches']} inliers"
        if rep["features"] != "sam":
            note += f" on {rep['features']}"
        if "linear_refinement" in rep:
            lr = rep["linear_refinement"]
            note += (f", refine {lr['term']} {lr['seconds']:.1f} s" if "term" in lr else ", refine") \
                + ("" if lr["accepted"] else " (not applied)")
        if deformable:
            note += f", {rep['deformable_refinement']['intensity_term']}+emb"
        return sitk_mapping(res.composite), embed + reg_s, reg_s, note


def _resample_for_peers(v: Volume, min_spacing: float = 3.0) -> Volume:
    sp = np.maximum(np.asarray(v.spacing), min_spacing)
    if np.allclose(sp, v.spacing):
        return v
    img = v.to_sitk()
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), v.spacing, sp)]
    sm = sitk.SmoothingRecursiveGaussian(img, [max(0.5 * np.sqrt(max(t * t - s * s, 0)), 1e-3) for s, t in zip(v.spacing, sp)])
    out = sitk.Resample(sm, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), tuple(sp), img.GetDirection(),
                        float(v.array.min()), sitk.sitkFloat32)
    return Volume.from_sitk(out, v.modality, name=v.name)


def run_ants(case: Case, method: str, f: Volume, m: Volume):
    import ants

    def to_ants(v: Volume):
        return ants.from_numpy(np.ascontiguousarray(v.array.transpose(2, 1, 0)), origin=list(v.origin),
                               spacing=list(v.spacing), direction=v.direction.copy())

    kind = method.split()[-1]
    t = time.perf_counter()
    r = ants.registration(to_ants(f), to_ants(m), type_of_transform=kind, random_seed=1)
    sec = time.perf_counter() - t
    transforms = []
    for path in r["fwdtransforms"]:
        if path.endswith(".mat"):
            transforms.append(sitk.ReadTransform(path))
        else:
            transforms.append(sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64)))
    # ANTs lists [warp, affine] for antsApplyTransforms; as a point map fixed -> moving that is
    # affine(warp(x)), i.e. SimpleITK CompositeTransform([affine, warp]) (checked against
    # ants.apply_transforms on images when this benchmark was written)
    comp = sitk.CompositeTransform(transforms[::-1])
    return sitk_mapping(comp), sec, None, ""


def run_elastix(case: Case, method: str, f: Volume, m: Volume):
    import itk

    def to_itk(v: Volume):
        img = itk.image_from_array(np.ascontiguousarray(v.array.astype(np.float32)))
        img.SetOrigin(v.origin)
        img.SetSpacing(v.spacing)
        img.SetDirection(itk.matrix_from_array(np.array(v.direction, dtype=np.float64)))  # a writable copy: itk crashes on read-only arrays
        return img

    po = itk.ParameterObject.New()
    aff = po.GetDefaultParameterMap("affine")
    aff["AutomaticTransformInitialization"] = ["true"]
    aff["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    po.AddParameterMap(aff)
    if "B-spline" in method:
        # 3 resolutions, 20 mm final control-point spacing (the 4-level 10 mm default overfits
        # and folds on these pairs and takes ~75 s)
        po.AddParameterMap(po.GetDefaultParameterMap("bspline", 3, 20.0))
    fi, mi = to_itk(f), to_itk(m)
    t = time.perf_counter()
    reg = itk.ElastixRegistrationMethod.New(fi, mi)
    reg.SetParameterObject(po)
    reg.SetLogToConsole(False)
    reg.UpdateLargestPossibleRegion()
    sec = time.perf_counter() - t
    tr = reg.GetCombinationTransform()
    params = reg.GetTransformParameterObject()

    def points(p):
        return np.array([np.asarray(tr.TransformPoint([float(x) for x in q])) for q in p])

    def labels(lab: sitk.Image, ref: Volume):
        # transformix on the full-resolution fixed grid, nearest-neighbour label interpolation
        pobj = itk.ParameterObject.New()
        for i in range(params.GetNumberOfParameterMaps()):
            pm = params.GetParameterMap(i)
            pm["ResampleInterpolator"] = ["FinalNearestNeighborInterpolator"]
            pm["FinalBSplineInterpolationOrder"] = ["0"]
            pm["Size"] = [str(s) for s in ref.size_xyz]
            pm["Spacing"] = [str(s) for s in ref.spacing]
            pm["Origin"] = [str(o) for o in ref.origin]
            pm["Direction"] = [str(d) for d in ref.direction.T.ravel()]
            pm["ResultImagePixelType"] = ["float"]
            pobj.AddParameterMap(pm)
        lab_f = sitk.Cast(lab, sitk.sitkFloat32)
        li = itk.image_from_array(sitk.GetArrayFromImage(lab_f))
        li.SetOrigin(lab.GetOrigin())
        li.SetSpacing(lab.GetSpacing())
        li.SetDirection(itk.matrix_from_array(np.asarray(lab.GetDirection()).reshape(3, 3).copy()))
        out = itk.transformix_filter(li, pobj)
        arr = np.rint(itk.array_from_image(out)).astype(np.uint16)
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ref.to_sitk())
        return img

    def field_(ref: Volume):
        # total displacement of the complete elastix map on the (peer-resolution) fixed grid
        d = itk.transformix_deformation_field(mi, params)
        arr = itk.array_from_image(d).astype(np.float64)
        if arr.shape[:3] != ref.array.shape:  # peers ran on a resampled fixed grid: evaluate there
            return None
        return arr

    mapping = Mapping(points, labels, field_)
    return mapping, sec, None, ""


# --- peers run in their own processes (ANTs and itk-elastix each bundle ITK; mixing them in one
# process crashes), evaluated there on the same saved evaluation data -------------------------------
def save_case(case: Case, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(case.fixed.to_sitk(), str(folder / "fixed.nii.gz"))
    sitk.WriteImage(case.moving.to_sitk(), str(folder / "moving.nii.gz"))
    sitk.WriteImage(_resample_for_peers(case.fixed).to_sitk(), str(folder / "peer_fixed.nii.gz"))
    sitk.WriteImage(_resample_for_peers(case.moving).to_sitk(), str(folder / "peer_moving.nii.gz"))
    np.save(folder / "body.npy", case.body)
    meta = {"name": case.name, "kind": case.kind, "labels": list(case.labels),
            "fixed_modality": case.fixed.modality.value, "moving_modality": case.moving.modality.value}
    if case.kind == "points":
        np.save(folder / "points.npy", case.eval_points)
        np.save(folder / "truth.npy", case.truth_points)
    else:
        sitk.WriteImage(case.fixed_labels, str(folder / "fixed_labels.nii.gz"))
        sitk.WriteImage(case.moving_labels, str(folder / "moving_labels.nii.gz"))
        if case.eval_mask is not None:
            np.save(folder / "eval_mask.npy", case.eval_mask)
    (folder / "case.json").write_text(json.dumps(meta))


def load_case(folder: Path) -> tuple[Case, Volume, Volume]:
    meta = json.loads((folder / "case.json").read_text())
    rd = lambda n, mod: Volume.from_sitk(sitk.ReadImage(str(folder / n)), mod, name=n.split(".")[0])  # noqa: E731
    case = Case(meta["name"], rd("fixed.nii.gz", meta["fixed_modality"]), rd("moving.nii.gz", meta["moving_modality"]),
                meta["kind"], [], labels=tuple(meta["labels"]))
    case.body = np.load(folder / "body.npy")
    if case.kind == "points":
        case.eval_points, case.truth_points = np.load(folder / "points.npy"), np.load(folder / "truth.npy")
    else:
        case.fixed_labels = sitk.ReadImage(str(folder / "fixed_labels.nii.gz"))
        case.moving_labels = sitk.ReadImage(str(folder / "moving_labels.nii.gz"))
        if (folder / "eval_mask.npy").exists():
            case.eval_mask = np.load(folder / "eval_mask.npy")
    return case, rd("peer_fixed.nii.gz", meta["fixed_modality"]), rd("peer_moving.nii.gz", meta["moving_modality"])


def peer_method(method: str) -> tuple[str, bool]:
    """(method without the suffix, runs on native grids)."""
    return (method[: -len(NATIVE)], True) if method.endswith(NATIVE) else (method, False)


def worker(folder: str, method: str) -> int:
    """Run one peer method on a saved case; print its metrics as JSON (last stdout line)."""
    case, f, m = load_case(Path(folder))
    method, native = peer_method(method)
    if native:
        f, m = case.fixed, case.moving
    deformable = any(k in method for k in ("SyN", "B-spline"))
    with PeakMemory() as mem:
        if method.startswith("ANTs"):
            mapping, sec, reg, note = run_ants(case, method, f, m)
        else:
            mapping, sec, reg, note = run_elastix(case, method, f, m)
    ev = evaluate(case, mapping, deformable)
    print(json.dumps({"seconds": sec, "peak_mb": mem.mb, "note": note, **ev}))
    return 0


def run_peer_subprocess(folder: Path, method: str, timeout: float = 900.0) -> dict:
    import subprocess

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(folder), method],
                          capture_output=True, text=True, timeout=timeout, cwd=str(folder),  # elastix writes
                          env=dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="2"))  # files to the cwd
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(f"peer process failed (status {proc.returncode}): {tail[:120]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- main -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="SAM weights (.safetensors); default: the bundled model")
    ap.add_argument("--quick", action="store_true", help="fewer pairs (smoke run)")
    ap.add_argument("--no-peers", action="store_true", help="SAM rows only")
    ap.add_argument("--only", help="run only the pairs whose name contains this text")
    ap.add_argument("--json", help="also write all rows here")
    ap.add_argument("--torch-threads", type=int, default=2,
                    help="torch threads for SAM embedding and matching (default 2 = the peers' ITK threads; "
                         "1 is faster when other jobs share the cores)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE_DIR", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    torch.set_num_threads(args.torch_threads)
    print_machine_load()
    if not SHARED.is_dir():
        print(f"benchmark needs the real data in {SHARED}", file=sys.stderr)
        return 1
    t_all = time.perf_counter()
    cases = build_cases(args.quick)
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    sam = SamRunner(args.model)
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="samv2_regbench_"))
    for n_case, case in enumerate(cases):
        folder = tmp / f"case{n_case}"
        if not args.no_peers:
            save_case(case, folder)
        for method in case.methods:
            is_peer = not (method.startswith("SAM") or method == "initial")
            if args.no_peers and is_peer:
                continue
            row = Row(case.name, method)
            deformable = any(k in method for k in ("deformable", "coarse"))
            try:
                if is_peer:
                    ev = run_peer_subprocess(folder, method)
                    row.seconds, row.peak_mb, row.note = ev["seconds"], ev["peak_mb"], ev["note"]
                else:
                    with PeakMemory() as mem:
                        if method == "initial":
                            mapping, sec, reg, note = sitk_mapping(sitk.Transform(3, sitk.sitkIdentity)), None, \
                                None, "identity (scanner coordinates)"
                        else:
                            mapping, sec, reg, note = sam.run(case, method)
                    row.peak_mb = mem.mb if method != "initial" else None
                    row.seconds, row.reg_seconds, row.note = sec, reg, note
                    ev = evaluate(case, mapping, deformable)
                row.err_mean, row.err_p90 = ev.get("err_mean"), ev.get("err_p90")
                row.dice, row.fold = ev.get("dice"), ev.get("fold")
                row.extra = {k: v for k, v in ev.items() if k == "dice_per_label"}
            except Exception as exc:  # a refusal or a crash is a result too
                row.note = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            rows.append(row)
            print(f"[{time.perf_counter() - t_all:6.0f} s] {case.name} | {method}: "
                  f"err {fmt(row.err_mean)} dice {fmt(row.dice, 3)} time {fmt(row.seconds, 1)} {row.note}",
                  file=sys.stderr, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)

    head = ["pair", "method", "time s", "reg s", "peak MB", "err mean", "err p90", "Dice", "fold %", "notes"]
    table = [[r.case, r.method, fmt(r.seconds, 1), fmt(r.reg_seconds, 1), fmt(r.peak_mb, 0), fmt(r.err_mean),
              fmt(r.err_p90), fmt(r.dice, 3), fmt(r.fold, 3), r.note] for r in rows]
    print(f"\nRegistration benchmark - SAM model: {sam.label}" + ("" if sam.trained else "  (UNTRAINED: SAM rows are NOT meaningful)"))
    print("Simulated pairs: follow-ups made from a real CT with a known transform (exact point error, mm). "
          "Inter-patient: Dice of TotalSegmentator labels (model outputs).")
    print("Peers: ANTs defaults (Rigid/Affine/SyN, Mattes MI, SyN iterations 40x20x0, centre-of-mass init); "
          "elastix default affine map + centre-of-gravity init, B-spline map with 3 resolutions and 20 mm final grid; "
          "peer inputs resampled to >= 3 mm unless marked (native).")
    print("time = whole method (SAM: includes embedding both images, uncached); reg s = SAM stages after embedding; "
          "peak MB = peak RSS above baseline; fold % = det J <= 0 in the fixed body (complete map).")
    print("\n".join(fitted_table(head, table, markdown=False)))
    print(f"\ntotal benchmark time {time.perf_counter() - t_all:.0f} s; torch threads {torch.get_num_threads()}, "
          f"ITK threads {os.environ.get('ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS')}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
