"""The spool on its own: bounded, and shared safely by the writers of one directory."""
from __future__ import annotations

from proxy.querylog import Spool, _Batch


def _batch(n, start=0):
    rows = [(1700000000.0 + i, 10, 0, "fp", "select", ["t"], [], 1, 5, None, "db", "u", "app", None, 1, i,
             False, "simple", None, None, None, "p", None) for i in range(start, start + n)]
    return _Batch(rows, {"fp": ["SELECT $1", "select", ["t"], [], None, 1700000000.0, 1700000000.0]}, n)


def _replay_all(spool):
    rows = []
    while (claim := spool.claim_oldest()) is not None:
        for line in claim[1].read().splitlines():
            rows.extend(spool.parse_line(line).rows)
        spool.release(claim, replayed=True)
    return rows


def test_rows_come_back_in_order_and_the_spool_empties(tmp_path):
    spool = Spool(str(tmp_path), "p1", 10_000_000)
    spool.open()
    assert spool.append(_batch(500)) == 500
    assert spool.append(_batch(300, start=500)) == 300

    rows = _replay_all(spool)
    assert [r[15] for r in rows] == list(range(800))
    assert rows[0] == _batch(1).rows[0]
    assert not spool.has_segments() and spool.bytes == 0


def test_a_full_spool_takes_only_what_fits(tmp_path):
    spool = Spool(str(tmp_path), "p1", 20_000)
    spool.open()
    kept = spool.append(_batch(1000))
    assert 0 < kept < 1000
    assert spool.append(_batch(10)) == 0
    assert len(_replay_all(spool)) == kept
    assert spool.append(_batch(10)) == 10     # room again once replayed


def test_a_live_writers_segment_is_not_taken_until_it_rotates(tmp_path):
    writer, other = Spool(str(tmp_path), "p1", 10_000_000), Spool(str(tmp_path), "p2", 10_000_000)
    writer.open()
    other.open()
    writer.append(_batch(10))

    assert other.claim_oldest() is None
    writer.rotate()
    assert len(_replay_all(other)) == 10


def test_segments_left_by_a_dead_writer_are_adopted(tmp_path):
    dead = Spool(str(tmp_path), "host:100", 10_000_000)
    dead.open()
    dead.append(_batch(20))
    dead.close()                               # what the end of its process does to its lock

    successor = Spool(str(tmp_path), "host:200", 10_000_000)
    successor.open()
    assert successor.bytes > 0
    assert len(_replay_all(successor)) == 20
