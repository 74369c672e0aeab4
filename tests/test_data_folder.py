"""Image folders, the released preprocessing and the grain pipeline (dit_jax.data.folder,
.transforms, .pipeline)."""

import json
import logging
import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dit_jax.data import Batches, make_source
from dit_jax.data.folder import ImageFolderSource, load_class_mapping, save_class_mapping, scan_folder
from dit_jax.data.pipeline import Loader
from dit_jax.sharding import default_host_rows
from dit_jax.data.transforms import center_crop_arr, hflip, normalize, preprocess
from imagedata import draw_image, make_image_folder


# --- the ADM center crop -------------------------------------------------------------------------

def reference_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """The ADM center crop of docs/numerics.md#latents-and-data, transcribed independently: count
    the BOX halvings first, apply them, one BICUBIC resize to short side = size (long side rounded
    half-to-even), crop at (h-size)//2, (w-size)//2."""
    w, h = image.size
    halvings = 0
    while min(w >> halvings, h >> halvings) >= 2 * size:
        halvings += 1
    for k in range(1, halvings + 1):
        image = image.resize((w >> k, h >> k), Image.BOX)
    w, h = image.size
    if w <= h:
        new = (size, round(h * (size / w)))
    else:
        new = (round(w * (size / h)), size)
    pixels = np.array(image.resize(new, Image.BICUBIC))
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


# (width, height, target, size after the halvings, size after the resize): worked out by hand.
CROP_CASES = [
    (37, 23, 16, (37, 23), (26, 16)),      # no halving, upscale of the long side 25.74 → 26
    (23, 37, 16, (23, 37), (16, 26)),
    (129, 65, 16, (32, 16), (32, 16)),     # two halvings (65 → 32 → 16), then scale 1
    (65, 129, 16, (16, 32), (16, 32)),
    (517, 300, 32, (64, 37), (55, 32)),    # three halvings, 64·32/37 = 55.35 → 55
    (300, 517, 32, (37, 64), (32, 55)),
    (64, 64, 32, (32, 32), (32, 32)),      # short side exactly 2·size halves once
    (63, 95, 32, (63, 95), (32, 48)),      # 63 < 64: no halving, 95·32/63 = 48.25 → 48
    (13, 11, 16, (13, 11), (19, 16)),      # smaller than the target: upscale, 18.9 → 19
    (250, 80, 16, (62, 20), (50, 16)),     # strong aspect ratio, 2 halvings, 49.6 → 50
    (500, 375, 256, (500, 375), (341, 256)),   # the typical ImageNet photo at 256 px
    (1200, 900, 256, (600, 450), (341, 256)),  # one halving at 256 px
    (683, 1024, 512, (683, 1024), (512, 768)),  # 512 px, 767.6 → 768
]


@pytest.mark.parametrize("w,h,size,halved,resized", CROP_CASES)
def test_adm_center_crop_matches_reference(w, h, size, halved, resized):
    rng = np.random.default_rng(w * 1000 + h)
    image = draw_image(rng, w, h)
    out = center_crop_arr(image, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference_center_crop(image, size))

    # The hand-computed intermediate sizes pin down the halving count and the rounding.
    step = image
    for _ in range(int(np.log2(w // halved[0])) if w != halved[0] else 0):
        step = step.resize((step.size[0] // 2, step.size[1] // 2), Image.BOX)
    assert step.size == halved
    full = np.array(step.resize(resized, Image.BICUBIC))
    top, left = (resized[1] - size) // 2, (resized[0] - size) // 2
    np.testing.assert_array_equal(out, full[top:top + size, left:left + size])


def test_crop_differs_from_naive_resize():
    # Guards the test above against a transcription that is trivially true: a plain BICUBIC
    # resize of the whole image (no halving) gives other pixels.
    image = draw_image(np.random.default_rng(1), 517, 300)
    naive = np.array(image.resize((55, 32), Image.BICUBIC))[:, 11:43]
    assert not np.array_equal(center_crop_arr(image, 32), naive)


def test_normalize_is_torchvision_to_tensor_then_normalize():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = normalize(x)
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    expected = (x.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(out, expected)
    torch = pytest.importorskip("torch")
    # ToTensor: byte tensor → float → div(255); Normalize: sub_(mean).div_(std).
    t = torch.from_numpy(x.transpose(2, 0, 1).copy()).to(torch.float32).div(255)
    t = t.sub_(torch.tensor([0.5] * 3)[:, None, None]).div_(torch.tensor([0.5] * 3)[:, None, None])
    np.testing.assert_array_equal(out, t.numpy().transpose(1, 2, 0))


def test_preprocess_reads_grayscale_and_palette_as_rgb(tmp_path):
    rng = np.random.default_rng(2)
    image = draw_image(rng, 40, 30)
    image.convert("L").save(tmp_path / "g.png")
    image.convert("P").save(tmp_path / "p.png")
    for name in ("g.png", "p.png"):
        out = preprocess(tmp_path / name, 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.float32
        ref = normalize(center_crop_arr(Image.open(tmp_path / name).convert("RGB"), 16))
        np.testing.assert_array_equal(out, ref)


# --- folders -------------------------------------------------------------------------------------

def test_scan_class_folders_sorted_mapping(tmp_path):
    root = make_image_folder(tmp_path / "data", {"zebra": 3, "apple": 2, "mango": 4})
    (root / "mango" / "nested").mkdir()
    draw_image(np.random.default_rng(0), 30, 30).save(root / "mango" / "nested" / "deep.JPEG")
    paths, labels, names = scan_folder(root)
    assert names == ["apple", "mango", "zebra"]
    assert labels.tolist() == [0] * 2 + [1] * 5 + [2] * 3
    assert all(p.split("/")[-2 if "nested" not in p else -3] == names[k]
               for p, k in zip(paths, labels))
    assert not any(p.endswith(".txt") for p in paths)  # README.txt is not an image
    assert paths[2:7] == sorted(paths[2:7])  # sorted within the class, nested folder included
    source = ImageFolderSource(root, 16)
    assert len(source) == 10 and source.num_classes == 3 and source.element_shape == (16, 16, 3)

    save_class_mapping(tmp_path / "work", source.class_names)
    assert load_class_mapping(tmp_path / "work") == ["apple", "mango", "zebra"]
    saved = json.loads((tmp_path / "work" / "classes.json").read_text())
    assert saved["class_to_idx"] == {"apple": 0, "mango": 1, "zebra": 2}


def test_scan_flat_folder_is_unconditional(tmp_path):
    root = make_image_folder(tmp_path / "flat", flat=7)
    source = ImageFolderSource(root, 16)
    assert len(source) == 7 and source.num_classes == 0 and source.class_names == []
    assert {int(source[i]["y"]) for i in range(7)} == {0}
    # Forcing the class layout on a flat folder is a clear error.
    with pytest.raises(ValueError, match="no class subfolders"):
        scan_folder(root, class_folders=True)


def test_layout_setting_forces_flat_or_class_folders(tmp_path):
    # FFHQ-style: unconditional images stored in numbered subfolders.
    root = make_image_folder(tmp_path / "ffhq", {"00000": 3, "01000": 4})
    assert ImageFolderSource(root, 16).num_classes == 2  # what "auto" makes of it
    flat = make_source(folder_config(root, 1, layout="flat").data)
    assert flat.num_classes == 0 and flat.class_names == [] and len(flat) == 7
    assert set(flat.labels.tolist()) == {0}
    assert sorted(p.split("/")[-2] for p in flat.paths) == ["00000"] * 3 + ["01000"] * 4
    assert make_source(folder_config(root, 1, layout="classes").data).num_classes == 2

    flat_root = make_image_folder(tmp_path / "flat", flat=5)
    with pytest.raises(ValueError, match="has no class subfolders"):
        make_source(folder_config(flat_root, 1, layout="classes").data)
    with pytest.raises(ValueError, match="unknown image folder layout 'flatt'"):
        make_source(folder_config(flat_root, 1, layout="flatt").data)
    # Latents carry the layout chosen at extraction; the training setting cannot change it.
    with pytest.raises(ValueError, match="data.layout='flat' applies to data.source='folder'"):
        make_source(folder_config(flat_root, 1, source="latents", layout="flat").data)


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        scan_folder(tmp_path / "empty")
    root = make_image_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    (root / "emu").mkdir()
    (root / "emu" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="1 class folder.*emu"):
        scan_folder(root)
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        scan_folder(only_text)


def test_unreadable_files_are_replaced_and_flagged(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", {"a": 4, "b": 4}, corrupt={
        "a/img_900.jpg": "truncated", "b/img_901.png": "text", "b/img_902.jpg": "empty"})
    source = ImageFolderSource(root, 16)
    assert len(source) == 11
    bad = [i for i, p in enumerate(source.paths) if "img_90" in p]
    assert len(bad) == 3
    with caplog.at_level(logging.WARNING, logger="dit_jax.data.folder"):
        records = [source[i] for i in range(len(source))]
    assert [int(r["skipped"]) for r in records] == [int(i in bad) for i in range(11)]
    assert sum("skipping unreadable image" in m for m in caplog.messages) == 3
    for i in bad:
        # The stand-in is the next readable file (b/img_901 and b/img_902 are consecutive).
        j = next(k % 11 for k in range(i + 1, i + 12) if k % 11 not in bad)
        np.testing.assert_array_equal(records[i]["x"], preprocess(source.paths[j], 16))
        assert records[i]["y"] == source.labels[j]


# --- the grain pipeline --------------------------------------------------------------------------

class IndexSource:
    """Record i carries i, so the tests can see which examples a batch holds."""

    def __init__(self, n):
        self.n = n
        self.num_classes = n  # label i: one class per example
        self.element_shape = (1,)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full((1,), i, np.float32), "y": np.int32(i)}


@pytest.mark.parametrize("n", [40, 42])
def test_two_hosts_see_each_example_once_per_epoch(n):
    g, batches = 8, 21  # 5 batches an epoch (42 drops 2 examples an epoch): 4.2 epochs
    used = n - n % g
    hosts = [Loader(IndexSource(n), global_batch_size=g, seed=7, host_rows=default_host_rows(g, h, 2))
             for h in range(2)]
    single = Loader(IndexSource(n), global_batch_size=g, seed=7, host_rows=(0, g))
    stream, per_host = [], [[], []]
    for _ in range(batches):
        rows = [next(loader)["y"] for loader in hosts]
        assert [len(r) for r in rows] == [4, 4]
        per_host[0].extend(rows[0])
        per_host[1].extend(rows[1])
        stream.extend(np.concatenate(rows))
        # Host count independence: the two slices assemble into the one-host batch.
        np.testing.assert_array_equal(np.concatenate(rows), next(single)["y"])
    # Host 0's state (the one a checkpoint keeps) restores host 1 at its exact next rows.
    restored = Loader(IndexSource(n), global_batch_size=g, seed=7, host_rows=default_host_rows(g, 1, 2))
    restored.set_state(hosts[0].get_state())
    np.testing.assert_array_equal(next(restored)["y"], next(hosts[1])["y"])
    epochs = [stream[e * used:(e + 1) * used] for e in range(len(stream) // used)]
    for epoch in epochs:
        assert len(set(epoch)) == used  # every example used once, on one host
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert set(per_host[0][: used // 2]).isdisjoint(per_host[1][: used // 2])
    assert stream[:used] != list(range(used))  # actually shuffled


def _loader(n, g, rows):
    return Loader(IndexSource(n), global_batch_size=g, seed=5, host_rows=rows)


def _batches(n, g, rows):
    return Batches(IndexSource(n), global_batch_size=g, seed=5, host_rows=rows)


@pytest.mark.parametrize("make", [_loader, _batches], ids=["grain", "in-process"])
def test_each_epoch_drops_its_partial_batch(make):
    # 10 examples, global batch 4: 2 batches an epoch, 2 examples left out. Streaming the epochs
    # back to back would put examples of two epochs (possibly the same one twice) in batch 2.
    n, g, epochs = 10, 4, 12
    hosts = [make(n, g, default_host_rows(g, h, 2)) for h in range(2)]
    batches = [np.concatenate([next(host)["y"] for host in hosts]) for _ in range(2 * epochs)]
    for batch in batches:
        assert len(set(batch.tolist())) == g, batch  # no example twice in a global batch
    left_out = []
    for e in range(epochs):
        epoch = np.concatenate(batches[2 * e:2 * e + 2]).tolist()
        assert len(set(epoch)) == n - n % g  # the epoch's batches are disjoint
        left_out.append(frozenset(range(n)) - set(epoch))
    assert len(set(left_out)) > 1  # each epoch's shuffle picks the examples it leaves out
    assert all(len(s) == n % g for s in left_out)

    # Resuming mid-epoch (after batch 1, 5) or at an epoch boundary (after 2, 4) continues with
    # exactly the next batch, on both hosts.
    for at in (1, 2, 4, 5):
        interrupted = make(n, g, default_host_rows(g, 0, 2))
        for _ in range(at):
            next(interrupted)
        state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint keeps it
        resumed = [make(n, g, default_host_rows(g, h, 2)) for h in range(2)]
        for host in resumed:
            host.set_state(state)
        for b in range(at, at + 3):
            np.testing.assert_array_equal(
                np.concatenate([next(host)["y"] for host in resumed]), batches[b])


@pytest.mark.parametrize("make", [_loader, _batches], ids=["grain", "in-process"])
def test_fewer_examples_than_a_global_batch_is_an_error(make):
    with pytest.raises(ValueError, match="3 examples, fewer than the global batch size 4"):
        make(3, 4, (0, 4))
    make(4, 4, (0, 4))  # exactly one batch an epoch is enough


def test_seed_changes_order_and_is_reproducible():
    def first(seed):
        return next(Loader(IndexSource(50), global_batch_size=10, seed=seed, host_rows=(0, 10)))["y"]
    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_folder_loader_flips_and_resumes_exactly(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 6, "b": 6, "c": 4}, corrupt={
        "a/img_900.jpg": "truncated", "c/img_901.png": "text"})
    source = ImageFolderSource(root, 16)
    n = len(source)  # 18, two unreadable
    clean = {i: preprocess(p, 16) for i, p in enumerate(source.paths) if "img_90" not in p}

    def run(workers):
        loader = Loader(source, global_batch_size=6, seed=3, host_rows=(0, 6), num_workers=workers)
        first = [next(loader) for _ in range(3)]  # exactly one epoch
        state = json.loads(json.dumps(loader.get_state()))
        after = [next(loader) for _ in range(3)]
        loader.close()
        return loader, first, state, after

    loader, first, state, after = run(workers=0)
    bad = sorted(i for i, p in enumerate(source.paths) if "img_90" in p)
    # Each bad file met in both epochs counts once.
    assert loader.skipped == 2 and state["skipped"] == 2 and state["skipped_examples"] == bad
    flips = 0
    for batch in first + after:
        assert batch["x"].shape == (6, 16, 16, 3) and batch["x"].dtype == np.float32
        assert set(batch) == {"x", "y"}
        for x, y in zip(batch["x"], batch["y"]):
            matches = [i for i, c in clean.items() if np.array_equal(x, c)]
            mirrored = [i for i, c in clean.items() if np.array_equal(x, hflip(c))]
            assert len(matches) + len(mirrored) >= 1
            flips += bool(mirrored) and not matches
            assert source.labels[(matches or mirrored)[0]] == y
    assert 0 < flips < 36  # the random flip happens, not always

    # The worker count does not change any batch; a fresh loader restored from the JSON state
    # continues with exactly the next batches, whatever its worker count.
    _, first2, state2, after2 = run(workers=2)
    assert state2 == state
    # Copies, not the workers' shared memory: a batch still held at exit leaks none of it.
    assert all(type(v) is np.ndarray and v.flags.owndata for b in first2 + after2 for v in b.values())
    for a, b in zip(first + after, first2 + after2):
        np.testing.assert_array_equal(a["x"], b["x"])
    for workers in (0, 2):
        resumed = Loader(source, global_batch_size=6, seed=3, host_rows=(0, 6), num_workers=workers)
        resumed.set_state(state)
        for expected in after:
            got = next(resumed)
            np.testing.assert_array_equal(got["x"], expected["x"])
            np.testing.assert_array_equal(got["y"], expected["y"])
        assert resumed.skipped == 2 and resumed.next_batch == 6
        resumed.close()
    with pytest.raises(ValueError, match="seed"):
        Loader(source, global_batch_size=6, seed=4, host_rows=(0, 6)).set_state(state)
    assert n == 18


def test_empty_source_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        Loader(IndexSource(0), global_batch_size=4, seed=0, host_rows=(0, 4))


# --- training on a folder ------------------------------------------------------------------------

def folder_config(path, total_steps, checkpoint_every=100, **data):
    from configs.demo import get_config

    c = get_config()
    c.total_steps = total_steps
    c.global_batch_size = 8
    c.log_every = 1
    c.checkpoint_every = checkpoint_every
    c.sample_every = 0
    c.async_checkpointing = False
    c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.patch_size = 32, 1, 2, 4
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"  # a cosine decay would depend on total_steps
    c.data.source = "folder"
    c.data.path = str(path)
    c.data.image_size = 16
    c.data.num_workers = 0
    c.data.update(data)
    return c


def test_random_flip_can_be_turned_off(tmp_path):
    # For data whose mirror image is something else (digits, letters): data.random_flip=False.

    root = make_image_folder(tmp_path / "data", {"a": 4, "b": 4}, extras=False)
    config = ml_collections.ConfigDict({"source": "folder", "path": str(root), "image_size": 16,
                                        "layout": "auto", "random_flip": False})
    source = make_source(config)
    assert source.random_flip is False
    records = [source[i] for i in range(len(source))]
    for seed in range(20):  # p = 0.5 each: the flip would have happened many times
        out = source.augment(records[seed % len(records)], np.random.default_rng(seed))
        np.testing.assert_array_equal(out["x"], records[seed % len(records)]["x"])
    config.random_flip = True
    flipping = make_source(config)
    flipped = [not np.array_equal(flipping.augment(records[0], np.random.default_rng(s))["x"],
                                  records[0]["x"]) for s in range(20)]
    assert 0 < sum(flipped) < 20


def test_folder_with_corrupt_files_trains_reports_skipped_and_resumes_exactly(tmp_path):
    from dit_jax.train import train
    from dit_jax.train.logging import read_log

    root = make_image_folder(tmp_path / "data", {"owl": 4, "fox": 4, "elk": 4}, corrupt={
        "fox/img_900.jpg": "truncated", "owl/img_901.png": "text"})
    source = ImageFolderSource(root, 16)
    reference = Loader(source, global_batch_size=8, seed=0, host_rows=(0, 8))
    expected_skipped = []
    for _ in range(3):
        next(reference)
        expected_skipped.append(reference.skipped)
    assert expected_skipped[1] >= 2  # the 8 of 14 files of epochs 0 and 1 hit both bad ones

    work = tmp_path / "work"
    straight = train(folder_config(root, 3, checkpoint_every=2), work)
    log = read_log(work)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert [r["skipped"] for r in log] == expected_skipped
    assert all(np.isfinite(r["loss"]) for r in log)
    assert straight["metrics"]["skipped"] == expected_skipped[-1]
    assert load_class_mapping(work) == ["elk", "fox", "owl"]
    saved = json.loads((work / "config.json").read_text())
    assert saved["model"]["num_classes"] == 3  # -1 in the demo config: follows the data

    # As if interrupted after the checkpoint of step 2: the resumed run (with worker processes
    # this time) sees the same batch at step 3, hence the same loss, and the skipped count
    # carries over.
    shutil.rmtree(work / "checkpoints" / "3")
    resumed = train(folder_config(root, 3, checkpoint_every=2, num_workers=2), work)
    assert resumed["step"] == 3
    last = read_log(work)[-1]
    assert last["step"] == 3 and last["skipped"] == expected_skipped[-1]
    np.testing.assert_allclose(last["loss"], log[-1]["loss"], rtol=1e-6)


# --- edge cases: link loops, 16-bit files, huge images, distinct skipped files ------------------

def test_directory_symlink_loops_are_listed_once(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", {"a": 3, "b": 2}, extras=False)
    # One link per directory: without the check the walk follows each some 40 levels deep (two
    # in one directory would branch at every level).
    (root / "a" / "up").symlink_to(root, target_is_directory=True)  # a/up/a/up/..., a/up/b
    (root / "b" / "sub").mkdir()
    draw_image(np.random.default_rng(1), 20, 20).save(root / "b" / "sub" / "x.png")
    (root / "b" / "sub" / "again").symlink_to(root / "b" / "sub", target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="dit_jax.data.folder"):
        paths, labels, names = scan_folder(root)
    assert names == ["a", "b"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert [os.path.relpath(p, root) for p in paths] == [
        "a/img_000.png", "a/img_001.jpg", "a/img_002.jpg", "b/img_000.png", "b/img_001.jpg",
        "b/sub/x.png"]
    assert sum("symlink loop" in m for m in caplog.messages) == 2  # a/up and b/sub/again
    (tmp_path / "flat").mkdir()
    draw_image(np.random.default_rng(2), 20, 20).save(tmp_path / "flat" / "y.png")
    (tmp_path / "flat" / "self").symlink_to(tmp_path / "flat", target_is_directory=True)
    assert len(scan_folder(tmp_path / "flat", class_folders=False)[0]) == 1


def _png16(path, pixels):
    """A 16-bit PNG (PIL writes 16-bit grayscale but not 16-bit RGB), written chunk by chunk."""
    import struct
    import zlib

    h, w, c = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    from dit_jax.data.transforms import load_rgb

    values = np.arange(0, 65536, 257 * 15, dtype=np.uint16)[None, :].repeat(3, 0)  # 0 .. 65535
    Image.fromarray(values).save(tmp_path / "gray16.png")  # PIL mode I;16
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "gray16.png")),
                                  np.repeat(expected[..., None], 3, -1))
    _png16(tmp_path / "gray16b.png", values[..., None])  # 16-bit grayscale written by hand
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "gray16b.png"))[..., 0], expected)
    rgb = np.stack([values, values[:, ::-1], np.full_like(values, 1999)], -1)
    _png16(tmp_path / "rgb16.png", rgb)
    got = np.asarray(load_rgb(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(got - rgb / 257.0).max() <= 1  # PIL keeps the high byte: within one level
    # and through the data source: a mid-gray 16-bit file is mid-gray, not white
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.full((20, 20), 32896, np.uint16)).save(tmp_path / "flat" / "mid.png")
    x = ImageFolderSource(tmp_path / "flat", 8, class_folders=False)[0]["x"]
    np.testing.assert_allclose(x, 128 / 255 * 2 - 1, atol=1e-6)


def test_huge_images_are_reduced_on_decode(tmp_path, caplog, monkeypatch):
    import dit_jax.data.transforms as transforms

    image = draw_image(np.random.default_rng(3), 300, 260)
    image.save(tmp_path / "big.jpg", quality=95)
    image.save(tmp_path / "big.png")
    image.resize((60, 52)).save(tmp_path / "small.png")
    monkeypatch.setattr(transforms, "_warned_large", False)
    with caplog.at_level(logging.WARNING, logger="dit_jax.data.transforms"):
        for name in ("big.jpg", "big.png", "big.png"):
            # 260 px ≥ 8 × 16: decoded at 1/4 (JPEG DCT scaling) or box-reduced by 4 (PNG).
            reduced = transforms.load_rgb(tmp_path / name, 16)
            assert reduced.size == (75, 65), name
            full = transforms.center_crop_arr(transforms.load_rgb(tmp_path / name), 16)
            crop = transforms.preprocess(tmp_path / name, 16)
            # The same averages of the same pixels, rounded at other steps.
            assert np.abs(crop - transforms.normalize(full)).mean() < 0.02, name
    assert sum("far larger than" in m for m in caplog.messages) == 1  # once per process
    assert transforms.load_rgb(tmp_path / "small.png", 16).size == (60, 52)  # 52 < 8 × 16
    assert transforms.load_rgb(tmp_path / "big.png", 64).size == (300, 260)


def test_skipped_count_counts_distinct_files(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 3, "b": 3}, corrupt={"a/img_900.jpg": "text"})
    source = ImageFolderSource(root, 8)  # 7 files, 1 bad: met once in each of 10 epochs
    loader = Loader(source, global_batch_size=7, seed=0, host_rows=(0, 7))
    for _ in range(10):
        next(loader)
    assert loader.skipped == 1 and loader.sync_skipped() == 1
    assert loader.get_state()["skipped_examples"] == [source.paths.index(str(root / "a/img_900.jpg"))]
    loader.close()
    legacy = Loader(source, global_batch_size=7, seed=0, host_rows=(0, 7))
    legacy.set_state({"next_batch": 10, "skipped": 9, "seed": 0, "global_batch_size": 7})
    assert legacy.skipped == 9  # a state from before the files were listed keeps its count
