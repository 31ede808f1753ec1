"""Rating-typed relations: buckets, and the COO and CSC splits the encoder's paths use."""

import torch

from scalable_rec.graph import MOVIE, RATES, REV_RATES, USER
from scalable_rec.graph.relations import (
    bucket_of,
    incoming,
    message_types,
    parse,
    relation,
    split_coo,
    split_csc,
)


def test_buckets_are_below_3_from_3_to_below_4_and_from_4():
    rating = torch.tensor([0.5, 2.5, 2.99, 3.0, 3.5, 3.99, 4.0, 5.0])
    assert bucket_of(rating).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


def test_message_types_per_mode_and_their_destinations():
    assert message_types("none") == [RATES, REV_RATES]
    rel = message_types("relation")
    assert rel[:3] == [(USER, "rates_lo", MOVIE), (USER, "rates_mid", MOVIE), (USER, "rates_hi", MOVIE)]
    assert incoming("relation")[USER] == rel[3:]
    assert all(parse(et) == (RATES, b) for b, et in enumerate(rel[:3]))
    assert parse(REV_RATES) == (REV_RATES, None)


def test_coo_and_csc_splits_partition_the_edges_by_bucket_in_their_order():
    gen = torch.Generator().manual_seed(0)
    dst = torch.randint(0, 7, (60,), generator=gen).sort().values  # CSC order: by destination
    src = torch.randint(0, 9, (60,), generator=gen)
    rating = torch.randint(1, 11, (60,), generator=gen) / 2
    colptr = torch.zeros(8, dtype=torch.long)
    colptr[1:] = torch.bincount(dst, minlength=7).cumsum(0)
    coo = split_coo(RATES, torch.stack([src, dst]), rating)
    csc = split_csc(RATES, colptr, src, rating)
    assert sum(ei.size(1) for ei in coo.values()) == 60
    for b in range(3):
        et = relation(RATES, b)
        keep = bucket_of(rating) == b
        assert torch.equal(coo[et], torch.stack([src[keep], dst[keep]]))
        ptr, row = csc[et]
        assert torch.equal(row, src[keep])
        assert torch.equal(torch.repeat_interleave(torch.arange(7), ptr.diff()), dst[keep])
