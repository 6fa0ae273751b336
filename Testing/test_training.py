"""Training subpackage (samv2train): config validation, losses on real crops, resumable runs,
checkpoint integrity, bad data, export, and the CrossSAM loop on a simulated pair.

Runs a handful of iterations on tiny patches (16 x 32 x 32 voxels at 2 mm) of the committed
pyradiomics lung CT (SAMv2Core/samv2core/data), so the whole file stays well under three minutes on two
cores. Tests needing the TotalSegmentator label maps read ../shared/data and skip if absent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from samv2core.errors import CheckpointError, InputError

from repo_paths import SAMPLE_DATA as SAMPLE
from repo_paths import SHARED


def _shared() -> Path:
    return SHARED


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real-data test: {path} not available")
    return path


def tiny_config(tmp_path: Path, **over) -> dict:
    """A config dict for a few fast iterations on the committed lung CT."""
    cfg = {
        "run": {"name": "t", "output_dir": str(tmp_path / "runs"), "iterations": 4, "checkpoint_every": 2,
                "validate_every": 0, "seed": 3},
        "data": {"patch_size": [16, 32, 32], "batch_size": 1,
                 "volumes": [{"path": str(_need(SAMPLE / "lung1_ct.nrrd")), "modality": "CT"}]},
        "loss": {"fine_positives": 32, "fine_candidates": 256, "fine_hard_negatives": 32,
                 "fine_random_negatives": 32, "coarse_positives": 8},
        "optim": {"lr": 0.01, "warmup": 0},
        "runtime": {"num_threads": 1, "progress": False},
    }
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def make_cfg(tmp_path, **over):
    from samv2train.config import config_from_dict

    return config_from_dict(tiny_config(tmp_path, **over))


def quiet(_msg):
    pass


# --- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("section,key,value,needle", [
    ("optim", "lr", -0.1, "optim.lr"),
    ("optim", "lrr", 0.1, "lrr"),
    ("data", "patch_size", [30, 32, 32], "data.patch_size"),
    ("loss", "temperature", 0, "loss.temperature"),
    ("loss", "semantic_prob", 1.5, "loss.semantic_prob"),
    ("augment", "scale", [1.2, 0.8], "augment.scale"),
    ("run", "iterations", "many", "run.iterations"),
    ("model", "variant", "huge", "model.variant"),
])
def test_config_rejects_unknown_keys_and_impossible_values(tmp_path, section, key, value, needle):
    from samv2train.config import config_from_dict

    raw = tiny_config(tmp_path)
    raw.setdefault(section, {})[key] = value
    with pytest.raises(InputError, match=needle.replace(".", r"\.")):
        config_from_dict(raw)


def test_config_unknown_section_and_yaml_roundtrip(tmp_path):
    import yaml

    from samv2train.config import config_from_dict, load_config, save_config

    raw = tiny_config(tmp_path)
    raw["trainer"] = {}
    with pytest.raises(InputError, match="unknown section"):
        config_from_dict(raw)
    cfg = make_cfg(tmp_path)
    p = tmp_path / "c.yaml"
    save_config(cfg, p)
    again = load_config(p)
    assert again.identity_hash() == cfg.identity_hash()
    # run length and threads do not change the identity; the maths does
    raw = yaml.safe_load(p.read_text())
    raw["run"]["iterations"] = 99
    raw["runtime"]["num_threads"] = 1
    assert config_from_dict(raw).identity_hash() == cfg.identity_hash()
    raw["loss"]["temperature"] = 0.2
    assert config_from_dict(raw).identity_hash() != cfg.identity_hash()


# --- losses on real crops ------------------------------------------------------------------------
def test_a_few_iterations_on_a_real_crop_reduce_the_loss(tmp_path):
    """Repeating one fixed batch (two augmented views of the real CT) must lower the InfoNCE loss."""
    from samv2train.trainer import Trainer

    cfg = make_cfg(tmp_path, optim={"lr": 0.02, "warmup": 0, "schedule": "constant"})
    tr = Trainer(cfg, log=quiet)
    rng = np.random.default_rng(0)
    pairs, kind = tr._sample_batch(rng)
    losses = []
    for i in range(8):
        loss, comps = tr.compute_loss(pairs, np.random.default_rng(1))
        assert torch.isfinite(loss)
        assert {"fine", "coarse"} <= set(comps)
        tr.optimizer.zero_grad()
        loss.backward()
        tr.optimizer.step()
        losses.append(float(loss.detach()))
    assert min(losses[-3:]) < losses[0] - 0.05, losses


def test_view_pair_correspondence_is_exact():
    """The sampled voxel correspondence between two views matches the volume coordinates."""
    from samv2train.augment import extract_patch
    from samv2train.config import AugmentSection
    from samv2train.data import load_entry
    from samv2train.view_pairs import make_view_pair

    tv = load_entry({"path": str(_need(SAMPLE / "lung1_ct.nrrd")), "modality": "CT"}, 2.0)
    aug = AugmentSection(noise_std=0.0, blur_sigma=[0.0, 0.0], contrast=[1.0, 1.0])
    pair = make_view_pair(np.random.default_rng(5), tv, 0, (16, 32, 32), aug)
    # identity intensity augmentation: patch values equal the volume resampled through the view
    assert torch.allclose(pair.patch_a, extract_patch(tv.image, pair.view_a), atol=1e-3)
    p_a = np.array([[8.0, 16.0, 16.0], [3.0, 5.0, 20.0]])
    v = pair.view_a.to_volume(p_a)
    assert np.allclose(pair.view_b.to_volume(pair.a_to_b_patch(p_a)), v, atol=1e-6)


def _threshold_labels(tv):
    """A real, multi-class label map derived from the CT itself: lung, soft tissue, bone."""
    img = tv.image  # network range: HU -1024..3071 -> -50..205
    hu = (img + 50) / 255 * 4095 - 1024
    lab = torch.zeros_like(img, dtype=torch.long)
    lab[tv.body & (hu < -400)] = 1
    lab[tv.body & (hu >= -400) & (hu < 200)] = 2
    lab[tv.body & (hu >= 200)] = 3
    return lab


def test_prototype_supcon_handles_missing_classes_and_label_sets():
    from samv2train.config import LossSection
    from samv2train.losses import prototype_supcon

    cfg = LossSection(semantic_min_voxels=3)
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    feats = [torch.nn.functional.normalize(torch.randn(8, 4, 6, 6, generator=g), dim=0).requires_grad_(True)
             for _ in range(3)]
    n = 4 * 6 * 6
    lab_a = np.repeat([1, 2, 5], [50, 50, n - 100])  # classes 1, 2, 5 of set "ct"
    lab_b = np.repeat([0, 2], [n - 30, 30])  # class 1 and 5 missing; background ignored
    lab_c = np.repeat([7, 9], [n // 2, n - n // 2])  # a different label set entirely
    out = prototype_supcon(feats, [lab_a, lab_b, lab_c], ["ct", "ct", "mr"], cfg, rng)
    assert out is not None
    loss, info = out
    assert torch.isfinite(loss) and info["classes"] == 5  # {1, 2, 5} of "ct" + {7, 9} of "mr"
    loss.backward()
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in feats)
    # a single class present: nothing to contrast -> None (no crash, no NaN)
    assert prototype_supcon(feats[:1], [np.full(n, 4)], ["ct"], cfg, rng) is None
    # well separated classes give a lower loss than random embeddings
    sep = torch.zeros(8, 4, 6, 6)
    lab = np.repeat([1, 2, 3], [n // 3, n // 3, n - 2 * (n // 3)])
    for k, c in enumerate((1, 2, 3)):
        sep.view(8, -1)[k, lab == c] = 1.0
    good, _ = prototype_supcon([sep], [lab], ["s"], cfg, rng)
    bad, _ = prototype_supcon([feats[0].detach()], [lab], ["s"], cfg, rng)
    assert float(good) < float(bad)


def test_semantic_step_on_real_label_map(tmp_path):
    """Semantic-SAM step on a real label map (the TotalSegmentator example CT, 41 classes)."""
    from samv2train.trainer import Trainer

    data = _shared()
    img = _need(data / "ct" / "totalseg_example" / "ct_3mm_30slices.nii.gz")
    seg = _need(data / "ct" / "totalseg_example" / "seg_3mm_30slices.nii.gz")
    cfg = make_cfg(tmp_path, data={"volumes": [{"path": str(img), "labels": str(seg), "label_set": "ts"}],
                                   "patch_size": [16, 48, 48]},
                   loss={"semantic_prob": 1.0})
    tr = Trainer(cfg, log=quiet)
    assert tr.labelled == [0] and len(tr.volumes[0].classes()) > 20
    pairs, kind = tr._sample_batch(np.random.default_rng(2))
    assert kind == "semantic" and pairs[0].labels_a is not None
    loss, comps = tr.compute_loss(pairs, np.random.default_rng(0))
    assert torch.isfinite(loss) and np.isfinite(comps["semantic"])


# --- resumable runs --------------------------------------------------------------------------------
def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}


def test_killed_run_resumes_exactly_from_its_checkpoint(tmp_path):
    from samv2train.trainer import Trainer, train

    straight = train(make_cfg(tmp_path / "a"), log=quiet)
    assert straight.state.step == 4
    # "kill" after 3 steps: the last checkpoint is step 2, step 3 is lost
    cfg_b = make_cfg(tmp_path / "b")
    killed = Trainer(cfg_b, log=quiet)
    killed.fit(stop_after=3)
    assert killed.state.step == 3
    resumed = Trainer(cfg_b, resume=True, log=quiet)
    assert resumed.state.step == 2  # continues from the checkpoint step
    resumed.fit()
    assert resumed.state.step == 4
    wa, wb = _weights(straight), _weights(resumed)
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k
    rows = (cfg_b.run_dir / "loss_log.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4]
    assert (cfg_b.run_dir / "loss_curves.png").is_file()


def test_corrupt_checkpoint_is_never_used(tmp_path):
    from samv2train import checkpoint as ck
    from samv2train.trainer import Trainer, train

    cfg = make_cfg(tmp_path)
    train(cfg, log=quiet)
    ckpts = ck.list_checkpoints(cfg.run_dir / "checkpoints")
    assert [s for s, _ in ckpts] == [4, 2]
    newest = ckpts[0][1]
    newest.write_bytes(newest.read_bytes()[: 1000])  # truncated by a crash / disk problem
    with pytest.raises(CheckpointError, match="checksum"):
        ck.load_checked(newest)
    msgs = []
    tr = Trainer(cfg, resume=True, log=msgs.append)
    assert tr.state.step == 2
    assert any("skipping checkpoint" in m for m in msgs)


def test_resume_refuses_a_run_from_a_different_config(tmp_path):
    from samv2train.cli import main
    from samv2train.trainer import Trainer

    cfg = make_cfg(tmp_path, run={"iterations": 2})
    Trainer(cfg, log=quiet).fit()
    other = make_cfg(tmp_path, loss={"temperature": 0.1})
    with pytest.raises(InputError, match="different config"):
        Trainer(other, resume=True, log=quiet)
    # starting a fresh run on top of an existing one is refused too
    with pytest.raises(InputError, match="already holds a run"):
        Trainer(cfg, log=quiet)
    import yaml

    p = tmp_path / "other.yaml"
    p.write_text(yaml.safe_dump(tiny_config(tmp_path, loss={"temperature": 0.1})))
    assert main(["--resume", str(cfg.run_dir), "--config", str(p)]) == 2


# --- bad data ------------------------------------------------------------------------------------
def test_label_map_on_a_different_grid_is_rejected_before_training(tmp_path):
    from samv2train.trainer import Trainer

    cfg = make_cfg(tmp_path, data={"volumes": [{"path": str(_need(SAMPLE / "lung2_ct.nrrd")),
                                                "labels": str(_need(SAMPLE / "lung1_tumor_label.nrrd"))}]})
    with pytest.raises(InputError, match="does not match its image"):
        Trainer(cfg, log=quiet)
    assert not list((cfg.run_dir / "checkpoints").glob("*.pt")) if (cfg.run_dir / "checkpoints").exists() else True


def test_unreadable_and_non_3d_files_are_rejected(tmp_path):
    from samv2train.data import list_entries, load_dataset

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "broken.nii.gz").write_bytes(b"not an image at all")
    cfg = make_cfg(tmp_path, data={"volumes": [], "folders": [str(folder)]})
    assert len(list_entries(cfg.data)) == 1
    with pytest.raises(InputError, match="broken"):
        load_dataset(cfg.data, log=quiet)
    (folder / "broken.nii.gz").unlink()
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(folder / "flat2d.nii.gz"))
    with pytest.raises(InputError, match="3D"):
        load_dataset(cfg.data, log=quiet)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no image files"):
        list_entries(make_cfg(tmp_path, data={"volumes": [], "folders": [str(empty)]}).data)


# --- export ----------------------------------------------------------------------------------------
def test_export_gives_a_model_io_file_with_the_same_embeddings(tmp_path):
    from samv2core.model_io import load_model
    from samv2train.export import export_run, load_run_model
    from samv2train.trainer import train

    cfg = make_cfg(tmp_path, run={"iterations": 2, "validate_every": 2})
    train(cfg, log=quiet)
    out = export_run(cfg.run_dir, tmp_path / "m.safetensors", which="best")
    loaded = load_model(out, device="cpu")
    assert loaded.card.training["exported_step"] == 2 and loaded.card.modality == "CT"
    net, _ = load_run_model(cfg.run_dir, "best")
    x = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0)) * 50
    with torch.no_grad():
        a, b = net(x), loaded.model(x)
    for k in a:  # fp16 storage: close, not identical
        assert torch.nn.functional.cosine_similarity(a[k], b[k], dim=1).min() > 0.99


# --- CrossSAM ----------------------------------------------------------------------------------------
def test_crosssam_loop_on_a_pair_simulated_from_a_real_ct(tmp_path):
    """The register-then-learn loop on a SIMULATED CT/MR-like pair: the real lung CT and a copy
    with known motion, MR-like contrast and a smaller field of view (no real same-subject
    CT-MRI pair is available). Checks: one registration per round saved, the overlap margin
    shrinks, registered-pair steps produce finite losses, and a resume reuses the saved round."""
    from samv2core.simulate import simulate_followup
    from samv2core.volume import load_volume
    from samv2train.config import config_from_dict
    from samv2train.crosssam import PairRegistration, run_crosssam

    ct = load_volume(_need(SAMPLE / "lung1_ct.nrrd"), "CT")
    sim = simulate_followup(ct, seed=1, mr=True, crop_fraction=0.6)
    mr_path = tmp_path / "mr_like.nrrd"
    sitk.WriteImage(sim.followup.to_sitk(), str(mr_path))
    raw = tiny_config(tmp_path)
    raw["data"]["volumes"] = []
    raw["augment"] = {"profile": "crosssam"}
    raw["crosssam"] = {"enabled": True, "rounds": 2, "iterations_per_round": 2, "margins_mm": [30, 10],
                       "pair_prob": 1.0, "deformable": False, "fov_negatives": 16,
                       "pairs": [{"fixed": {"path": str(SAMPLE / "lung1_ct.nrrd"), "modality": "CT"},
                                  "moving": {"path": str(mr_path), "modality": "MR"}}]}
    cfg = config_from_dict(raw)
    msgs = []
    tr = run_crosssam(cfg, log=msgs.append)
    assert tr.state.step == 4
    regs = [PairRegistration.load(cfg.run_dir / "crosssam" / f"round_{r:02d}_pair_00.npz") for r in range(2)]
    size = [np.prod(r.box_hi - r.box_lo) for r in regs]
    assert size[1] <= size[0]  # the margin shrinks from 30 to 10 mm
    rows = (cfg.run_dir / "loss_log.csv").read_text().strip().splitlines()[1:]
    pair_losses = [float(r.split(",")[8]) for r in rows if r.split(",")[8]]
    assert pair_losses and all(np.isfinite(pair_losses))
    # the registration is measured against the simulation's ground truth (reported, not a target:
    # an untrained network aligns poorly, which is exactly what the iterations are for)
    pts = ct.index_to_lps(np.array([[70, 70, 24], [50, 60, 20], [90, 80, 28]], float))
    err = np.linalg.norm(regs[-1].map(pts) - sim.map_points(pts), axis=1)
    assert np.all(np.isfinite(err))
    # resuming after the loop reuses the saved registrations (no new registration happens)
    msgs.clear()
    run_crosssam(config_from_dict(raw), resume=True, log=msgs.append)
    assert not any("registering pair" in m for m in msgs)


def test_bf16_and_the_optional_companion_losses_run(tmp_path):
    """bf16 autocast on CPU, the Adam/Eden false-negative pruner and Alice cross-volume
    positives (all off by default) give finite losses on two real CTs of different patients."""
    from samv2train.trainer import Trainer

    vols = [{"path": str(_need(SAMPLE / n)), "modality": "CT"} for n in ("lung1_ct.nrrd", "lung2_ct.nrrd")]
    cfg = make_cfg(tmp_path, data={"volumes": vols, "batch_size": 2},
                   loss={"prune_false_negatives": True, "prune_threshold": 0.5, "alice_cross_volume": True,
                         "alice_min_score": -1.0},
                   runtime={"bf16": True})
    tr = Trainer(cfg, log=quiet)
    for seed in range(4):
        pairs, _ = tr._sample_batch(np.random.default_rng(seed))
        if len({p.volume_index for p in pairs}) == 2:
            break
    loss, comps = tr.compute_loss(pairs, np.random.default_rng(0))
    assert torch.isfinite(loss) and "alice" in comps and np.isfinite(comps["fine"])
    loss.backward()


def test_corrupt_newer_checkpoints_never_prune_valid_ones_and_restart_is_explicit(tmp_path):
    """Issue 13: corrupt higher-numbered checkpoints do not count as the newest when pruning;
    a resume with no valid checkpoint is refused unless --restart; the loss log never holds a
    step twice."""
    from samv2train import checkpoint as ck
    from samv2train.cli import main
    from samv2train.trainer import Trainer, train

    cfg = make_cfg(tmp_path, run={"keep_checkpoints": 1})
    train(cfg, log=quiet)  # steps 1-4, checkpoint kept: 4
    ckdir = cfg.run_dir / "checkpoints"
    for step in (10, 12):  # corrupt "newer" files, e.g. from a damaged copy
        ck.checkpoint_path(ckdir, step).write_bytes(b"corrupt")
        ck.checkpoint_path(ckdir, step).with_name(f"step_{step:08d}.pt.sha256").write_text("0" * 64 + "\n")
    cfg6 = make_cfg(tmp_path, run={"keep_checkpoints": 1, "iterations": 6})
    tr = Trainer(cfg6, resume=True, log=quiet)
    assert tr.state.step == 4
    tr.fit()
    steps = [s for s, _ in ck.list_checkpoints(ckdir)]
    assert 6 in steps and 4 not in steps and {10, 12} <= set(steps)  # the valid 6 kept, the corrupt left alone
    assert ck.is_valid(ck.checkpoint_path(ckdir, 6))

    for _, p in ck.list_checkpoints(ckdir):  # now nothing is valid
        p.write_bytes(b"broken")
    run_dir = str(cfg6.run_dir)
    assert main(["--resume", run_dir, "--no-progress"]) == 2
    assert main(["--resume", run_dir, "--restart", "--no-progress"]) == 0
    rows = (cfg6.run_dir / "loss_log.csv").read_text().strip().splitlines()[1:]
    logged = [int(r.split(",")[0]) for r in rows]
    assert logged == sorted(set(logged)) and logged[-1] == 6
    assert sorted(p.name for p in ckdir.glob("*.corrupt"))  # set aside, not deleted
    assert all(ck.is_valid(p) for _, p in ck.list_checkpoints(ckdir))
