"""The opt-in skipping of every other thin slice on real CT (lits117, 1 mm slices) with the bundled model: the
liver from one box on its largest slice, every other slice interpolated. And that the accuracy tests' model (OpenVINO
fp32, its encoder memo) gives plain PyTorch's masks and the encoder's own embeddings."""

from __future__ import annotations

import numpy as np

from conftest import box_of, dice
from liversam.pipeline import PipelineSettings, segment_volume
from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import OrganTrackSettings


def test_skipping_predicts_about_half_the_slices_and_keeps_the_liver(
    lits117_openvino_predictor, lits117_label
):
    """On lits117's slices 28..89 (62 of its 128 1 mm slices, the liver on each; its largest slice, 33, the seed):
    the slices test_review_and_lesions.py segments too, so the session model's encoder memo has them. Measured:
    30 of 62 slices interpolated, Dice 0.955 (every slice predicted: 0.951); on the whole scan (before session 40)
    63 of 128, 0.951 (0.953)."""
    from liversam.evaluate import crop_slices
    from liversam.predictor import SlicePredictor

    volume, label, _ = crop_slices(lits117_openvino_predictor.volume, lits117_label, (28, 90))
    predictor = SlicePredictor(lits117_openvino_predictor.model, volume, cache_mb=2048)
    liver = label > 0
    k = int(liver.sum(axis=(1, 2)).argmax())
    assert k + 28 == int((lits117_label > 0).sum(axis=(1, 2)).argmax())  # the scan's largest liver slice
    seg = SegmentPrompts("liver", 1, slices={k: SlicePrompts(boxes_ij=[box_of(liver[k])])}, propagate=True)
    settings = PipelineSettings(organ_track=OrganTrackSettings(skip_max_thickness_mm=2.0))
    result = segment_volume(volume, [seg], predictor, settings)
    (track,) = result.provenance["propagation"]["liver"].tracks
    sources = [record.source for record in track.records.values()]
    mask = result.segment("liver").mask_kji
    score = dice(mask, liver)
    print(
        f"liver Dice {score:.3f} with {sources.count('interpolated')} of {len(sources)} slices interpolated"
    )
    assert len(sources) == volume.num_slices and len(set(predictor.encoded_slices)) <= 0.6 * len(sources)
    assert sources.count("interpolated") >= 0.4 * len(sources)  # measured 30 of 62
    assert score >= 0.94  # measured 0.955 (every slice predicted: 0.951)
    liver_slices = liver.any(axis=(1, 2)).nonzero()[0]
    present = mask.any(axis=(1, 2)).nonzero()[0]
    assert (
        abs(int(present[0]) - int(liver_slices[0])) <= 3
        and abs(int(present[-1]) - int(liver_slices[-1])) <= 3
    )


def test_the_accuracy_tests_model_gives_plain_pytorchs_masks(
    lits117_predictor, lits117_openvino_predictor, lits117_label
):
    """The slow accuracy tests run on ``lits117_openvino_predictor`` (OpenVINO fp32, about five times faster):
    their figures stand for plain PyTorch's only while its masks are PyTorch's. Liver boxes on the largest slice
    and near the inferior tip, and a tumour box, from the label. Measured: every figure of those tests identical
    to plain PyTorch's (session 33)."""
    liver = lits117_label > 0
    areas = liver.sum(axis=(1, 2))
    largest = int(areas.argmax())
    tip = int(np.flatnonzero(areas)[5])
    tumour = lits117_label == 2
    tumour_k = int(tumour.sum(axis=(1, 2)).argmax())
    for k, structure in ((largest, liver), (tip, liver), (tumour_k, tumour)):
        prompts = SlicePrompts(boxes_ij=[box_of(structure[k])])
        plain = lits117_predictor.predict(k, prompts).mask_ji
        fast = lits117_openvino_predictor.predict(k, prompts).mask_ji
        assert plain.sum() > 0 and dice(fast, plain) >= 0.995, (k, dice(fast, plain))
    assert (
        lits117_openvino_predictor.model.encoder_override is not None
    )  # not the plain model under another name


def test_the_encoder_memo_returns_exactly_what_the_encoder_returns(lits117_openvino_predictor):
    """The accuracy tests' model serves a slice input it encoded before from a memo (conftest.ExactEncoderMemo):
    exact only while its OpenVINO encoder is deterministic. A real slice: the memo's answer and the encoder's own,
    encoded again, are the same bytes; a caller changing its copy does not change what the memo serves next."""
    import torch

    from conftest import ExactEncoderMemo

    memo = lits117_openvino_predictor.model.encoder_override
    assert isinstance(memo, ExactEncoderMemo)
    images = lits117_openvino_predictor.model_input(64)
    served = memo(images)  # encoded now, or served from an earlier test's encode
    encoded = memo.encoder(images)  # the encoder itself, again
    assert torch.equal(served, encoded) and encoded.abs().sum() > 0
    hits = memo.hits
    again = memo(images)
    assert memo.hits == hits + 1 and torch.equal(again, encoded)
    again += 1.0
    assert torch.equal(memo(images), encoded)
    assert memo.key(lits117_openvino_predictor.model_input(65)) != memo.key(images)
