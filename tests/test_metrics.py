import pytest

from modulemesh.metrics import (
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    summarize,
)

# R[i][j]: accuracy on task j after training task i (3 tasks), b: random-init accuracies.
R = [[90.0, 10.0, 20.0], [70.0, 80.0, 30.0], [60.0, 85.0, 95.0]]
B = [10.0, 12.0, 14.0]


def test_metrics_on_a_known_matrix():
    assert average_accuracy(R) == pytest.approx((60 + 85 + 95) / 3)
    assert average_incremental_accuracy(R) == pytest.approx((90 + (70 + 80) / 2 + (60 + 85 + 95) / 3) / 3)
    # task 0: max(90, 70) - 60 = 30; task 1: max(80) - 85 = -5 -> mean 12.5
    assert forgetting(R) == pytest.approx(12.5)
    assert backward_transfer(R) == pytest.approx(((60 - 90) + (85 - 80)) / 2)
    assert forward_transfer(R, B) == pytest.approx(((10 - 12) + (30 - 14)) / 2)
    s = summarize(R, B)
    assert set(s) == {"average_accuracy", "average_incremental_accuracy", "forgetting", "bwt", "fwt"}


def test_single_task_and_bad_shapes():
    assert (
        forgetting([[50.0]]) == 0.0 and backward_transfer([[50.0]]) == 0.0 and forward_transfer([[50.0]], [1.0]) == 0.0
    )
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[1.0, 2.0]])
    with pytest.raises(ValueError, match="reference"):
        forward_transfer(R, [1.0])
