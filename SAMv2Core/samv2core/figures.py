"""Pictures of matches and registrations (PNG, matplotlib; the optional ``figures`` extra).

Every slice is sampled on a patient-aligned (LPS) grid through a physical point with SimpleITK's
resampler, so a scan with any direction matrix (oblique, flipped, permuted) displays the same way.
Display follows the radiological convention, as 3D Slicer shows it:

* axial: patient right on the image left, anterior at the top;
* coronal: patient right on the image left, superior at the top;
* sagittal: anterior on the image left, superior at the top.

Every panel carries the patient-direction letters (R/L/A/P/S/I) on its edges and a millimetre
scale bar. matplotlib is imported lazily so the core never needs it; a missing matplotlib is
reported as a one-line error naming the extra to install.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import SAMv2Error
from .outputs import atomic_write
from .volume import Modality, Volume

# Screen axes of each plane, in LPS: (column direction, row direction, slice normal) and the
# letters at (left, right, top, bottom). Columns run left->right, rows top->bottom.
PLANES = {
    "axial": ((1, 0, 0), (0, 1, 0), (0, 0, 1), ("R", "L", "A", "P")),
    "coronal": ((1, 0, 0), (0, 0, -1), (0, 1, 0), ("R", "L", "S", "I")),
    "sagittal": ((0, 1, 0), (0, 0, -1), (1, 0, 0), ("A", "P", "S", "I")),
}


@dataclass(frozen=True)
class PlaneImage:
    """A 2D slice sampled on an LPS-aligned grid: pixels (rows, cols) and where they are."""

    pixels: np.ndarray  # (rows, cols) float32
    plane: str
    center_lps: np.ndarray  # the physical point at the image centre
    pixel_mm: float
    half_mm: float  # half the field of view (square)

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """matplotlib extent (left, right, bottom, top) in mm relative to the centre."""
        h = self.half_mm
        return (-h, h, h, -h)

    def to_screen(self, lps) -> tuple[float, float, float]:
        """LPS point -> (column mm, row mm, out-of-plane distance mm) relative to the centre."""
        col, row, normal, _ = PLANES[self.plane]
        d = np.asarray(lps, float) - self.center_lps
        return float(d @ np.array(col, float)), float(d @ np.array(row, float)), float(d @ np.array(normal, float))


def sample_plane(volume: Volume, center_lps, plane: str = "axial", half_mm: float = 80.0,
                 pixel_mm: float = 0.5, fill: float | None = None) -> PlaneImage:
    """The slice of ``volume`` through ``center_lps`` in ``plane``, on an LPS-aligned square grid."""
    if plane not in PLANES:
        raise SAMv2Error(f"unknown plane {plane!r}: use one of {', '.join(PLANES)}")
    col, row, normal = (np.array(a, float) for a in PLANES[plane][:3])
    n = round(2 * half_mm / pixel_mm) + 1
    center = np.asarray(center_lps, float)
    origin = center - half_mm * col - half_mm * row
    direction = np.column_stack([col, row, normal])
    fill = float(volume.array.min()) if fill is None else fill
    out = sitk.Resample(volume.to_sitk(), (n, n, 1), sitk.Transform(), sitk.sitkLinear, tuple(origin),
                        (pixel_mm, pixel_mm, pixel_mm), tuple(direction.ravel()), fill, sitk.sitkFloat32)
    return PlaneImage(sitk.GetArrayFromImage(out)[0], plane, center, pixel_mm, half_mm)


def display_window(volume: Volume) -> tuple[float, float]:
    """Grey-level window: a chest-friendly CT window, MR percentiles."""
    if volume.modality == Modality.CT:
        return -1000.0, 400.0
    sample = volume.array.ravel()[:: max(1, volume.array.size // 200000)]
    lo, hi = np.percentile(sample, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional extra
        from matplotlib.figure import Figure  # noqa: PLC0415 - optional extra
    except ImportError:
        raise SAMv2Error("pictures need matplotlib: pip install 'samv2core[figures]'") from None
    return Figure, FigureCanvasAgg


def figures_available() -> bool:
    try:
        _matplotlib()
    except SAMv2Error:
        return False
    return True


def _scale_bar_mm(half_mm: float) -> float:
    target = half_mm * 0.4
    return float(max(v for v in (5, 10, 20, 25, 50, 100, 200) if v <= max(target, 5)))


def decorate(ax, letters: tuple[str, str, str, str], x_range, y_range) -> None:
    """Orientation letters (left, right, top, bottom) on the edges and a mm scale bar at the lower right.

    ``x_range`` = (left, right) and ``y_range`` = (bottom, top) of the axes in mm (data units).
    """
    left, right, top, bottom = letters
    style = {"color": "yellow", "fontsize": 11, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    width, height = x_range[1] - x_range[0], y_range[1] - y_range[0]  # height < 0 when rows point down
    bar = _scale_bar_mm(0.5 * abs(width))
    x1, y = x_range[1] - 0.06 * width, y_range[0] + 0.08 * height
    ax.plot([x1 - bar, x1], [y, y], color="white", lw=3, solid_capstyle="butt")
    ax.text(x1 - bar / 2, y + 0.015 * height, f"{bar:g} mm", color="white", fontsize=8, ha="center", va="bottom")
    ax.set_xlim(*x_range)
    ax.set_ylim(*y_range)
    ax.set_xticks([])
    ax.set_yticks([])


def decorate_plane(ax, img: PlaneImage) -> None:
    h = img.half_mm
    decorate(ax, PLANES[img.plane][3], (-h, h), (h, -h))


def show_plane(ax, img: PlaneImage, window: tuple[float, float], title: str = "") -> None:
    ax.imshow(img.pixels, cmap="gray", vmin=window[0], vmax=window[1], extent=img.extent, interpolation="bilinear")
    decorate_plane(ax, img)
    if title:
        ax.set_title(title, fontsize=9)


def mark(ax, img: PlaneImage, lps, color: str, marker: str = "+", label: str = "", size: float = 16) -> None:
    """Mark an LPS point; a point off this slice is drawn hollow with its distance."""
    x, y, off = img.to_screen(lps)
    near = abs(off) <= 2 * img.pixel_mm + 1.0
    ax.plot([x], [y], marker=marker, markersize=size, mew=2, color=color, fillstyle="full" if near else "none",
            linestyle="none")
    if label:
        text = label if near else f"{label} ({off:+.0f} mm off-slice)"
        ax.annotate(text, (x, y), xytext=(8, -8), textcoords="offset points", color=color, fontsize=8)


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG atomically (samv2core.outputs: a temporary name, then a rename)."""
    _, FigureCanvasAgg = _matplotlib()
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi,
                                                       facecolor=fig.get_facecolor()))


@dataclass(frozen=True)
class MatchPicture:
    """What one match picture shows (points in LPS mm)."""

    label: str
    template_point: np.ndarray
    query_point: np.ndarray
    score: float
    confident: bool
    reason: str | None = None
    truth_point: np.ndarray | None = None  # known answer on simulated follow-ups


def pictures_from_matches(labels: Sequence[str], results, truth_lps=None) -> list[MatchPicture]:
    """MatchPictures from ``matching.MatchResult``s (and known answers on simulated follow-ups)."""
    return [MatchPicture(label, np.asarray(r.template_point.to("LPS").xyz, float),
                         np.asarray(r.query_point.to("LPS").xyz, float), float(r.score), bool(r.confident),
                         r.reason, None if truth_lps is None else np.asarray(truth_lps[n], float))
            for n, (label, r) in enumerate(zip(labels, results))]


def display_name(volume: Volume) -> str:
    """The name a user knows an image by: its file's name, not the internal volume name."""
    source = volume.meta.get("source")
    if source:
        return Path(str(source)).name.encode("utf-8", "replace").decode("utf-8")
    name = volume.name or "image"
    return name.removesuffix("_registered").replace("_", " ")


def _status(p: MatchPicture) -> str:
    return "confident" if p.confident else f"NOT CONFIDENT\n{p.reason or 'below threshold'}"


def match_figure(template: Volume, query: Volume, pic: MatchPicture, path, planes=("axial", "coronal"),
                 half_mm: float = 60.0):
    """One PNG: baseline slices through the point (left) and follow-up slices through the match (right)."""
    Figure, _ = _matplotlib()
    fig = Figure(figsize=(7.2, 3.6 * len(planes) + 0.5), dpi=90, facecolor="black")
    axes = fig.subplots(len(planes), 2, squeeze=False)
    tw, qw = display_window(template), display_window(query)
    match_color = "lime" if pic.confident else "red"
    for r, plane in enumerate(planes):
        ti = sample_plane(template, pic.template_point, plane, half_mm)
        qi = sample_plane(query, pic.query_point, plane, half_mm)
        show_plane(axes[r, 0], ti, tw, f"baseline: {display_name(template)} - {plane}")
        show_plane(axes[r, 1], qi, qw, f"follow-up: {display_name(query)} - {plane}")
        mark(axes[r, 0], ti, pic.template_point, "cyan", "+", pic.label)
        if pic.truth_point is not None:
            mark(axes[r, 1], qi, pic.truth_point, "deepskyblue", "o", "", size=12)
        mark(axes[r, 1], qi, pic.query_point, match_color, "+" if pic.confident else "x", "match")
        for ax in axes[r]:
            ax.title.set_color("white")
    err = ""
    if pic.truth_point is not None:
        err = f", error {np.linalg.norm(np.asarray(pic.query_point) - np.asarray(pic.truth_point)):.1f} mm (blue o = truth)"
    fig.suptitle(f"{pic.label}: score {pic.score:.3f}{err}, {_status(pic)}", color="white" if pic.confident
                 else "red", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.88 if len(planes) == 2 else 0.80,
                        wspace=0.03, hspace=0.12)
    return save_figure(fig, path)


def _projection(volume: Volume, spacing: float = 2.0) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Mean-intensity projection along the anterior-posterior axis on an LPS-aligned grid (coronal view)."""
    corners = volume.corners_lps()
    lo, hi = corners.min(0), corners.max(0)
    size = [int(np.ceil((h - l) / spacing)) + 1 for l, h in zip(lo, hi)]
    img = sitk.Resample(volume.to_sitk(), size, sitk.Transform(), sitk.sitkLinear, tuple(lo), (spacing,) * 3,
                        (1, 0, 0, 0, 1, 0, 0, 0, 1), float(volume.array.min()), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    proj = arr.mean(axis=1)[::-1]  # rows: superior at the top; columns: patient right on the left
    extent = (lo[0], hi[0], lo[2], hi[2])  # (left, right, bottom, top) in L and S mm
    return proj, extent


def overview_figure(template: Volume, query: Volume, pics: Sequence[MatchPicture], path):
    """All points on coronal mean-intensity projections: baseline points left, matches right."""
    Figure, _ = _matplotlib()
    projections = [_projection(template), _projection(query)]
    aspect = max((e[3] - e[2]) / (e[1] - e[0]) for _, e in projections)
    fig = Figure(figsize=(9.0, 4.5 * aspect + 0.8), dpi=90, facecolor="black")
    axes = fig.subplots(1, 2)
    for ax, (proj, ext), vol, which in zip(axes, projections, (template, query), ("baseline", "follow-up")):
        lo, hi = np.percentile(proj, [1, 99.5])
        ax.imshow(proj, cmap="gray", vmin=lo, vmax=hi, extent=ext, interpolation="bilinear")
        for p in pics:
            pt = p.template_point if which == "baseline" else p.query_point
            color = "cyan" if which == "baseline" else ("lime" if p.confident else "red")
            ax.plot([pt[0]], [pt[2]], marker="+" if which == "baseline" or p.confident else "x", markersize=12,
                    mew=2, color=color, linestyle="none", clip_on=False)
            # labels point inwards and stay on the picture, even for a point near or past an edge
            x = min(max(pt[0], ext[0]), ext[1])
            z = min(max(pt[2], ext[2]), ext[3])
            right = x > (ext[0] + ext[1]) / 2
            top = z > ext[3] - 0.1 * (ext[3] - ext[2])
            ax.annotate(p.label, (x, z), xytext=(-6 if right else 6, -6 if top else 4), textcoords="offset points",
                        ha="right" if right else "left", va="top" if top else "bottom", color=color, fontsize=8,
                        annotation_clip=False)
        ax.set_aspect("equal")
        decorate(ax, PLANES["coronal"][3], (ext[0], ext[1]), (ext[2], ext[3]))
        ax.set_title(f"{which}: {display_name(vol)} (coronal projection)", color="white", fontsize=9)
    n_bad = sum(not p.confident for p in pics)
    fig.suptitle(f"{len(pics)} points: cyan + placed on the baseline, green + confident match, "
                 f"red x not confident ({n_bad})", color="white", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.86, wspace=0.12)
    return save_figure(fig, path)


def write_match_figures(out_dir, template: Volume, query: Volume, pics: Sequence[MatchPicture]) -> list[Path]:
    """One PNG per point (``NN_<label>.png``) and ``overview.png`` in ``out_dir``; returns the paths."""
    out = Path(out_dir)
    paths = []
    for n, p in enumerate(pics):
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in p.label) or f"point{n + 1}"
        paths.append(match_figure(template, query, p, out / f"{n + 1:02d}_{safe}.png"))
    paths.append(overview_figure(template, query, pics, out / "overview.png"))
    return paths


def fusion(fixed: np.ndarray, moving: np.ndarray, fixed_window, moving_window) -> np.ndarray:
    """Colour fusion: fixed in magenta, moving in green; grey where they agree."""
    f = np.clip((fixed - fixed_window[0]) / (fixed_window[1] - fixed_window[0]), 0, 1)
    m = np.clip((moving - moving_window[0]) / (moving_window[1] - moving_window[0]), 0, 1)
    return np.stack([f, m, f], axis=-1)


def fusion_panels(fixed: Volume, moving: Volume, moving_registered: Volume, center_lps=None,
                  half_mm: float | None = None) -> dict:
    """{(stage, plane): (rgb, PlaneImage of the fixed image)} for stage "before"/"after" and the three planes.

    "before" is the moving image where its scanner coordinates put it; "after" the moving image
    resampled onto the fixed grid through the registration. All slices go through one point
    (default: the centre of the fixed image).
    """
    corners = fixed.corners_lps()
    center = corners.mean(0) if center_lps is None else np.asarray(center_lps, float)
    half = float(half_mm or min(0.5 * (corners.max(0) - corners.min(0)).max(), 180.0))
    px = max(half / 200.0, 0.5)
    fw, mw = display_window(fixed), display_window(moving)
    panels = {}
    for plane in ("axial", "coronal", "sagittal"):
        fi = sample_plane(fixed, center, plane, half, px)
        for stage, mov in (("before", moving), ("after", moving_registered)):
            mi = sample_plane(mov, center, plane, half, px)
            panels[stage, plane] = (fusion(fi.pixels, mi.pixels, fw, mw), fi)
    return panels


def registration_figure(fixed: Volume, moving: Volume, moving_registered: Volume, path, center_lps=None,
                        half_mm: float | None = None):
    """Before/after colour fusion (fixed magenta, moving green) in the three planes: one PNG."""
    Figure, _ = _matplotlib()
    panels = fusion_panels(fixed, moving, moving_registered, center_lps, half_mm)
    fig = Figure(figsize=(10.2, 7.4), dpi=80, facecolor="black")
    axes = fig.subplots(2, 3)
    titles = {"before": "before (scanner coordinates)", "after": "after registration"}
    for (stage, plane), (rgb, fi) in panels.items():
        ax = axes[0 if stage == "before" else 1, ("axial", "coronal", "sagittal").index(plane)]
        ax.imshow(rgb, extent=fi.extent, interpolation="bilinear")
        decorate_plane(ax, fi)
        ax.set_title(f"{titles[stage]} - {plane}", color="white", fontsize=9)
    fig.suptitle(f"fixed {display_name(fixed)} (magenta) + moving {display_name(moving)} (green); grey/white where "
                 "they agree",
                 color="white", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.91, wspace=0.03, hspace=0.1)
    return save_figure(fig, path)
