"""The built-in shapes data, the synthetic latents and the per-host batch iterator."""

import numpy as np
import pytest

from dit_jax.data import Batches, BuiltinShapes, SyntheticLatents, classify_image, get_batch
from dit_jax.data.builtin import CLASSES, COLOURS, judge_shape, shape_score


def test_builtin_examples_are_deterministic_and_in_range():
    source = BuiltinShapes(image_size=32, size=1000, seed=3)
    batch = source.get_batch(np.array([5, 17, 5]))
    assert batch["x"].shape == (3, 32, 32, 3) and batch["x"].dtype == np.float32
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1
    np.testing.assert_array_equal(batch["x"][0], batch["x"][2])
    np.testing.assert_array_equal(batch["x"][1], source[17]["x"])  # batch or single: same example
    assert batch["y"].tolist() == [5 % 4, 17 % 4, 5 % 4]
    other_seed = BuiltinShapes(image_size=32, size=1000, seed=4)[17]["x"]
    assert np.abs(other_seed - batch["x"][1]).max() > 0.1
    with pytest.raises(IndexError):
        source.get_batch(np.array([1000]))


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_classify_image_reads_the_class_of_every_real_example(image_size):
    source = BuiltinShapes(image_size=image_size, size=400)
    batch = source.get_batch(np.arange(400))
    predicted = np.array([classify_image(x) for x in batch["x"]])
    np.testing.assert_array_equal(predicted, batch["y"])
    # uint8 images (as saved in sample grids) classify the same.
    as_uint8 = np.clip(127.5 * batch["x"][:40] + 128, 0, 255).astype(np.uint8)
    assert [classify_image(x) for x in as_uint8] == batch["y"][:40].tolist()


def test_classify_image_rejects_images_without_a_shape():
    grey = np.full((32, 32, 3), -0.2, np.float32)
    noise = np.random.default_rng(0).uniform(-0.05, 0.05, (32, 32, 1)).astype(np.float32)
    assert classify_image(grey + noise) == -1
    assert len(CLASSES) == BuiltinShapes().num_classes == 4


def _blobs(labels, size, kind, seed=0):
    """Blobs in each label's colour on a grey background, as an undertrained model draws them:
    "gauss", a soft round blob; "ragged", a sharp-edged blob whose radius wobbles with angle."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    out = []
    for k in labels:
        cx, cy = size / 2 + rng.uniform(-2, 2, 2) * size / 32
        r = size * rng.uniform(0.28, 0.38)
        d, theta = np.hypot(xs - cx, ys - cy), np.arctan2(ys - cy, xs - cx)
        if kind == "gauss":
            alpha = np.exp(-0.5 * (d / (0.6 * r)) ** 2)
        else:
            phases = rng.uniform(0, 2 * np.pi, 4)
            wobble = 1 + sum(0.12 / (j + 1) * np.cos((j + 2) * theta + phases[j]) for j in range(4))
            alpha = np.clip(r * wobble - d + 0.5, 0, 1)
        grey = rng.uniform(0.2, 0.45)
        out.append((alpha[..., None] * COLOURS[k] + (1 - alpha[..., None]) * grey) * 2 - 1)
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("image_size,count", [(32, 300), (64, 100)])
def test_shape_check_accepts_real_images(image_size, count):
    batch = BuiltinShapes(image_size=image_size, size=count, seed=5).get_batch(np.arange(count))
    assert shape_score(batch["x"], batch["y"]) >= 0.99
    verdicts = [judge_shape(x, y) for x, y in zip(batch["x"][:40], batch["y"][:40])]
    assert [v["shape"] for v in verdicts] == batch["y"][:40].tolist()  # the shape alone is read
    # As saved in the sample grids (uint8), the same.
    as_uint8 = np.clip(127.5 * batch["x"][:40] + 128, 0, 255).astype(np.uint8)
    assert shape_score(as_uint8, batch["y"][:40]) == 1.0


@pytest.mark.parametrize("kind", ["gauss", "ragged"])
def test_shape_check_rejects_blobs_of_the_right_colour(kind):
    labels = np.arange(40) % 4
    blobs = _blobs(labels, 32, kind)
    # The colour-only classifier calls them good; the shape-aware check does not.
    assert np.mean([classify_image(x) for x in blobs] == labels) == 1.0
    assert shape_score(blobs, labels) == 0.0


def test_shape_check_rejects_the_right_shape_in_the_wrong_colour():
    batch = BuiltinShapes(image_size=32, size=40, seed=6).get_batch(np.arange(40))
    x = (batch["x"] + 1) / 2
    # Repaint each shape in the next class's colour: pixel = α·colour + (1 - α)·grey.
    own, other = COLOURS[batch["y"]], COLOURS[(batch["y"] + 1) % 4]
    saturation = (own.max(-1) - own.min(-1))[:, None, None, None]
    alpha = np.clip((x.max(-1, keepdims=True) - x.min(-1, keepdims=True)) / saturation, 0, 1)
    grey = (x - alpha * own[:, None, None]) / np.maximum(1 - alpha, 1e-6)
    repainted = (alpha * other[:, None, None] + (1 - alpha) * grey) * 2 - 1
    verdicts = [judge_shape(im, y) for im, y in zip(repainted, batch["y"])]
    assert [v["shape"] for v in verdicts] == batch["y"].tolist()
    assert not any(v["ok"] for v in verdicts)
    assert shape_score(repainted, (batch["y"] + 1) % 4) == 0.0  # right colour, wrong shape


def test_shape_check_rejects_noisy_backgrounds_and_empty_images():
    batch = BuiltinShapes(image_size=32, size=8, seed=7).get_batch(np.arange(8))
    speckle = np.random.default_rng(0).normal(0, 0.15, (8, 32, 32, 1)).astype(np.float32)
    assert shape_score(np.clip(batch["x"] + speckle, -1, 1), batch["y"]) == 0.0
    assert shape_score(np.full((2, 32, 32, 3), -0.3, np.float32), [0, 1]) == 0.0
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        shape_score(batch["x"][:3], [0, 1])


def test_synthetic_latents():
    source = SyntheticLatents(shape=(8, 8, 4), num_classes=1000, size=100, seed=1)
    batch = get_batch(source, [3, 7, 3])
    assert batch["x"].shape == (3, 8, 8, 4) and batch["y"].dtype == np.int32
    np.testing.assert_array_equal(batch["x"][0], batch["x"][2])
    assert 0 <= batch["y"].min() and batch["y"].max() < 1000
    assert abs(float(get_batch(source, range(100))["x"].std()) - 1.0) < 0.05


def test_batches_shuffle_globally_and_split_over_hosts():
    source = BuiltinShapes(image_size=8, size=50)
    whole = Batches(source, global_batch_size=10, seed=7)
    epoch = np.concatenate([whole.indices(b) for b in range(5)])
    assert sorted(epoch.tolist()) == list(range(50))  # one epoch visits every example once
    assert epoch.tolist() != list(range(50))
    next_epoch = np.concatenate([whole.indices(b) for b in range(5, 10)])
    assert sorted(next_epoch.tolist()) == list(range(50)) and next_epoch.tolist() != epoch.tolist()
    # Three hosts with uneven row ranges assemble exactly the single-host batches.
    hosts = [Batches(source, global_batch_size=10, seed=7, host_rows=r)
             for r in [(0, 4), (4, 6), (6, 10)]]
    for b in range(12):
        np.testing.assert_array_equal(np.concatenate([h.indices(b) for h in hosts]), whole.indices(b))
    # A different seed is a different order.
    assert Batches(source, global_batch_size=10, seed=8).indices(0).tolist() != whole.indices(0).tolist()


def test_batches_state_resumes_the_same_stream():
    source = BuiltinShapes(image_size=8, size=30)
    a = Batches(source, global_batch_size=4, seed=0, host_rows=(1, 3))
    for _ in range(5):
        next(a)
    state = a.get_state()
    expected = [next(a) for _ in range(4)]
    b = Batches(source, global_batch_size=4, seed=0, host_rows=(1, 3))
    b.set_state(state)
    for want in expected:
        got = next(b)
        np.testing.assert_array_equal(got["x"], want["x"])
        np.testing.assert_array_equal(got["y"], want["y"])
        assert got["x"].shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="global_batch_size"):
        Batches(source, global_batch_size=8, seed=0).set_state(state)
