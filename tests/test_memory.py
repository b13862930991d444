"""On-device batches: which examples each step draws, the augmentation, eval padding."""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.data import memory
from resnet_jax.data.augment import normalization_stats, normalize, pad_crop_flip
from resnet_jax.data.sources import Split
from resnet_jax.parallel import data_parallel


def numbered_split(count=20, side=6):
    """Image i is filled with the value i, so a batch's images tell their indices."""
    images = np.broadcast_to(np.arange(count, dtype=np.uint8)[:, None, None, None], (count, side, side, 1))
    return Split(np.ascontiguousarray(images), np.arange(count, dtype=np.int32) % 10, 10)


def device_data(split):
    # mean 0 and std 1/255: normalised values are the raw pixel values.
    mean, std = np.zeros((1,), np.float32), np.full((1,), 1 / 255, np.float32)
    return memory.put_on_devices(split, mean, std, data_parallel().replicated)


def drawn_indices(data, step, key, batch_size):
    images, labels = memory.train_batch(data, jnp.int32(step), key, batch_size, "none", 0)
    indices = np.asarray(images[:, 0, 0, 0]).round().astype(int)
    np.testing.assert_array_equal(np.asarray(labels), indices % 10)
    return indices


def test_each_epoch_is_a_permutation_without_repeats():
    data, key = device_data(numbered_split(20)), jax.random.key(0)
    # 20 examples, batch 6: 3 steps per epoch, the last 2 examples of each epoch left out.
    epoch0 = np.concatenate([drawn_indices(data, s, key, 6) for s in range(3)])
    epoch1 = np.concatenate([drawn_indices(data, s, key, 6) for s in range(3, 6)])
    assert len(set(epoch0)) == 18 and len(set(epoch1)) == 18
    assert not np.array_equal(epoch0, epoch1)


def test_a_step_draws_the_same_batch_every_time_and_differs_by_seed():
    data = device_data(numbered_split(20))
    a = drawn_indices(data, 4, jax.random.key(1), 6)
    np.testing.assert_array_equal(a, drawn_indices(data, 4, jax.random.key(1), 6))
    assert not np.array_equal(a, drawn_indices(data, 4, jax.random.key(2), 6))


def test_pad_crop_flip_takes_windows_of_the_padded_image():
    side, padding = 5, 2
    image = jnp.arange(1, side * side + 1, dtype=jnp.float32).reshape(1, side, side, 1)
    images = jnp.repeat(image, 64, axis=0)
    out = np.asarray(pad_crop_flip(jax.random.key(3), images, padding))
    padded = np.pad(np.asarray(image[0, :, :, 0]), padding)
    windows = {
        (dy, dx, flip): (
            padded[dy : dy + side, dx : dx + side][:, ::-1]
            if flip
            else padded[dy : dy + side, dx : dx + side]
        )
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
        for flip in (False, True)
    }
    seen = set()
    for crop in out[..., 0]:
        matches = [k for k, w in windows.items() if np.array_equal(w, crop)]
        assert matches, "a crop that is no window of the padded image"
        seen.add(matches[0])
    assert len(seen) > 20  # offsets and flips vary between images
    assert any(k[2] for k in seen) and not all(k[2] for k in seen)


def test_normalisation_statistics():
    images = np.stack([np.full((2, 2, 3), 0, np.uint8), np.full((2, 2, 3), 255, np.uint8)])
    mean, std = normalization_stats(images, "per_pixel_mean")
    assert mean.shape == (2, 2, 3) and np.allclose(mean, 0.5) and np.allclose(std, 1)
    mean, std = normalization_stats(images, "per_channel_mean_std")
    assert mean.shape == (3,) and np.allclose(mean, 0.5) and np.allclose(std, 0.5)
    np.testing.assert_allclose(normalize(jnp.asarray(images), mean, std)[:, 0, 0, 0], [-1, 1])


def test_eval_batches_cover_every_example_once():
    data = device_data(numbered_split(10))
    seen = []
    for index in range(memory.num_eval_batches(data, 4)):
        images, labels, mask = memory.eval_batch(data, jnp.int32(index), 4)
        seen += list(np.asarray(images[:, 0, 0, 0])[np.asarray(mask)].round().astype(int))
    assert memory.num_eval_batches(data, 4) == 3
    assert seen == list(range(10))
