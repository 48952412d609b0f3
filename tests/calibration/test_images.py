"""Calibration images: exactly the runtime's preprocessing, streamed, split by name."""

from __future__ import annotations

import numpy as np

from memexport.calibration.images import augmented_views, iter_batches, load_all, split_images
from memexport.runtime.preprocess import load_image, preprocess
from tests.models import TINY_PREPROCESS


def test_batches_equal_runtime_preprocessing(sample_images):
    batches = list(iter_batches(sample_images, TINY_PREPROCESS, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 2]
    stacked = np.concatenate(batches)
    for row, path in zip(stacked, sample_images):
        np.testing.assert_array_equal(row, preprocess(path, TINY_PREPROCESS))


def test_unreadable_images_are_skipped_and_reported(tmp_path, sample_images):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    skipped = []
    arrays = load_all([sample_images[0], bad, sample_images[1]], TINY_PREPROCESS, on_skip=skipped.append)
    assert len(arrays) == 2 and len(skipped) == 1 and skipped[0].path == str(bad)


def test_augmentation_adds_views_for_calibration_only(sample_images):
    image = load_image(sample_images[0])
    views = augmented_views(image, 3, seed=0)
    assert len(views) == 4 and views[0] is image
    assert views[2].size != image.size  # a crop
    assert sum(len(b) for b in iter_batches(sample_images[:2], TINY_PREPROCESS, 8, augment=3)) == 8


def test_split_is_disjoint_deterministic_and_by_name(sample_images, tmp_path):
    split = split_images(sample_images, held_out_fraction=0.25)
    assert len(split.held_out) == 2 and len(split.calibration) == 6
    assert not set(split.held_out) & set(split.calibration)
    assert set(split_images(list(reversed(sample_images)), 0.25).held_out) == set(split.held_out)
    # same names elsewhere split the same way
    moved = [tmp_path / p.name for p in sample_images]
    assert {p.name for p in split_images(moved, 0.25).held_out} == {p.name for p in split.held_out}
    assert split_images(sample_images, 0.0).held_out == ()
