"""Losses against their definitions written as loops."""

import pytest
import torch

from fastalign.losses import hinge_triplet_loss, info_nce_loss, positives_from_image_index


def hinge_by_loops(scores, margin, max_violation, positives):
    b = len(scores)
    total = 0.0
    for i in range(b):
        row = [
            max(0.0, margin + scores[i, j] - scores[i, i])
            for j in range(b)
            if not positives[i, j] and j != i
        ]
        col = [
            max(0.0, margin + scores[j, i] - scores[i, i])
            for j in range(b)
            if not positives[j, i] and j != i
        ]
        for costs in (row, col):
            if costs:
                total += max(costs) if max_violation else sum(costs)
    return total


@pytest.mark.parametrize("max_violation", [True, False])
def test_hinge_matches_loops(max_violation):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 7, generator=g, dtype=torch.float64)
    image_index = torch.tensor([0, 1, 1, 2, 3, 3, 3])
    positives = positives_from_image_index(image_index)
    got = hinge_triplet_loss(scores, 0.2, max_violation, positives)
    want = hinge_by_loops(scores, 0.2, max_violation, positives)
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float64))


def test_info_nce_matches_definition():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 5, generator=g, dtype=torch.float64)
    positives = positives_from_image_index(torch.tensor([0, 0, 1, 2, 3]))
    got = info_nce_loss(scores, 0.1, positives)
    total = 0.0
    for i in range(5):
        keep = [j for j in range(5) if j == i or not positives[i, j]]
        total -= torch.log_softmax(scores[i, keep] / 0.1, 0)[keep.index(i)]
        keep = [j for j in range(5) if j == i or not positives[j, i]]
        total -= torch.log_softmax(scores[keep, i] / 0.1, 0)[keep.index(i)]
    torch.testing.assert_close(got, total / 10)


def test_loss_errors():
    with pytest.raises(ValueError, match="square"):
        hinge_triplet_loss(torch.randn(3, 4))
    with pytest.raises(ValueError, match="positive_mask"):
        hinge_triplet_loss(torch.randn(3, 3), positive_mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(torch.randn(3, 3), temperature=0.0)
