"""Host-side augmentation and evaluation views of streamed datasets: where the crops are,
the scale range, random-resized-crop's boxes, and PCA lighting's distribution."""

import numpy as np
import pytest

from resnet_jax.data import augment

pytestmark = pytest.mark.grain  # resizing uses pillow


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Red = row, green = column: every pixel says where it came from."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)


def origin(view: np.ndarray) -> tuple[int, int, bool]:
    """(top, left, flipped) of a crop of a coordinate image, checked to be an exact window."""
    rows, cols = view[..., 0].astype(int), view[..., 1].astype(int)
    height, width = rows.shape
    flipped = width > 1 and cols[0, 0] > cols[0, 1]
    top, left = rows[0, 0], cols[0, -1] if flipped else cols[0, 0]
    expected_cols = left + np.arange(width)
    np.testing.assert_array_equal(rows, top + np.arange(height)[:, None] + 0 * cols)
    expected_cols = expected_cols[::-1] if flipped else expected_cols
    np.testing.assert_array_equal(cols, np.broadcast_to(expected_cols, cols.shape))
    return int(top), int(left), bool(flipped)


def test_the_ten_crops_are_the_corners_and_center_then_their_flips():
    # Shorter side already 36 = the resize: no interpolation, so crops are exact windows.
    image = coordinate_image(36, 48)
    crops = augment.ten_crops(image, resize=36, size=32)
    assert crops.shape == (10, 32, 32, 3)
    expected = [(0, 0), (0, 16), (4, 0), (4, 16), (2, 8)]
    assert [origin(c) for c in crops[:5]] == [(top, left, False) for top, left in expected]
    assert [origin(c) for c in crops[5:]] == [(top, left, True) for top, left in expected]
    assert origin(augment.center_crop(image, 36, 32)) == (2, 8, False)


def test_ten_crops_of_a_portrait_image_resize_its_width_to_the_resize():
    image = np.zeros((90, 60, 3), np.uint8)
    crops = augment.ten_crops(image, resize=36, size=32)
    assert crops.shape == (10, 32, 32, 3)
    assert augment.resize_shorter(image, 36).shape == (54, 36, 3)


def test_scale_augmentation_shorter_side_stays_in_range_and_crops_stay_inside():
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(4000):
        side, top, left, flip = augment.scale_crop_params(rng, 375, 500, (256, 480), 224)
        height, width = augment.shorter_side_shape(375, 500, side)
        assert min(height, width) == side
        assert 0 <= top <= height - 224 and 0 <= left <= width - 224
        sides.append(side)
    assert set(sides) == set(range(256, 481))  # every integer side, both ends included


def test_scale_crop_flip_returns_the_window_its_parameters_say():
    image = coordinate_image(36, 48)
    seen = set()
    for seed in range(200):
        view = augment.scale_crop_flip(np.random.default_rng(seed), image, (36, 36), 32)
        _, top, left, flip = augment.scale_crop_params(np.random.default_rng(seed), 36, 48, (36, 36), 32)
        assert origin(view) == (top, left, flip)
        seen.add((top, left, flip))
    assert {f for *_, f in seen} == {False, True}
    assert {top for top, _, _ in seen} == set(range(5)) and {left for _, left, _ in seen} == set(range(17))


def test_scale_crop_flip_resizes_before_cropping():
    # Shorter side 36 -> 72: the crop at (top, left) of the resized image shows the
    # original's coordinates halved.
    image = coordinate_image(36, 48)
    for seed in range(20):
        view = augment.scale_crop_flip(np.random.default_rng(seed), image, (72, 72), 32).astype(float)
        _, top, left, flip = augment.scale_crop_params(np.random.default_rng(seed), 36, 48, (72, 72), 32)
        if flip:
            view = view[:, ::-1]
        centers = (np.arange(32) + 0.5) / 2 - 0.5  # original coordinate of each resized pixel
        np.testing.assert_allclose(view[:, 0, 0], np.clip(top / 2 + centers, 0, 35), atol=1)
        np.testing.assert_allclose(view[0, :, 1], np.clip(left / 2 + centers, 0, 47), atol=1)


def test_random_resized_crop_boxes_have_the_area_and_ratio_ranges():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = augment.random_resized_crop_box(rng, 300, 400, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        areas.append(h * w / (300 * 400))
        ratios.append(w / h)
    assert 0.07 <= min(areas) < 0.15 and max(areas) <= 1.0
    assert min(ratios) >= 0.72 and max(ratios) <= 1.37  # 3/4 and 4/3, up to rounding to pixels


def test_random_resized_crop_falls_back_to_the_largest_centered_box_in_the_ratio_range():
    # Ratios of 10-20 never fit a square: the fallback is the full width, 1/10 as high.
    box = augment.random_resized_crop_box(np.random.default_rng(0), 100, 100, (0.5, 1.0), (10.0, 20.0))
    assert box == (45, 0, 10, 100)
    view = augment.random_resized_crop(np.random.default_rng(0), coordinate_image(100, 100), (0.5, 1.0),
                                       (10.0, 20.0), 16)
    assert view.shape == (16, 16, 3)
    assert 44 <= view[..., 0].min() and view[..., 0].max() <= 55  # rows of the centered band


def test_pca_lighting_has_mean_zero_and_the_documented_covariance():
    rng = np.random.default_rng(0)
    std, draws = 0.1, 50_000
    offsets = np.stack([augment.lighting_offset(rng, std) for _ in range(draws)]).astype(np.float64)
    vectors = augment.IMAGENET_EIGENVECTORS.astype(np.float64)
    values = augment.IMAGENET_EIGENVALUES.astype(np.float64)
    expected = std**2 * vectors @ np.diag(values**2) @ vectors.T
    # The offset along each eigenvector is alpha_i * lambda_i: std 0.1 * 0.2175 at most.
    np.testing.assert_allclose(offsets.mean(axis=0), 0, atol=4 * std * values[0] / np.sqrt(draws))
    np.testing.assert_allclose(np.cov(offsets.T), expected, rtol=0.05, atol=2e-7)
    projected = offsets @ vectors  # per eigen-direction: independent, std * lambda_i
    np.testing.assert_allclose(projected.std(axis=0), std * values, rtol=0.02)


def test_multi_scale_views_are_the_whole_image_and_its_flip_in_the_corner_of_its_canvas():
    image = coordinate_image(36, 48)  # 4:3 landscape
    views, valid = augment.multi_scale_views(image, (36, 40))
    assert [v.shape for v in views] == [(2, 36, 48, 3), (2, 40, 54, 3)]  # 54 = ceil(40 * 4/3)
    assert valid.tolist() == [[36, 48], [40, 53]]
    assert origin(views[0][0]) == (0, 0, False) and origin(views[0][1]) == (0, 0, True)  # all of it
    resized = augment.resize_shorter(image, 40)
    np.testing.assert_array_equal(views[1][0, :40, :53], resized)
    np.testing.assert_array_equal(views[1][1, :40, :53], resized[:, ::-1])
    assert not views[1][:, :, 53:].any()  # the rest of the canvas is zero


def test_a_portrait_image_gets_the_portrait_canvas_and_one_wider_than_2_to_1_is_cropped_to_it():
    views, valid = augment.multi_scale_views(coordinate_image(48, 36), (36,))
    assert views[0].shape == (2, 48, 36, 3) and valid.tolist() == [[48, 36]]
    views, valid = augment.multi_scale_views(coordinate_image(20, 70), (20,))
    assert views[0].shape == (2, 20, 40, 3) and valid.tolist() == [[20, 40]]
    assert origin(views[0][0]) == (0, 15, False)  # the center 2:1 of the 7:2 image


def test_every_image_shape_lands_on_one_of_seven_canvases_per_scale():
    rng = np.random.default_rng(0)
    shapes = [(50, 50), (375, 500), (500, 375), (40, 400)]
    shapes += [tuple(rng.integers(20, 200, 2)) for _ in range(60)]
    canvases = {224: set(), 256: set()}
    for height, width in shapes:
        views, valid = augment.multi_scale_views(np.zeros((height, width, 3), np.uint8), (224, 256))
        bucket = augment.multi_scale_bucket(height, width)
        for view, (resized_height, resized_width), side in zip(views, valid, (224, 256), strict=True):
            assert view.shape[1:3] == augment.multi_scale_canvas(bucket, side)
            assert min(resized_height, resized_width) == side  # the whole image, shorter side s
            canvases[side].add(view.shape[1:3])
    assert [len(c) for c in canvases.values()] == [len(augment.MULTI_SCALE_BUCKETS)] * 2 == [7, 7]
