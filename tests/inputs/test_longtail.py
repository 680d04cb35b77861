import numpy as np

from ballad_cache.inputs.longtail import exponential_profile, group_sizes, imbalance_factor


def test_cifar100_lt_if100_profile_without_images():
    counts = exponential_profile(100, 500, 100)
    assert sum(counts) == 10847
    assert counts[0] == 500 and counts[-1] == 5
    assert group_sizes(counts) == {"many": 35, "medium": 35, "few": 30}


def test_fmnist_lt_profile_and_groups():
    counts = exponential_profile(10, 500, 100)
    assert counts == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert group_sizes(counts) == {"many": 4, "medium": 3, "few": 3}
    assert imbalance_factor(counts) == 100.0


def test_cifar100_lt_other_factors_shrink_less():
    assert sum(exponential_profile(100, 500, 10)) == 19573
    assert sum(exponential_profile(100, 500, 50)) == 12608


def test_a_class_without_a_val_image_is_named_once():
    from ballad_cache.inputs.longtail import unseen_classes

    names = [f"c{i}" for i in range(8)]
    assert unseen_classes(np.array([0, 1, 2, 3, 4, 5, 6, 7, 7]), names) is None
    message = unseen_classes(np.array([0, 0, 2]), names)
    assert message.startswith("warning: 6 class(es) have no val image (c1, c3, c4, c5, c6 and 1 more)")
    assert "\n" not in message
