"""Checkpoint checksums: what they detect and how they are recorded. Damage, kills and
fallbacks end to end: test_reliability."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import checkpoint, integrity
from resnet_jax.config import cifar_recipe
from resnet_jax.state import build_model, init_state


def record_of(tree):
    return integrity.as_record(integrity.checksums(tree))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int32", "uint8"])
def test_flipping_any_bit_of_any_array_changes_its_checksum_and_no_other(dtype):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 5)) * 100, "b": rng.standard_normal(4) * 100}
    tree = {name: jnp.asarray(value).astype(dtype) for name, value in arrays.items()}
    base = record_of(tree)
    assert record_of({name: jnp.array(value) for name, value in tree.items()}) == base  # a copy: the same
    host = np.asarray(tree["a"])
    raw = host.view(np.uint8).reshape(-1)
    for byte in range(raw.size):
        for bit in range(8):
            flipped = raw.copy()
            flipped[byte] ^= 1 << bit
            changed = record_of({**tree, "a": jnp.asarray(flipped.view(host.dtype).reshape(host.shape))})
            assert changed["['a']"] != base["['a']"] and changed["['b']"] == base["['b']"], (byte, bit)


def test_moving_elements_or_reshaping_changes_the_checksum():
    x = jnp.arange(12, dtype=jnp.float32)
    base = record_of(x)[""]
    assert record_of(x[::-1])[""] != base
    assert record_of(x.at[0].set(x[1]).at[1].set(x[0]))[""] != base
    assert record_of(jnp.zeros(12))[""] != record_of(jnp.zeros(13))[""]


def test_the_record_is_written_atomically_and_an_unreadable_one_counts_as_none(tmp_path):
    integrity.write_record(tmp_path, 7, {"x": "00"})
    assert integrity.read_record(tmp_path, 7) == {"x": "00"}
    assert sorted(p.name for p in (tmp_path / integrity.RECORD_DIR).iterdir()) == ["7.json"]
    assert integrity.read_record(tmp_path, 8) is None
    integrity.record_path(tmp_path, 7).write_text('{"algorithm": "fmix32-sum-2x32", "arr')  # cut short
    assert integrity.read_record(tmp_path, 7) is None


def test_a_failed_record_is_raised_on_the_training_thread(tmp_path):
    (tmp_path / integrity.RECORD_DIR).write_text("a file where the records' folder belongs")
    (tmp_path / "checkpoints").mkdir()
    recorder = integrity.Recorder(tmp_path, tmp_path / "checkpoints")
    recorder.record(1, integrity.checksums({"x": jnp.ones(3)}))
    with pytest.raises(OSError):
        recorder.wait()
    recorder.wait()  # reported once


def small_state():
    config = cifar_recipe("resnet8", "fashion_mnist")
    return config, init_state(config, build_model(config), jax.random.key(0))


def test_records_of_checkpoints_orbax_deleted_are_pruned(tmp_path):
    config, state = small_state()
    checkpoint.write_config(tmp_path, config)
    with checkpoint.manager(tmp_path, keep=1) as mngr:
        for step in (1, 2, 3):
            checkpoint.save(mngr, step, state.replace(step=jnp.int32(step)))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [3]
    # Orbax deletes a step as the next save finalises, after which the save after that
    # prunes its record: step 1's is gone, step 2's may be too.
    records = {p.name for p in (tmp_path / integrity.RECORD_DIR).iterdir()}
    assert "3.json" in records and "1.json" not in records
    restored = checkpoint.load(tmp_path, 3)[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored["params"], state.params)
