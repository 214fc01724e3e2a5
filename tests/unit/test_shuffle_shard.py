from itertools import combinations

from services.router.engine import shuffle_shard


def test_a_shard_is_k_distinct_sorted_partitions_and_the_same_every_time():
    shard = shuffle_shard("acme", "resize", partitions=16, shard_size=2)
    assert shard == sorted(set(shard)) and len(shard) == 2
    assert all(0 <= p < 16 for p in shard)
    assert shard == shuffle_shard("acme", "resize", partitions=16, shard_size=2)


def test_a_shard_never_exceeds_the_partitions():
    assert shuffle_shard("t", "f", partitions=3, shard_size=5) == [0, 1, 2]


def test_two_tenants_rarely_share_their_whole_shard():
    # With N = 16 and k = 2 there are 120 possible shards: two tenants share all of theirs
    # with probability 1/120. Over 200 tenants (19,900 pairs) expect about 166 such pairs.
    shards = [tuple(shuffle_shard(f"tenant-{i}", "f", partitions=16, shard_size=2))
              for i in range(200)]
    identical = sum(a == b for a, b in combinations(shards, 2))
    assert identical < 19_900 / 120 * 1.5
    # 200 draws from 120 possible shards cover about 97 of them when spread uniformly.
    assert len(set(shards)) > 85
