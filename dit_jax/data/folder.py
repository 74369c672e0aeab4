"""Image folders as random-access sources (grain's `RandomAccessDataSource` protocol).

Two layouts:

- class folders (ImageNet): `ROOT/<class name>/**/<image>`; the class index is the position of
  the folder name in the sorted list of folder names and files are listed in sorted order, the
  same as torchvision's `ImageFolder` (which the official DiT uses), so example i and label k
  mean the same thing in both;
- flat (unconditional): every image anywhere under `ROOT`, no labels (`num_classes == 0`, "y"
  is 0).

Files are recognised by extension (torchvision's list). A file that cannot be decoded at read
time (truncated, not an image despite its name, unreadable) is logged once per process and
replaced by the next readable example, and the record says so (`"skipped": 1`, and the bad
file's index in `"bad_index"`, else -1): batches keep their size, a run never stops on one bad
file, and the pipeline counts the distinct bad files so the train loop can report them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.data.transforms import hflip, preprocess

log = logging.getLogger(__name__)

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASS_MAPPING_FILE = "classes.json"
# The names of `class_folders` shared by training (data.layout) and extraction (--layout).
LAYOUTS = {"auto": None, "classes": True, "flat": False}


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _walk_images(directory: Path, seen: set[str]) -> tuple[list[str], int]:
    """Sorted image paths under `directory` (recursively, following links, as ImageFolder does)
    and the number of other files ignored. A directory below `directory` whose real path is in
    `seen` (a link back to a parent, or to a directory listed already) is skipped with a warning:
    os.walk would follow a link loop some 40 levels deep and list the same images at every level.
    """
    walked, repeated = [], []
    for root, dirs, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen and root != str(directory):
            dirs[:] = []
            repeated.append(root)
            continue
        seen.add(real)
        dirs.sort()  # a deterministic walk, so the same copy of a repeated directory is kept
        walked.append((root, names))
    if repeated:
        log.warning("%s: skipped %d linked director%s already listed under another path (a "
                    "symlink loop or a second link to the same folder), e.g. %s", directory,
                    len(repeated), "y" if len(repeated) == 1 else "ies", repeated[0])
    files, ignored = [], 0
    for root, names in sorted(walked):
        for name in sorted(names):
            if is_image_file(name):
                files.append(os.path.join(root, name))
            elif not name.startswith("."):
                ignored += 1
    return files, ignored


def class_folders_for(layout: str) -> bool | None:
    """`scan_folder`'s class_folders for a layout name: "auto", "classes" or "flat"."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown image folder layout {layout!r}; choose one of "
                         f"{', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def scan_folder(root: str | os.PathLike, class_folders: bool | None = None
                ) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, labels, class names) of the images under `root`.

    class_folders: True for one subfolder per class, False for a flat unconditional folder,
    None to decide from the contents (class folders when `root` holds subfolders and no images
    of its own). Raises with a message that says what is wrong when there is nothing to train on:
    a missing or empty folder, or a class folder without images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    top_images = [e.name for e in entries if e.is_file() and is_image_file(e.name)]
    if class_folders is None:
        class_folders = bool(subdirs) and not top_images

    # Real paths of the directories listed (each is listed once), the root's and the class
    # folders' from the start: a link to one of them inside a class folder is a loop or a copy.
    seen = {os.path.realpath(root)}
    if not class_folders:
        paths, ignored = _walk_images(root, seen)
        if not paths:
            raise ValueError(f"no images in {str(root)!r} (looked for {', '.join(IMG_EXTENSIONS)})")
        if ignored:
            log.warning("%s: ignored %d files that are not images (by extension)", root, ignored)
        return paths, np.zeros(len(paths), np.int32), []

    if not subdirs:
        raise ValueError(f"{str(root)!r} has no class subfolders (expected ROOT/<class>/<images>)")
    if top_images:
        log.warning("%s: %d images directly in the root are not in a class folder and are ignored",
                    root, len(top_images))
    paths, labels, empty, ignored_total = [], [], [], 0
    seen.update(os.path.realpath(root / name) for name in subdirs)
    for index, name in enumerate(subdirs):
        files, ignored = _walk_images(root / name, seen)
        ignored_total += ignored
        if not files:
            empty.append(name)
        paths.extend(files)
        labels.extend([index] * len(files))
    if empty:
        shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise ValueError(f"{len(empty)} class folder(s) of {str(root)!r} hold no images: {shown}")
    if ignored_total:
        log.warning("%s: ignored %d files that are not images (by extension)", root, ignored_total)
    return paths, np.asarray(labels, np.int32), subdirs


class ImageFolderSource:
    """Random access to the ADM-cropped images of a folder: record i is
    {"x": (S, S, 3) float32 in [-1, 1], "y": int32 label, "skipped": 0 or 1, "bad_index": the
    index of the unreadable file replaced, else -1}, before the random
    flip (`augment` does that, so the pipeline can seed it per example)."""

    def __init__(self, root: str | os.PathLike, image_size: int, *,
                 class_folders: bool | None = None, replace_unreadable: bool = True,
                 random_flip: bool = True):
        self.root = str(root)
        self.random_flip = bool(random_flip)
        self.image_size = int(image_size)
        self.paths, self.labels, self.class_names = scan_folder(root, class_folders)
        self.num_classes = len(self.class_names)
        self.element_shape = (self.image_size, self.image_size, 3)
        self.replace_unreadable = replace_unreadable
        self._known_bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (f"ImageFolderSource({self.root!r}, image_size={self.image_size}, "
                f"{len(self)} images, {self.num_classes} classes)")

    def load(self, index: int) -> np.ndarray | None:
        """The preprocessed image `index`, or None (logged once per process) if its file cannot
        be read as an image."""
        try:
            return preprocess(self.paths[index], self.image_size)
        except Exception as err:  # noqa: BLE001 — any decoder failure means "skip this file"
            if index not in self._known_bad:
                self._known_bad.add(index)
                log.warning("skipping unreadable image %s: %s: %s", self.paths[index],
                            type(err).__name__, err)
            return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        image = self.load(index)
        skipped = image is None
        if skipped and not self.replace_unreadable:
            return {"x": np.zeros(self.element_shape, np.float32), "y": np.int32(self.labels[index]),
                    "skipped": np.int32(1), "bad_index": np.int64(index)}
        source_index = index
        # Deterministic stand-in: the next readable file, so the batch (and every host's view of
        # it) does not depend on timing or on which worker hit the bad file.
        for step in range(1, len(self) if skipped else 0):
            source_index = (index + step) % len(self)
            image = self.load(source_index)
            if image is not None:
                break
        if image is None:
            raise RuntimeError(f"no readable image in {self.root!r}: all {len(self)} files failed")
        return {"x": image, "y": np.int32(self.labels[source_index]), "skipped": np.int32(skipped),
                "bad_index": np.int64(index if skipped else -1)}

    def augment(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """RandomHorizontalFlip(p=0.5), as released; off with random_flip=False (data whose
        mirror image is another thing, such as digits or letters). Flipping after normalising is
        exact: it only moves values."""
        if rng.random() < 0.5 and self.random_flip:
            record = dict(record, x=hflip(record["x"]))
        return record


def save_class_mapping(directory: str | os.PathLike, class_names: list[str]) -> Path:
    """Write `classes.json` ({"class_names": [...], "class_to_idx": {...}}) into `directory`."""
    path = Path(directory) / CLASS_MAPPING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"class_names": list(class_names),
               "class_to_idx": {name: i for i, name in enumerate(class_names)}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_class_mapping(directory: str | os.PathLike) -> list[str]:
    return list(json.loads((Path(directory) / CLASS_MAPPING_FILE).read_text())["class_names"])


__all__ = ["CLASS_MAPPING_FILE", "IMG_EXTENSIONS", "LAYOUTS", "ImageFolderSource",
           "class_folders_for", "load_class_mapping", "save_class_mapping", "scan_folder"]
