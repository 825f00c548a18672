"""CORe50, Tiny ImageNet, image folders and multi-domain folders, on tiny trees in the real layouts.

Most images are filled with one colour that encodes their index, so a test can tell exactly which
image ended up in which split (constant images survive resizing, and JPEG nearly so).
"""

import pickle

import numpy as np
import pytest
from PIL import Image

from modulemesh.data import images as images_module
from modulemesh.data import load_dataset
from modulemesh.errors import DataError


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MODULEMESH_CACHE", str(tmp_path / "cache"))


def write_image(path, value, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(np.full(size[::-1], value, np.uint8), "L").save(path)
    else:
        Image.fromarray(np.full((*size[::-1], 3), value, np.uint8)).save(path)


def ids_of(x):
    """The colour value each constant image was filled with."""
    return sorted(int(v) for v in np.rint(x.reshape(len(x), -1).mean(axis=1)))


def forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("images were decoded again instead of read from the cache")

    monkeypatch.setattr(images_module, "decode_images", fail)
    monkeypatch.setattr(images_module, "resize_batch", fail)


# ------------------------------------------------------------------------------------- CORe50

CORE50_SAMPLES = [(s, o) for s in (1, 3, 7, 10, 11) for o in (1, 2, 6)]  # (session, object)


def make_core50_npz(root, side=16, labels=True):
    root.mkdir(parents=True, exist_ok=True)
    x = np.stack([np.full((side, side, 3), 10 * i, np.uint8) for i in range(len(CORE50_SAMPLES))])
    paths = [f"s{s}/o{o}/C_{s:02d}_{o:02d}_000.png" for s, o in CORE50_SAMPLES]
    np.savez(root / "core50_imgs.npz", x=x)
    (root / "paths.pkl").write_bytes(pickle.dumps(paths, protocol=2))
    if labels:
        (root / "labels.pkl").write_bytes(pickle.dumps([o - 1 for _, o in CORE50_SAMPLES], protocol=2))
    return x


def test_core50_npz_sessions_split_and_groups(tmp_path):
    make_core50_npz(tmp_path / "c")
    ds = load_dataset("core50", tmp_path / "c", image_size=16)
    assert ds.x_train.shape == (6, 3, 16, 16) and ds.x_test.shape == (9, 3, 16, 16)
    # Standard NI split: sessions 3, 7, 10 are test, the rest train.
    assert sorted(set(ds.test_groups.tolist())) == [3, 7, 10]
    assert sorted(set(ds.train_groups.tolist())) == [1, 11]
    assert ds.group_names == {1: "s1", 3: "s3", 7: "s7", 10: "s10", 11: "s11"}
    train_ids = [i for i, (s, _) in enumerate(CORE50_SAMPLES) if s in (1, 11)]
    assert ids_of(ds.x_train) == [10 * i for i in train_ids]
    assert ds.label_map == {"1": 0, "2": 1, "6": 2} and ds.class_names == ["o1", "o2", "o6"]
    # Image 0 of train is session 1, object 1.
    assert ds.train_groups[0] == 1 and ds.y_train[0] == 0 and ds.x_train[0].max() == 0


def test_core50_category_labels_and_resize(tmp_path):
    make_core50_npz(tmp_path / "c")
    ds = load_dataset("core50", tmp_path / "c", label="category", image_size=8)
    assert ds.x_train.shape == (6, 3, 8, 8)
    # Objects 1 and 2 are category 0 (plug adapters), object 6 is category 1 (mobile phones).
    assert ds.label_map == {"0": 0, "1": 1} and ds.class_names == ["plug_adapter", "mobile_phone"]
    np.testing.assert_array_equal(ds.y_train, [0, 0, 1, 0, 0, 1])


def test_core50_custom_test_sessions(tmp_path):
    make_core50_npz(tmp_path / "c")
    ds = load_dataset("core50", tmp_path / "c", image_size=16, test_sessions=[11])
    assert set(ds.test_groups.tolist()) == {11} and len(ds.y_train) == 12
    with pytest.raises(
        DataError, match=r"test_sessions \[4\] leave an empty test split; .* sessions \[1, 3, 7, 10, 11\]"
    ):
        load_dataset("core50", tmp_path / "c", test_sessions=[4])


def test_core50_npz_is_cached(tmp_path, monkeypatch):
    make_core50_npz(tmp_path / "c")
    first = load_dataset("core50", tmp_path / "c", image_size=8)
    forbid_decoding(monkeypatch)
    again = load_dataset("core50", tmp_path / "c", image_size=8, label="category")
    np.testing.assert_array_equal(first.x_test, again.x_test)
    assert len(list((tmp_path / "cache").glob("core50-*.npz"))) == 1


def test_core50_labels_pkl_must_agree_with_paths(tmp_path):
    make_core50_npz(tmp_path / "c")
    wrong = [0] * len(CORE50_SAMPLES)
    (tmp_path / "c" / "labels.pkl").write_bytes(pickle.dumps(wrong))
    with pytest.raises(DataError, match=r"labels\.pkl disagrees with paths\.pkl: image 1 is labelled 0 .* object o2"):
        load_dataset("core50", tmp_path / "c")


def test_core50_count_mismatch_and_missing_paths(tmp_path):
    make_core50_npz(tmp_path / "c", labels=False)
    (tmp_path / "c" / "paths.pkl").write_bytes(pickle.dumps(["s1/o1/C_01_01_000.png"] * 14))
    with pytest.raises(DataError, match=r"core50_imgs\.npz holds 15 images but .*paths\.pkl lists 14 paths"):
        load_dataset("core50", tmp_path / "c")
    (tmp_path / "c" / "paths.pkl").unlink()
    with pytest.raises(DataError, match="no paths.pkl"):
        load_dataset("core50", tmp_path / "c")


def test_core50_unparseable_path(tmp_path):
    make_core50_npz(tmp_path / "c", labels=False)
    paths = [f"s{s}/o{o}/C_{s:02d}_{o:02d}_000.png" for s, o in CORE50_SAMPLES]
    paths[4] = "images/cat.png"
    (tmp_path / "c" / "paths.pkl").write_bytes(pickle.dumps(paths))
    with pytest.raises(DataError, match=r"cannot read the session/object of image path 'images/cat.png'"):
        load_dataset("core50", tmp_path / "c")


def test_core50_folder_layout(tmp_path):
    base = tmp_path / "c" / "core50_128x128"
    for i, (s, o) in enumerate(CORE50_SAMPLES):
        write_image(base / f"s{s}" / f"o{o}" / f"C_{s:02d}_{o:02d}_000.png", 10 * i, size=(16, 16))
    ds = load_dataset("core50", tmp_path / "c", image_size=4)
    assert ds.x_train.shape == (6, 3, 4, 4) and ds.x_test.shape == (9, 3, 4, 4)
    test_ids = [10 * i for i, (s, _) in enumerate(CORE50_SAMPLES) if s in (3, 7, 10)]
    assert ids_of(ds.x_test) == test_ids
    assert sorted(set(ds.test_groups.tolist())) == [3, 7, 10]
    np.testing.assert_array_equal(np.bincount(ds.y_test), [3, 3, 3])


def test_core50_bad_root_and_options(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"neither core50_imgs\.npz nor core50_128x128"):
        load_dataset("core50", tmp_path / "empty")
    make_core50_npz(tmp_path / "c")
    with pytest.raises(DataError, match="label must be one of 'object', 'category'"):
        load_dataset("core50", tmp_path / "c", label="session")
    with pytest.raises(DataError, match="image_size must be an integer"):
        load_dataset("core50", tmp_path / "c", image_size=0)


def test_core50_truncated_npz(tmp_path):
    make_core50_npz(tmp_path / "c")
    npz = tmp_path / "c" / "core50_imgs.npz"
    npz.write_bytes(npz.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"core50_imgs\.npz"):
        load_dataset("core50", tmp_path / "c")


# ------------------------------------------------------------------------------- Tiny ImageNet

WNIDS = ["n02", "n01", "n03"]


def make_tiny(root, grey_val=False):
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (d / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\nn03\tbullfrog, Rana\nn99\tother\n")
    for k, wnid in enumerate(WNIDS):
        for j in range(2):
            write_image(d / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", 40 * k + 10 * j, size=(64, 64))
        (d / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    lines = []
    for k, wnid in enumerate(WNIDS):
        name = f"val_{k}.JPEG"
        mode = "L" if grey_val and k == 0 else "RGB"
        write_image(d / "val" / "images" / name, 200 + 10 * k, size=(64, 64), mode=mode)
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return d


def test_tinyimagenet_layout_labels_and_names(tmp_path):
    make_tiny(tmp_path, grey_val=True)
    ds = load_dataset("tinyimagenet", tmp_path)
    assert ds.x_train.shape == (6, 3, 64, 64) and ds.x_test.shape == (3, 3, 64, 64)
    assert ds.label_map == {"n01": 0, "n02": 1, "n03": 2}
    assert ds.class_names == ["goldfish", "salamander", "bullfrog"]
    # Constant-colour JPEGs decode to within a couple of levels of their value.
    means = ds.x_test.reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(means, [200, 210, 220], atol=3)
    np.testing.assert_array_equal(ds.y_test, [1, 0, 2])  # val_0 is n02, val_1 n01, val_2 n03
    assert ds.x_test[0, 0].mean() == pytest.approx(ds.x_test[0, 2].mean())  # grey JPEG became RGB
    np.testing.assert_array_equal(np.bincount(ds.y_train), [2, 2, 2])


def test_tinyimagenet_resize_and_cache(tmp_path, monkeypatch):
    make_tiny(tmp_path)
    small = load_dataset("tinyimagenet", tmp_path / "tiny-imagenet-200", image_size=16)
    assert small.x_train.shape == (6, 3, 16, 16)
    forbid_decoding(monkeypatch)
    again = load_dataset("tinyimagenet", tmp_path, image_size=16)
    np.testing.assert_array_equal(small.x_train, again.x_train)


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(DataError, match="has no wnids.txt"):
        load_dataset("tinyimagenet", tmp_path)
    d = make_tiny(tmp_path)
    ann = d / "val" / "val_annotations.txt"
    ann.write_text("val_0.JPEG\tn77\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations\.txt line 1: class 'n77' is not in wnids\.txt"):
        load_dataset("tinyimagenet", tmp_path)
    ann.write_text("missing.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"line 1 lists .*missing\.JPEG, which does not exist"):
        load_dataset("tinyimagenet", tmp_path)
    for f in (d / "train" / "n03" / "images").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"train/n03/images has no images"):
        load_dataset("tinyimagenet", tmp_path)


def test_corrupt_jpeg_names_the_file(tmp_path):
    d = make_tiny(tmp_path)
    bad = d / "train" / "n01" / "images" / "n01_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match=r"cannot decode image .*n01_1\.JPEG"):
        load_dataset("tinyimagenet", tmp_path)


# ------------------------------------------------------------------------------- image folders


def make_folder_tree(root, splits=("train", "val"), per_class=3):
    value = 0
    for split in splits:
        for cls in ("dog", "cat"):
            for j in range(per_class):
                write_image(root / split / cls / f"{j}.png", value)
                value += 5
    return root


def test_image_folder_train_and_val(tmp_path):
    make_folder_tree(tmp_path / "f")
    ds = load_dataset("image_folder", tmp_path / "f", image_size=6)
    assert ds.x_train.shape == (6, 3, 6, 6) and ds.x_test.shape == (6, 3, 6, 6)
    assert ds.class_names == ["cat", "dog"] and ds.label_map == {"cat": 0, "dog": 1}
    # Files are listed class by class in sorted order: cat (values 15,20,25) then dog (0,5,10).
    assert ids_of(ds.x_train[ds.y_train == 0]) == [15, 20, 25]
    assert ids_of(ds.x_test[ds.y_test == 1]) == [30, 35, 40]


def test_image_folder_prefers_test_over_val(tmp_path):
    make_folder_tree(tmp_path / "f", splits=("train", "val", "test"), per_class=1)
    ds = load_dataset("image_folder", tmp_path / "f", image_size=2)
    assert ids_of(ds.x_test) == [20, 25]


def test_image_folder_split_by_fraction_is_deterministic(tmp_path, monkeypatch):
    make_folder_tree(tmp_path / "f", splits=("train",), per_class=5)
    with pytest.raises(DataError, match="neither test/ nor val/.*test_fraction=0.2"):
        load_dataset("image_folder", tmp_path / "f")
    ds = load_dataset("image_folder", tmp_path / "f", image_size=2, test_fraction=0.4)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [2, 2])
    assert sorted(ids_of(ds.x_train) + ids_of(ds.x_test)) == list(range(0, 50, 5))
    forbid_decoding(monkeypatch)
    again = load_dataset("image_folder", tmp_path / "f", image_size=2, test_fraction=0.4)
    np.testing.assert_array_equal(ds.x_test, again.x_test)


def test_image_folder_errors(tmp_path):
    root = make_folder_tree(tmp_path / "f")
    with pytest.raises(DataError, match="test_fraction does not apply"):
        load_dataset("image_folder", root, test_fraction=0.2)
    (root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/empty has no images"):
        load_dataset("image_folder", root)
    (root / "train" / "empty").rmdir()
    write_image(root / "val" / "bird" / "0.png", 1)
    with pytest.raises(DataError, match="test labels bird never occur in the training labels"):
        load_dataset("image_folder", root)
    (root / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no train/ folder"):
        load_dataset("image_folder", tmp_path)


def test_image_folder_loose_images_and_corrupt_file(tmp_path):
    root = tmp_path / "f"
    write_image(root / "train" / "a.png", 1)
    with pytest.raises(DataError, match=r"train has no class subfolders \(1 images lie directly in it\)"):
        load_dataset("image_folder", root, test_fraction=0.5)
    make_folder_tree(root)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(DataError, match=r"cannot decode image .*cat/broken\.jpg"):
        load_dataset("image_folder", root)


# --------------------------------------------------------------------------------- domains


def make_domains(root, per_class=5):
    value = 0
    for domain in ("photo", "clipart"):
        for cls in ("plane", "car"):
            for j in range(per_class):
                write_image(root / domain / cls / f"{j}.jpg" if j % 2 else root / domain / cls / f"{j}.png", value)
                value += 5
    return root


def test_domains_groups_and_per_domain_class_split(tmp_path):
    make_domains(tmp_path / "d")
    ds = load_dataset("domains", tmp_path / "d", image_size=4, test_fraction=0.2)
    assert ds.group_names == {0: "clipart", 1: "photo"}
    assert ds.class_names == ["car", "plane"]
    assert len(ds.y_train) == 16 and len(ds.y_test) == 4
    # Exactly one test image per (domain, class), so every domain has every class in both splits.
    pairs = sorted(zip(ds.test_groups.tolist(), ds.y_test.tolist()))
    assert pairs == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sorted(set(zip(ds.train_groups.tolist(), ds.y_train.tolist()))) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # clipart images carry values 50..95, photo 0..45: groups match the pixel content.
    train_means = ds.x_train.reshape(16, -1).mean(axis=1)
    assert np.all((train_means >= 48) == (ds.train_groups == 0))


def test_domains_split_is_deterministic_and_seeded(tmp_path):
    make_domains(tmp_path / "d", per_class=10)
    a = load_dataset("domains", tmp_path / "d", image_size=2, test_fraction=0.3)
    b = load_dataset("domains", tmp_path / "d", image_size=2, test_fraction=0.3)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    tests_by_seed = {
        tuple(ids_of(load_dataset("domains", tmp_path / "d", image_size=2, test_fraction=0.3, seed=s).x_test))
        for s in range(4)
    }
    assert len(tests_by_seed) > 1
    assert all(len(t) == 12 for t in tests_by_seed)


def test_domains_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no domain folders"):
        load_dataset("domains", tmp_path / "empty")
    write_image(tmp_path / "flat" / "photo" / "x.png", 3)
    with pytest.raises(DataError, match=r"photo has no class subfolders"):
        load_dataset("domains", tmp_path / "flat")
    make_domains(tmp_path / "d", per_class=2)
    with pytest.raises(DataError, match="test_fraction must be strictly between 0 and 1"):
        load_dataset("domains", tmp_path / "d", test_fraction=1.0)
