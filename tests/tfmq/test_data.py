import numpy as np

from tfmq.data import HELDOUT_PER_CLASS, split


def test_split_is_stratified_disjoint_and_seeded():
    a, b = split(), split()
    assert np.array_equal(a.train_labels, b.train_labels) and np.array_equal(a.heldout_images, b.heldout_images)
    assert len(a.heldout_labels) == 10 * HELDOUT_PER_CLASS and len(a.train_labels) == 5000 - 10 * HELDOUT_PER_CLASS
    assert np.bincount(a.heldout_labels).tolist() == [HELDOUT_PER_CLASS] * 10
    # no held-out image also sits in the training set
    train = {x.tobytes() for x in a.train_images}
    assert not any(x.tobytes() in train for x in a.heldout_images)
    assert a.train_images.shape[1:] == (1, 32, 32)
    assert a.train_images.min() == -1.0 and a.train_images.max() == 1.0
    # shuffled: the first training labels are not one class (the raw data is class-ordered)
    assert len(set(a.train_labels[:50].tolist())) > 5
