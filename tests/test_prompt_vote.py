"""The batch-wise prompt vote of l2p-pytorch / dualprompt-pytorch (prompt.py @ f7bc994 / 7eb457d):
torch.unique(idx, return_counts=True, sorted=True); pad ids with min(idx) and counts with 0 up to
pool_size; torch.topk(counts, top_k); every sample gets those ids. Expected ids below: the unique
ids and counts are worked out by hand from the per-sample picks, the order among tied counts is
torch.topk's on the hand-written count vector (the reference's own tie-break)."""
import torch

from methods.prompts import select_topk


def scores_picking(rows, pool_size):
    """Scores whose per-sample top-k is exactly ``rows`` (descending score = list order)."""
    s = torch.zeros(len(rows), pool_size)
    for b, picks in enumerate(rows):
        for r, i in enumerate(picks):
            s[b, i] = 10.0 - r
    return s


def reference_pick(ids, counts, k):
    return [ids[i] for i in torch.topk(torch.tensor(counts), k=k).indices.tolist()]


def test_per_sample_selection_is_untouched():
    s = scores_picking([[3, 1], [0, 2]], 5)
    assert select_topk(s, 2).tolist() == [[3, 1], [0, 2]]


def test_tie_at_the_cut_is_broken_by_torch_topk_not_by_the_smaller_id():
    # pool 4, k 2; picks {1,0}, {1,3}, {0,3}: unique [0, 1, 3], counts [2, 2, 2]; pad to 4 with
    # min id 0 and count 0 -> ids [0, 1, 3, 0], counts [2, 2, 2, 0]
    s = scores_picking([[1, 0], [1, 3], [0, 3]], 4)
    want = reference_pick([0, 1, 3, 0], [2, 2, 2, 0], 2)
    got = select_topk(s, 2, batchwise=True)
    assert got.tolist() == [want] * 3


def test_six_way_tie_of_single_votes():
    # pool 10, k 3; picks {0,1,2} and {3,4,5}: unique [0..5], counts [1]*6, padded with id 0, count 0
    s = scores_picking([[0, 1, 2], [3, 4, 5]], 10)
    want = reference_pick([0, 1, 2, 3, 4, 5, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0], 3)
    assert select_topk(s, 3, batchwise=True).tolist() == [want, want]


def test_padding_repeats_the_smallest_picked_id():
    # pool 6, k 2; picks {4,2}, {4,5}, {4,2}: unique [2, 4, 5], counts [2, 3, 1]; padded to
    # ids [2, 4, 5, 2, 2, 2], counts [2, 3, 1, 0, 0, 0]: the top 2 counts are 3 (id 4), 2 (id 2)
    s = scores_picking([[4, 2], [4, 5], [4, 2]], 6)
    assert reference_pick([2, 4, 5, 2, 2, 2], [2, 3, 1, 0, 0, 0], 2) == [4, 2]
    assert select_topk(s, 2, batchwise=True).tolist() == [[4, 2]] * 3


def test_no_padding_when_every_id_was_picked():
    # pool 3, k 2; picks {0,1}, {2,1}, {2,0}, {1,2}: unique [0, 1, 2], counts [2, 3, 3]
    s = scores_picking([[0, 1], [2, 1], [2, 0], [1, 2]], 3)
    want = reference_pick([0, 1, 2], [2, 3, 3], 2)
    assert sorted(want) == [1, 2]
    assert select_topk(s, 2, batchwise=True).tolist() == [want] * 4
