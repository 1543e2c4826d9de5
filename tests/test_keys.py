"""Key layout: one purchase stays in one Cluster slot whatever text users send."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from gateway.models import Sale
from gateway.store.keys import KeySpace, new_order_no, shard_of, shard_of_order, valid_sku

any_text = st.text(min_size=1, max_size=80)


@given(sku=any_text, key=any_text, user_id=st.integers(0, 2**63 - 1), shard=st.integers(0, 1023))
def test_user_text_never_moves_a_purchase_out_of_its_slot(sku, key, user_id, shard):
    keys = KeySpace("seckill").shard(sku, shard)
    order_no = new_order_no(shard)
    purchase_keys = [keys.idempotency(user_id, key), keys.stock, keys.units, keys.buyers,
                     keys.order(order_no), keys.order_index, keys.stream,
                     keys.transfers_out, keys.transfers_in]
    slots = {key_slot(k.encode()) for k in purchase_keys}
    assert slots == {key_slot(KeySpace("seckill").tag(shard).encode())}


@given(user_id=st.integers(0, 2**63 - 1), shards=st.integers(1, 1024))
def test_a_user_always_maps_to_one_shard(user_id, shards):
    assert shard_of(user_id, shards) == user_id % shards
    assert 0 <= shard_of(user_id, shards) < shards


@given(shard=st.integers(0, 1023))
def test_order_numbers_name_their_shard(shard):
    assert shard_of_order(new_order_no(shard)) == shard


def test_order_number_parsing_rejects_garbage():
    for text in ("", "x", "12", "1-abc", "-1-" + "0" * 32, "99999-" + "0" * 32, "1-" + "G" * 32):
        assert shard_of_order(text) is None


@given(stock=st.integers(1, 100_000), shards=st.integers(1, 64))
def test_stock_splits_into_disjoint_ranges_covering_every_unit(stock, shards):
    sale = Sale("s", stock, shards=shards)
    covered = []
    for shard in range(shards):
        lo, hi = sale.shard_range(shard)
        covered.extend(range(lo, hi + 1))
    assert covered == list(range(1, stock + 1))


def test_sku_rules():
    assert valid_sku("iphone-15_pro.256GB:black")
    for bad in ("", "a{b}", "a}b", "a b", "é", "x" * 65, "-x", "a/b", "a\x00b"):
        assert not valid_sku(bad)
