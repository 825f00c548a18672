"""Loaders for image datasets stored as folders or large archives: CORe50, Tiny ImageNet,
ImageNet-style class folders and multi-domain folders (DomainNet, Office-Home).

Images are decoded once with Pillow, resized to a square ``image_size`` (stretched, not cropped)
as RGB uint8 (N, 3, S, S), and cached as .npz in the cache dir; later loads only read the cache.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from . import safe_pickle
from .array_dataset import ArrayDataset, check_choice, check_fraction, check_int, finalize, require_root
from .cache import cached, file_fingerprint
from .images import check_image_size, decode_images_cached, list_images, resize_batch, subdirs

CORE50_CATEGORIES = [
    "plug_adapter",
    "mobile_phone",
    "scissors",
    "light_bulb",
    "can",
    "glasses",
    "ball",
    "marker",
    "cup",
    "remote_control",
]
CORE50_TEST_SESSIONS = (3, 7, 10)
_CORE50_DIR_RE = re.compile(r"(?:^|/)s(\d+)/o(\d+)/[^/]+$")
_CORE50_FILE_RE = re.compile(r"C_(\d+)_(\d+)_\d+\.\w+$")


# ------------------------------------------------------------------------------------- CORe50


def _core50_ids(paths: Sequence[str], source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Session and object ids (both 1-based) from paths like ``s11/o1/C_11_01_000.png``."""
    if len(paths) == 0:
        raise DataError(f"{source}: lists no images; CORe50 needs at least one image per split")
    sessions = np.empty(len(paths), dtype=np.int64)
    objects = np.empty(len(paths), dtype=np.int64)
    for i, p in enumerate(paths):
        p = str(p).replace("\\", "/")
        m = _CORE50_DIR_RE.search(p) or _CORE50_FILE_RE.search(p)
        if m is None:
            raise DataError(
                f"{source}: cannot read the session/object of image path {p!r}; CORe50 paths look like "
                "'s11/o1/C_11_01_000.png'"
            )
        sessions[i], objects[i] = int(m.group(1)), int(m.group(2))
    if objects.min() < 1 or objects.max() > 50:
        raise DataError(f"{source}: object ids must be 1..50, found {objects.min()}..{objects.max()}")
    return sessions, objects


def _check_core50_labels(labels_pkl: Path, objects: np.ndarray) -> None:
    # The official labels.pkl is nested per scenario/run/batch; only a flat per-image list can be
    # cross-checked against the paths (which are the ground truth for object ids).
    labels = safe_pickle.load(labels_pkl)
    try:
        flat = np.asarray(labels)
    except (ValueError, TypeError):
        return
    if flat.ndim != 1 or len(flat) != len(objects) or not np.issubdtype(flat.dtype, np.integer):
        return
    if not (np.array_equal(flat, objects - 1) or np.array_equal(flat, objects)):
        bad = int(np.flatnonzero((flat != objects - 1) & (flat != objects))[0])
        raise DataError(
            f"{labels_pkl} disagrees with paths.pkl: image {bad} is labelled {flat[bad]} but its path says "
            f"object o{objects[bad]}; the two files come from different releases: download them again"
        )


def _npz_member_rows(path: Path, key: str, chunk: int):
    """Yield row blocks of array ``key`` from an .npz without loading it whole (CORe50's is 8 GB)."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz archive ({exc}); download it again") from None
    with zf:
        member = f"{key}.npy"
        if member not in zf.namelist():
            raise DataError(
                f"{path} has no array '{key}' (it has: {', '.join(n[:-4] for n in zf.namelist())}); "
                "expected CORe50's core50_imgs.npz with key 'x'"
            )
        with zf.open(member) as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
            except ValueError as exc:
                raise DataError(f"{path}: array '{key}' has a bad header ({exc}); download the file again") from None
            if fortran or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
                raise DataError(
                    f"{path}: '{key}' is {dtype} {shape}{' (Fortran order)' if fortran else ''}, expected "
                    "C-ordered uint8 (N, H, W, 3) images"
                )
            yield shape
            row = int(np.prod(shape[1:]))
            for start in range(0, shape[0], chunk):
                n = min(chunk, shape[0] - start)
                try:
                    buf = f.read(n * row)
                except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                    raise DataError(
                        f"{path}: array '{key}' is damaged at image {start} ({exc}); download the file again"
                    ) from None
                if len(buf) != n * row:
                    raise DataError(f"{path}: array '{key}' is truncated at image {start}; download the file again")
                yield np.frombuffer(buf, dtype=np.uint8).reshape((n, *shape[1:]))


def _core50_from_npz(directory: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    npz, paths_pkl, labels_pkl = directory / "core50_imgs.npz", directory / "paths.pkl", directory / "labels.pkl"
    if not paths_pkl.is_file():
        raise DataError(
            f"core50: {directory} has core50_imgs.npz but no paths.pkl; both come with the CORe50 "
            "'npz' release: download paths.pkl next to it"
        )
    paths = safe_pickle.load(paths_pkl)
    if not isinstance(paths, (list, tuple, np.ndarray)) or not all(isinstance(p, (str, bytes)) for p in paths):
        raise DataError(f"{paths_pkl} must hold a list of relative image paths, got {type(paths).__name__}")
    paths = [p.decode("utf-8") if isinstance(p, bytes) else p for p in paths]
    sessions, objects = _core50_ids(paths, paths_pkl)
    if labels_pkl.is_file():
        _check_core50_labels(labels_pkl, objects)

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        rows = _npz_member_rows(npz, "x", chunk=2048)
        shape = next(rows)
        if shape[0] != len(paths):
            raise DataError(
                f"{npz} holds {shape[0]} images but {paths_pkl} lists {len(paths)} paths; "
                "the files come from different releases: download them again"
            )
        x = np.empty((shape[0], 3, size, size), dtype=np.uint8)
        start = 0
        for block in rows:
            x[start : start + len(block)] = resize_batch(block, size)
            start += len(block)
        return {"x": x}, {}

    key = {"npz": file_fingerprint(npz), "paths": file_fingerprint(paths_pkl), "image_size": size}
    arrays, _ = cached("core50", key, build)
    return arrays["x"], sessions, objects


def _core50_from_folders(directory: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    files = [p for s in subdirs(directory) if re.fullmatch(r"s\d+", s.name) for p in list_images(s)]
    if not files:
        raise DataError(
            f"core50: {directory} has no images under s<session>/o<object>/; expected the core50_128x128 folder layout"
        )
    sessions, objects = _core50_ids([str(p.relative_to(directory)) for p in files], directory)
    x = decode_images_cached("core50-folders", directory, files, size)
    return x, sessions, objects


def _core50_source(root: str | os.PathLike | None) -> tuple[str, Path]:
    what = "a directory with core50_imgs.npz + paths.pkl, or with the core50_128x128/ folder"
    path = require_root(root, "core50", what)
    if (path / "core50_imgs.npz").is_file():
        return "npz", path
    if (path / "core50_128x128").is_dir():
        return "folders", path / "core50_128x128"
    if path.is_dir() and any(re.fullmatch(r"s\d+", p.name) for p in subdirs(path)):
        return "folders", path
    raise DataError(f"core50: {path} has neither core50_imgs.npz nor core50_128x128/s*/; root must be {what}")


def load_core50(
    root: str | os.PathLike | None = None,
    label: str = "object",
    image_size: int = 32,
    test_sessions: Sequence[int] = CORE50_TEST_SESSIONS,
) -> ArrayDataset:
    """CORe50 from ``core50_imgs.npz`` + ``paths.pkl`` (+ optional ``labels.pkl``) or the ``core50_128x128`` folders.

    Sessions and objects are read from the image paths. ``test_sessions`` (default s3, s7, s10)
    form the test split, the other sessions the training split; each sample keeps its session
    number in ``train_groups``/``test_groups`` for new-instance scenarios. ``label`` is ``object``
    (50 classes) or ``category`` (10 classes, ``(object-1)//5``). Images are resized to
    ``image_size`` (default 32; the native 128 needs ~8 GB for the full set).
    """
    check_choice(label, ("object", "category"), "core50", "label")
    size = check_image_size(image_size, "core50")
    layout, path = _core50_source(root)
    x, sessions, objects = (_core50_from_npz if layout == "npz" else _core50_from_folders)(path, size)
    try:
        test_set = {int(s) for s in test_sessions}
    except (TypeError, ValueError):
        raise DataError(f"core50: test_sessions must be a list of session numbers, got {test_sessions!r}") from None
    is_test = np.isin(sessions, list(test_set))
    present = sorted(set(sessions.tolist()))
    if is_test.all() or not is_test.any():
        raise DataError(
            f"core50: test_sessions {sorted(test_set)} leave an empty {'train' if is_test.all() else 'test'} "
            f"split; {path} has sessions {present}"
        )
    if label == "object":
        y, namer = objects, (lambda o: f"o{o}")
    else:
        y, namer = (objects - 1) // 5, (lambda c: CORE50_CATEGORIES[c])
    train, test = ~is_test, is_test
    return finalize(
        "core50",
        str(path),
        x[train],
        y[train],
        x[test],
        y[test],
        class_name=namer,
        train_groups=sessions[train],
        test_groups=sessions[test],
        group_names={s: f"s{s}" for s in present},
    )


# ---------------------------------------------------------------------------------- Tiny ImageNet


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc}); extract tiny-imagenet-200 again") from None


def _tiny_words(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    words = {}
    for line in _read_lines(path):
        wnid, _, text = line.partition("\t")
        # "goldfish, Carassius auratus" -> "goldfish": short names read better in plots.
        words[wnid.strip()] = text.split(",")[0].strip() or wnid.strip()
    return words


def _tiny_val(directory: Path, wnids: set[str]) -> tuple[list[Path], list[str]]:
    ann = directory / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(
            f"tinyimagenet: {ann} is missing; it maps val images to classes: extract tiny-imagenet-200 again"
        )
    paths, labels = [], []
    for n, line in enumerate(_read_lines(ann), start=1):
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{ann} line {n} is {line!r}; expected '<file>\\t<wnid>\\t<box>'")
        fname, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in wnids:
            raise DataError(
                f"{ann} line {n}: class {wnid!r} is not in wnids.txt; the files come from different releases"
            )
        image = directory / "val" / "images" / fname
        if not image.is_file():
            raise DataError(f"{ann} line {n} lists {image}, which does not exist; extract tiny-imagenet-200 again")
        paths.append(image)
        labels.append(wnid)
    return paths, labels


def load_tinyimagenet(root: str | os.PathLike | None = None, image_size: int = 64) -> ArrayDataset:
    """Tiny ImageNet (``tiny-imagenet-200/``): 200 classes, train images per class, the val set as test.

    Labels are the wnids in sorted order; ``class_names`` are the first synonym from ``words.txt``.
    Images are RGB, resized to ``image_size`` (default 64, native).
    """
    size = check_image_size(image_size, "tinyimagenet")
    path = require_root(root, "tinyimagenet", "the directory containing tiny-imagenet-200/ (or that directory)")
    if (path / "tiny-imagenet-200").is_dir():
        path = path / "tiny-imagenet-200"
    if not (path / "wnids.txt").is_file():
        raise DataError(
            f"tinyimagenet: {path} has no wnids.txt; root must contain tiny-imagenet-200/ as extracted "
            "from tiny-imagenet-200.zip"
        )
    wnids = [w.strip() for w in _read_lines(path / "wnids.txt")]
    train_paths, train_labels = [], []
    for wnid in wnids:
        images = list_images(path / "train" / wnid / "images")
        if not images:
            raise DataError(
                f"tinyimagenet: {path / 'train' / wnid / 'images'} has no images; every class in wnids.txt "
                "needs training images: extract tiny-imagenet-200 again"
            )
        train_paths += images
        train_labels += [wnid] * len(images)
    val_paths, val_labels = _tiny_val(path, set(wnids))
    x = decode_images_cached("tinyimagenet", path, train_paths + val_paths, size)
    n = len(train_paths)
    words = _tiny_words(path / "words.txt")
    return finalize(
        "tinyimagenet",
        str(path),
        x[:n],
        np.array(train_labels),
        x[n:],
        np.array(val_labels),
        class_name=lambda w: words.get(w, w),
    )


# ----------------------------------------------------------------------------- image folders


def _class_folder_images(directory: Path, label: str) -> tuple[list[Path], list[str]]:
    """Images and class names of an ``<dir>/<class>/*`` tree; images directly in ``dir`` are an error."""
    classes = subdirs(directory)
    if not classes:
        loose = list_images(directory)
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise DataError(
            f"{label}: {directory} has no class subfolders{hint}; put each class's images in {directory}/<class name>/"
        )
    paths, labels = [], []
    for cls in classes:
        images = list_images(cls)
        if not images:
            raise DataError(
                f"{label}: class folder {cls} has no images (.jpg, .jpeg, .png, ...); add images or remove it"
            )
        paths += images
        labels += [cls.name] * len(images)
    return paths, labels


def _split_mask(groups: np.ndarray, fraction: float, seed: int, names: Sequence[str]) -> np.ndarray:
    """Boolean test mask: within each group, a seeded random ``fraction`` goes to test (at least one stays in train).

    Each group's generator is seeded from its *name*, so adding a class or domain does not
    reshuffle the others.
    """
    is_test = np.zeros(len(groups), dtype=bool)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        n_test = min(int(round(len(members) * fraction)), len(members) - 1)
        rng = np.random.default_rng([seed, zlib.crc32(names[g].encode("utf-8"))])
        is_test[rng.permutation(members)[:n_test]] = True
    return is_test


def load_image_folder(
    root: str | os.PathLike | None = None,
    image_size: int = 32,
    test_fraction: float | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """ImageNet-style folders: ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``root/val/...``).

    ``test/`` is preferred when both exist. Without either, pass ``test_fraction`` to split each
    class of ``train/`` deterministically (``seed``). Images are RGB, resized to ``image_size``.
    """
    size = check_image_size(image_size, "image_folder")
    seed = check_int(seed, "image_folder")
    path = require_root(root, "image_folder", "a directory with train/<class>/ and val/<class>/ (or test/<class>/)")
    train_dir = path / "train"
    if not train_dir.is_dir():
        raise DataError(
            f"image_folder: {path} has no train/ folder; expected train/<class>/ and val/<class>/ "
            "(for <domain>/<class>/ folders use dataset 'domains')"
        )
    train_paths, train_labels = _class_folder_images(train_dir, "image_folder")
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if test_dir is not None:
        if test_fraction is not None:
            raise DataError(
                f"image_folder: {path} has a {test_dir.name}/ folder, so test_fraction does not apply; "
                "drop the option or remove the folder"
            )
        test_paths, test_labels = _class_folder_images(test_dir, "image_folder")
        x = decode_images_cached("image_folder", path, train_paths + test_paths, size)
        n = len(train_paths)
        return finalize("image_folder", str(path), x[:n], np.array(train_labels), x[n:], np.array(test_labels))
    if test_fraction is None:
        raise DataError(
            f"image_folder: {path} has neither test/ nor val/; add one with the same class folders, or "
            "pass test_fraction=0.2 to split train/ per class"
        )
    fraction = check_fraction(test_fraction, "image_folder")
    x = decode_images_cached("image_folder", path, train_paths, size)
    names, cls = np.unique(np.array(train_labels), return_inverse=True)
    is_test = _split_mask(cls, fraction, seed, names.tolist())
    y = np.array(train_labels)
    return finalize("image_folder", str(path), x[~is_test], y[~is_test], x[is_test], y[is_test])


def load_domains(
    root: str | os.PathLike | None = None,
    image_size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ArrayDataset:
    """Multi-domain folders ``root/<domain>/<class>/*`` (DomainNet, Office-Home, PACS).

    Each domain is a group (ids in sorted domain order, names in ``group_names``). Each
    (domain, class) is split deterministically: a ``test_fraction`` share goes to test, at least
    one image stays in train. Classes are the union of class folder names over domains.
    """
    size = check_image_size(image_size, "domains")
    fraction = check_fraction(test_fraction, "domains")
    seed = check_int(seed, "domains")
    path = require_root(root, "domains", "a directory with <domain>/<class>/ image folders")
    domains = subdirs(path) if path.is_dir() else []
    if not domains:
        raise DataError(
            f"domains: {path} has no domain folders; expected <domain>/<class>/<image> (e.g. clipart/airplane/001.jpg)"
        )
    paths, labels, domain_ids = [], [], []
    for d, domain in enumerate(domains):
        p, lab = _class_folder_images(domain, "domains")
        paths += p
        labels += lab
        domain_ids += [d] * len(p)
    x = decode_images_cached("domains", path, paths, size)
    y, groups = np.array(labels), np.array(domain_ids, dtype=np.int64)
    # Split per (domain, class) pair so every domain has every one of its classes in both splits.
    pair_names, pair = np.unique(
        np.char.add(np.char.add(np.array([domains[g].name for g in groups]), "/"), y), return_inverse=True
    )
    is_test = _split_mask(pair, fraction, seed, pair_names.tolist())
    return finalize(
        "domains",
        str(path),
        x[~is_test],
        y[~is_test],
        x[is_test],
        y[is_test],
        train_groups=groups[~is_test],
        test_groups=groups[is_test],
        group_names={i: d.name for i, d in enumerate(domains)},
    )
