import pytest
import torch

from modulemesh.data.datasets import load_dataset
from modulemesh.data.scenarios import build_scenario, rotate, split_classes
from modulemesh.errors import ConfigError
from modulemesh.training.buffer import ReplayBuffer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_split_classes_sizes():
    assert split_classes(list(range(10)), 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert [len(c) for c in split_classes(list(range(10)), 3)] == [4, 3, 3]
    with pytest.raises(ConfigError, match="at most 10"):
        split_classes(list(range(10)), 11)


def test_class_incremental_tasks_are_disjoint_and_complete(digits):
    sc = build_scenario(digits, "class_incremental", 5, val_fraction=0.2, seed=0)
    assert len(sc) == 5 and sc.num_classes == 10 and not sc.task_ids_at_test
    seen = []
    for task in sc:
        assert set(task.y_train.tolist()) == set(task.classes) == set(task.y_test.tolist())
        seen += task.classes
        n = task.num_train + len(task.y_val)
        assert len(task.y_val) == round(n * 0.2)
    assert sorted(seen) == list(range(10))
    total = sum(t.num_train + len(t.y_val) for t in sc)
    assert total == len(digits.y_train)  # every training example lands in exactly one task
    assert sum(len(t.y_test) for t in sc) == len(digits.y_test)


def test_class_order_shuffle_and_seed(digits):
    a = build_scenario(digits, "task_incremental", 2, shuffle_classes=True, seed=1)
    b = build_scenario(digits, "task_incremental", 2, shuffle_classes=True, seed=1)
    c = build_scenario(digits, "task_incremental", 2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert a.task_ids_at_test
    assert a[0].classes == b[0].classes and torch.equal(a[0].x_train, b[0].x_train)
    assert c[0].classes == [9, 8, 7, 6, 5]
    with pytest.raises(ConfigError, match="permutation"):
        build_scenario(digits, "class_incremental", 2, class_order=[0, 1])


def test_domain_incremental_permutation_and_rotation(digits):
    sc = build_scenario(digits, "domain_incremental", 3, transform="permutation", seed=0, val_fraction=0.0)
    assert all(t.classes == list(range(10)) for t in sc)
    x0, x1 = sc[0].x_train.reshape(len(sc[0].x_train), -1), sc[1].x_train.reshape(len(sc[1].x_train), -1)
    # Same examples, permuted pixels: the multiset of pixel values per image is unchanged.
    assert torch.equal(x0.sort(1).values, x1.sort(1).values) and not torch.equal(x0, x1)
    rot = build_scenario(digits, "domain_incremental", 2, transform="rotation", val_fraction=0.0)
    assert torch.equal(rot[0].x_test, torch.as_tensor(digits.x_test))  # 0 degrees
    img = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    img[0, 0, 1, 4] = 255  # a dot above the centre
    turned = rotate(img, 180.0)
    assert turned[0, 0, 6, 3] > 200 and turned.dtype == torch.uint8


def test_reservoir_buffer_is_uniform_over_the_stream_and_seeded():
    buf = ReplayBuffer(200, seed=0)
    for t in range(5):
        y = torch.full((2000,), t)
        buf.add(torch.arange(2000).float().unsqueeze(1) + 10000 * t, y, y)
    counts = torch.bincount(buf.y, minlength=5)
    assert len(buf) == 200 and counts.sum() == 200
    assert (counts > 20).all() and (counts < 60).all()  # ~40 each
    assert len(set(buf.x[:, 0].tolist())) == 200  # no duplicates
    again = ReplayBuffer(200, seed=0)
    for t in range(5):
        y = torch.full((2000,), t)
        again.add(torch.arange(2000).float().unsqueeze(1) + 10000 * t, y, y)
    assert torch.equal(again.x, buf.x)
    small = ReplayBuffer(10)
    small.add(torch.zeros(3, 1), torch.arange(3), torch.zeros(3, dtype=torch.long))
    assert len(small) == 3 and small.y.tolist()[:3] == [0, 1, 2]
    x, y, t, _ = small.sample(8, torch.Generator().manual_seed(0))
    assert len(y) == 3 and set(y.tolist()) <= {0, 1, 2}


def test_test_groups_only_for_domain_groups(digits):
    """scenario.test_groups (a shared test set of held-out groups) applies to domain-IL from groups only."""
    with pytest.raises(
        ConfigError, match="test_groups needs scenario.kind=domain_incremental and scenario.transform=groups"
    ):
        build_scenario(digits, "class_incremental", 5, test_groups=[3])
    with pytest.raises(ConfigError, match="test_groups needs"):
        build_scenario(digits, "domain_incremental", 2, transform="permutation", test_groups=[3])


def test_buffer_keeps_decoded_pixels_as_uint8_bit_for_bit_and_floats_as_floats():
    from modulemesh.data.scenarios import as_float

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=g)
    y, t = torch.arange(40), torch.zeros(40, dtype=torch.long)  # y = row index, to find each kept row
    decoded, packed = ReplayBuffer(16, seed=1), ReplayBuffer(16, seed=1)
    decoded.add(as_float(raw), y, t)  # what ER/DER offer: the decoded batch
    packed.add(raw, y, t)  # what ModuleMesh offers: the task's raw rows
    assert decoded.x.dtype == packed.x.dtype == torch.uint8  # a quarter of float32's bytes
    assert torch.equal(decoded.x, packed.x) and torch.equal(decoded.y, packed.y)
    x, yk, _, _ = decoded.all()
    assert torch.equal(as_float(x), as_float(raw)[yk])  # the floats offered, bit for bit
    # A row that is not k / 255 switches the buffer to float storage; the earlier rows stay exact.
    noisy = as_float(raw) + 1e-3
    decoded.add(noisy, y + 100, t)
    x, yk, _, _ = decoded.all()
    assert x.dtype == torch.float32
    old, new = yk < 100, yk >= 100
    assert old.any() and new.any() and torch.equal(x[old], as_float(raw)[yk[old]])
    assert torch.equal(x[new], noisy[yk[new] - 100])
