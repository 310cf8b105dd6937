"""The ITC queue: wrap-around, counting, copies of the selected negatives, checkpoint state."""
import pytest
import torch

from fiber_det.modeling.coarse.queue import ContrastiveQueue, QueueCheckpoint


def _queue(size=5, ptr=0, total=0):
    torch.manual_seed(0)
    q = ContrastiveQueue(size, feature_dim=4, image_size=2, text_length=3)
    q.image_input_queue.copy_(torch.arange(size, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2))
    q.text_input_queue.copy_(torch.arange(size).view(-1, 1).expand(-1, 3))
    q.text_input_mask_queue.fill_(1)
    q.queue_ptr.fill_(ptr)
    q.queue_total.fill_(total)
    return q


def _batch(n, start=100):
    feats = torch.arange(start, start + n, dtype=torch.float32).view(-1, 1).expand(-1, 4)
    images = torch.arange(start, start + n, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    ids = torch.arange(start, start + n).view(-1, 1).expand(-1, 3)
    return feats, -feats, images, ids, torch.zeros(n, 3, dtype=torch.long)


def test_push_wraps_around_the_end():
    q = _queue(size=5, ptr=4, total=4)
    before = q.image_queue.clone()
    q.push(*_batch(3))
    assert int(q.queue_ptr) == 2 and int(q.queue_total) == 7 and q.num_filled == 5
    # written at 4, 0, 1 in batch order
    assert q.image_queue[0, [4, 0, 1]].tolist() == [100.0, 101.0, 102.0]
    assert q.text_queue[0, [4, 0, 1]].tolist() == [-100.0, -101.0, -102.0]
    assert q.image_input_queue[[4, 0, 1], 0, 0, 0].tolist() == [100.0, 101.0, 102.0]
    assert q.text_input_queue[[4, 0, 1], 0].tolist() == [100, 101, 102]
    assert q.text_input_mask_queue[[4, 0, 1]].sum() == 0
    assert torch.equal(q.image_queue[:, 2:4], before[:, 2:4])  # untouched


def test_total_is_not_capped_and_candidates_are():
    q = _queue(size=5)
    for i in range(4):
        q.push(*_batch(2, start=10 * i))
    assert int(q.queue_total) == 8 and q.num_filled == 5 and int(q.queue_ptr) == 3


def test_more_samples_than_entries_is_an_error():
    with pytest.raises(ValueError, match="exceed the queue size 5"):
        _queue(size=5).push(*_batch(6))


def test_selected_negatives_are_copies_the_next_push_cannot_change():
    q = _queue(size=5, ptr=4, total=5)
    feats, _, images, ids, mask = _batch(2)
    # candidates: 0-1 batch, 2.. queue entries 0..; entry 0 (candidate 2) is overwritten below
    neg_images = q.select_images(torch.tensor([2, 1]), images)
    neg_ids, neg_mask = q.select_texts(torch.tensor([2, 0]), ids, mask)
    q.push(feats, -feats, images, ids, mask)
    assert q.image_input_queue[0, 0, 0, 0] == 101.0
    assert neg_images[:, 0, 0, 0].tolist() == [0.0, 101.0]
    assert neg_ids[:, 0].tolist() == [0, 100] and neg_mask.tolist() == [[1, 1, 1], [0, 0, 0]]


def test_queue_is_not_in_the_state_dict_but_in_its_checkpoint():
    q = _queue(size=5, ptr=3, total=8)
    assert q.state_dict() == {}
    saved = QueueCheckpoint(q).state_dict()
    assert set(saved) == set(ContrastiveQueue.NAMES)
    other = ContrastiveQueue(5, 4, 2, 3)
    QueueCheckpoint(other).load_state_dict(saved)
    for name in ContrastiveQueue.NAMES:
        assert torch.equal(getattr(other, name), getattr(q, name)), name
    with pytest.raises(ValueError, match="image_input_queue: saved"):
        QueueCheckpoint(ContrastiveQueue(5, 4, 3, 3)).load_state_dict(saved)
    with pytest.raises(ValueError, match="missing"):
        QueueCheckpoint(other).load_state_dict({k: v for k, v in saved.items() if k != "queue_ptr"})


def test_feature_queues_start_as_unnormalised_randn():
    q = ContrastiveQueue(4096, 16, 2, 3, keep_inputs=False)
    norms = q.image_queue.norm(dim=0)
    assert abs(float(norms.mean()) - 4.0) < 0.1  # sqrt(16): official torch.randn, not normalised
    assert not hasattr(q, "image_input_queue")
