"""Tests jaxshape/poisons/poison_set.py: PoisonSet, merge, triggers, save/load."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxshape import poisons
from jaxshape.data import DataFormatError
from jaxshape.data.dataset import Dataset


def _small_set(p=4, shape=(3, 3, 1), trigger=True):
  x = jnp.linspace(0.0, 1.0, p * int(np.prod(shape))).reshape(p, *shape)
  trig = poisons.patch_trigger(shape, 2, "bottom_right") if trigger else None
  return poisons.PoisonSet(
    x=x,
    y=jnp.arange(p, dtype=jnp.int32) % 2,
    attack="patch",
    base_idx=jnp.arange(p, dtype=jnp.int32) + 10,
    target_idx=jnp.full([p], -1, jnp.int32),
    target_class=1,
    base_split="train",
    trigger=trig,
    config={"ratio": 0.5, "size": 2, "corner": "bottom_right", "flag": True},
    info={"score_P": jnp.arange(p, dtype=jnp.float32), "curve_S": jnp.ones([7])},
  )


def test_merge_appends_poisons_and_marks_them():
  x = jnp.zeros((5, 3, 3, 1))
  y = jnp.array([0, 1, 0, 1, 0], jnp.int32)
  ps = _small_set()
  data = poisons.merge((x, y), ps)
  assert sorted(data) == ["is_poison", "x", "y"]
  assert data["x"].shape == (9, 3, 3, 1) and data["x"].dtype == jnp.float32
  assert data["y"].dtype == jnp.int32
  assert data["is_poison"].dtype == jnp.float32
  np.testing.assert_array_equal(data["is_poison"], [0, 0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(data["x"][5:], ps.x)
  np.testing.assert_array_equal(data["y"][:5], y)
  np.testing.assert_array_equal(data["y"][5:], ps.y)


def test_merge_accepts_dataset_and_keeps_earlier_poisons_marked():
  ds = Dataset(
    name="tiny",
    x_train=np.zeros((4, 3, 3, 1), np.float32),
    y_train=np.array([0, 1, 0, 1], np.int32),
    x_test=np.zeros((2, 3, 3, 1), np.float32),
    y_test=np.array([0, 1], np.int32),
    num_classes=2,
  )
  once = poisons.merge(ds, _small_set(p=2))
  twice = poisons.merge(once, _small_set(p=3))
  np.testing.assert_array_equal(twice["is_poison"], [0, 0, 0, 0, 1, 1, 1, 1, 1])


def test_merge_num_active_masks_later_poisons_and_may_be_traced():
  x, y = jnp.zeros((3, 3, 3, 1)), jnp.zeros([3], jnp.int32)
  ps = _small_set(p=4)
  masks = jax.jit(lambda k: poisons.merge((x, y), ps, num_active=k)["mask"])
  np.testing.assert_array_equal(masks(2), [1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(masks(0), [1, 1, 1, 0, 0, 0, 0])


def test_merge_rejects_mismatched_inputs_and_labels():
  ps = _small_set()
  with pytest.raises(ValueError, match="shape"):
    poisons.merge((jnp.zeros((3, 4, 4, 1)), jnp.zeros([3], jnp.int32)), ps)
  ds = Dataset(
    name="tiny",
    x_train=np.zeros((2, 3, 3, 1), np.float32),
    y_train=np.array([0, 1], np.int32),
    x_test=np.zeros((1, 3, 3, 1), np.float32),
    y_test=np.array([0], np.int32),
    num_classes=2,
  )
  bad = dataclasses.replace(ps, y=jnp.full([len(ps)], 2, jnp.int32))
  with pytest.raises(ValueError, match="poison labels"):
    poisons.merge(ds, bad)  # class 2 does not exist in a 2-class data set
  with pytest.raises(ValueError, match="num_active"):
    poisons.merge((jnp.zeros((3, 3, 3, 1)), jnp.zeros([3], jnp.int32)), ps, num_active=9)


def test_take_and_first_follow_per_poison_info():
  ps = _small_set(p=5)
  sub = ps.take([3, 1])
  np.testing.assert_array_equal(sub.base_idx, [13, 11])
  np.testing.assert_array_equal(sub.info["score_P"], [3.0, 1.0])
  np.testing.assert_array_equal(sub.info["curve_S"], ps.info["curve_S"])
  assert len(ps.first(2)) == 2 and len(ps.first(0)) == 0
  with pytest.raises(ValueError, match="k"):
    ps.first(6)


def test_save_load_round_trip(tmp_path):
  ps = _small_set()
  path = tmp_path / "sub" / "poisons.npz"
  poisons.save(path, ps)
  assert os.listdir(path.parent) == ["poisons.npz"]  # the temp file was renamed
  back = poisons.load(path)
  for name in ("x", "y", "base_idx", "target_idx"):
    np.testing.assert_array_equal(getattr(back, name), getattr(ps, name))
    assert getattr(back, name).dtype == getattr(ps, name).dtype
  assert (back.attack, back.target_class, back.base_split, back.target_split) == (
    "patch",
    1,
    "train",
    "",
  )
  assert dict(back.config) == dict(ps.config)
  np.testing.assert_array_equal(back.trigger.mask, ps.trigger.mask)
  np.testing.assert_array_equal(back.trigger.pattern, ps.trigger.pattern)
  assert sorted(back.info) == ["curve_S", "score_P"]
  np.testing.assert_array_equal(back.info["score_P"], ps.info["score_P"])


def test_save_overwrites_and_load_without_trigger(tmp_path):
  path = tmp_path / "p.npz"
  poisons.save(path, _small_set(p=3))
  poisons.save(path, _small_set(p=2, trigger=False))
  back = poisons.load(path)
  assert len(back) == 2 and back.trigger is None


def test_load_refuses_missing_and_foreign_files(tmp_path):
  with pytest.raises(FileNotFoundError):
    poisons.load(tmp_path / "nothing.npz")
  other = tmp_path / "other.npz"
  np.savez(other, a=np.zeros(3))
  with pytest.raises(ValueError, match="not a PoisonSet"):
    poisons.load(other)
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="npz"):
    poisons.load(junk)


def test_apply_trigger_writes_the_pattern_through_the_mask():
  x = jnp.full((2, 4, 4, 1), 0.25)
  mask = jnp.zeros((4, 4, 1)).at[0, 0, 0].set(1.0).at[3, 3, 0].set(0.5)
  trig = poisons.Trigger(mask, jnp.full((4, 4, 1), 1.0))
  out = poisons.apply_trigger(x, trig)
  assert out.shape == x.shape
  np.testing.assert_allclose(out[:, 0, 0, 0], 1.0)
  np.testing.assert_allclose(out[:, 3, 3, 0], 0.625)
  np.testing.assert_allclose(out[:, 1, 1, 0], 0.25)
  np.testing.assert_allclose(poisons.apply_trigger(x[0], trig), out[0])


def test_backdoor_test_set_drops_the_target_class():
  x = jnp.zeros((6, 3, 3, 1))
  y = jnp.array([0, 1, 2, 1, 0, 2], jnp.int32)
  ps = _small_set()
  x_trig, y_adv = poisons.backdoor_test_set(x, y, ps)
  assert x_trig.shape == (4, 3, 3, 1)
  np.testing.assert_array_equal(y_adv, [1, 1, 1, 1])
  np.testing.assert_array_equal(x_trig[:, 1:, 1:, 0], 1.0)  # bottom-right 2x2 patch
  with pytest.raises(ValueError, match="trigger"):
    poisons.apply_trigger(x, _small_set(trigger=False))


def test_poison_set_checks_its_shapes():
  with pytest.raises(ValueError, match="y"):
    poisons.PoisonSet(
      x=jnp.zeros((3, 2)),
      y=jnp.zeros([2], jnp.int32),
      attack="x",
      base_idx=jnp.zeros([3], jnp.int32),
      target_idx=jnp.zeros([3], jnp.int32),
    )


def test_merge_replace_writes_poisons_over_their_bases():
  x = jnp.zeros((6, 3, 3, 1))
  y = jnp.array([0, 1, 0, 1, 0, 1], jnp.int32)
  ps = _small_set(p=2).take([0, 1])
  ps = dataclasses.replace(
    ps, base_idx=jnp.array([4, 1], jnp.int32), y=jnp.array([0, 1], jnp.int32)
  )
  data = poisons.merge((x, y), ps, replace=True)
  assert data["x"].shape == (6, 3, 3, 1)
  np.testing.assert_array_equal(data["x"][4], ps.x[0])
  np.testing.assert_array_equal(data["x"][1], ps.x[1])
  np.testing.assert_array_equal(data["x"][0], 0.0)
  np.testing.assert_array_equal(data["is_poison"], [0, 1, 0, 0, 1, 0])
  np.testing.assert_array_equal(data["y"], y)
  first = poisons.merge((x, y), ps, replace=True, num_active=1)
  np.testing.assert_array_equal(first["is_poison"], [0, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(first["x"][1], 0.0)
  with pytest.raises(ValueError, match="replace"):
    poisons.merge(
      (x, y), dataclasses.replace(ps, base_idx=jnp.array([4, 4], jnp.int32)), replace=True
    )


# ------------------------------------------------------------- damaged PoisonSet files


def _saved_bytes(tmp_path) -> bytes:
  path = tmp_path / "good.npz"
  poisons.save(path, _small_set())
  return path.read_bytes()


def _rewrite(tmp_path, **changes):
  """A PoisonSet file whose arrays (or `meta` JSON text) are replaced by `changes`."""
  with np.load(tmp_path / "good.npz") as f:
    arrays = {k: f[k] for k in f.files}
  arrays.update(changes)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  return path


def _meta(**changes):
  meta = {
    "format_version": 1,
    "attack": "patch",
    "target_class": 1,
    "base_split": "train",
    "target_split": "",
    "config": {},
  }
  meta.update(changes)
  meta = {k: v for k, v in meta.items() if v is not None}
  return np.asarray(json.dumps(meta))


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"meta": np.asarray('{"attack": "patch", ')}, "meta is not valid JSON"),
    ({"meta": np.asarray("[1, 2]")}, "meta is a JSON list"),
    ({"meta": _meta(attack=None)}, "meta lacks 'attack'"),
    ({"meta": _meta(target_class="1")}, "meta 'target_class' is '1', expected a int"),
    ({"meta": _meta(format_version=99)}, "newer jaxshape \\(format 99 > 1\\)"),
    ({"meta": np.zeros(3)}, "meta is float64 \\(3,\\), expected a string"),
    ({"base_idx": None}, "missing \\['base_idx'\\]"),
    ({"y": np.zeros(3, np.int32)}, "y is int32 \\(3,\\), expected integers \\[4\\]"),
    ({"y": np.zeros(4, np.float32)}, "y is float32"),
    ({"x": np.zeros(4, np.float32)}, "expected float \\[P, ...\\]"),
    ({"trigger_pattern": None}, "trigger arrays must both have"),
    ({"info/score_P": np.zeros(2)}, "not a consistent PoisonSet"),
  ],
)
def test_load_malformed_contents_raise_data_format_error(tmp_path, changes, message):
  _saved_bytes(tmp_path)
  path = _rewrite(tmp_path, **changes)
  with pytest.raises(DataFormatError, match=message) as info:
    poisons.load(path)
  assert isinstance(info.value, ValueError) and info.value.path == str(path)
  assert str(path) in str(info.value)


def test_load_truncated_at_any_offset_raises_data_format_error(tmp_path):
  contents = _saved_bytes(tmp_path)
  path = tmp_path / "cut.npz"
  for cut in sorted({0, 1, 4, 30, 100, len(contents) // 2, len(contents) - 22, len(contents) - 1}):
    path.write_bytes(contents[:cut])
    with pytest.raises(DataFormatError, match="not a readable .npz") as info:
      poisons.load(path)
    assert info.value.path == str(path), cut


def test_load_crc_corruption_raises_data_format_error(tmp_path):
  contents = bytearray(_saved_bytes(tmp_path))
  offset = contents.index(b"\x93NUMPY") + 200  # inside the first array's data
  contents[offset] ^= 0x01
  path = tmp_path / "flipped.npz"
  path.write_bytes(bytes(contents))
  with pytest.raises(DataFormatError, match="Bad CRC-32") as info:
    poisons.load(path)
  assert info.value.path == str(path)


def test_load_refuses_a_folder_and_object_arrays(tmp_path):
  (tmp_path / "dir.npz").mkdir()
  with pytest.raises(DataFormatError, match="not a regular file"):
    poisons.load(tmp_path / "dir.npz")
  _saved_bytes(tmp_path)
  path = tmp_path / "objects.npz"
  with np.load(tmp_path / "good.npz") as f:
    arrays = {k: f[k] for k in f.files}
  arrays["x"] = np.array([{"a": 1}], dtype=object)
  np.savez(path, **arrays)
  with pytest.raises(DataFormatError, match="Python objects; refused"):
    poisons.load(path)
