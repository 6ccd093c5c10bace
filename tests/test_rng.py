import torch

from enkg_dist import rng


def test_member_streams_do_not_depend_on_who_else_is_drawn():
    all_ = rng.member_normal(7, rng.INIT, range(10), (3, 4))
    some = rng.member_normal(7, rng.INIT, [8, 2, 5], (3, 4))
    assert torch.equal(some, all_[[8, 2, 5]])


def test_streams_differ_by_seed_purpose_member_and_key():
    a = rng.member_normal(1, rng.INIT, [0], (50,))
    assert not torch.equal(a, rng.member_normal(2, rng.INIT, [0], (50,)))
    assert not torch.equal(a, rng.member_normal(1, rng.RESAMPLE, [0], (50,)))
    assert not torch.equal(a, rng.member_normal(1, rng.INIT, [1], (50,)))
    assert not torch.equal(rng.member_normal(1, rng.RESAMPLE, [0], (5,), 3, 0),
                           rng.member_normal(1, rng.RESAMPLE, [0], (5,), 3, 1))
    assert torch.equal(a, rng.member_normal(1, rng.INIT, [0], (50,)))
