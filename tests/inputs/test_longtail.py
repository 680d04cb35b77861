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
