"""`kernels.FasterWay`: sampling's few-row products go to whichever way is faster, one thread or
OpenBLAS's own threads, and which way ran never changes a number.

The decisions are checked with a fake clock: each call of a way "takes" the time the test gives
that way. The bits are checked with the real OpenBLAS, each way forced.
"""

import numpy as np
import pytest

from minirlhf import kernels

WORK = 1000                        # multiply-adds of each fake call
BETWEEN = 20e-6                    # seconds of other work between two calls (a decoding step)


class Machine:
    """A fake clock, and two ways whose calls take the time the test sets for each."""

    def __init__(self, ours, theirs):
        self.now = 0.0
        self.seconds = [ours, theirs]
        self.ways = []                                   # the way of each call, in order
        self.chooser = kernels.FasterWay(clock=lambda: self.now)

    def way(self, i):
        def run():
            self.now += self.seconds[i]
            self.ways.append(i)
        return run

    def run(self, n, between=BETWEEN):
        for _ in range(n):
            self.chooser.run("shape", WORK, (self.way(0), self.way(1)), outputs=())
            self.now += between

    def share_theirs(self, last):
        return sum(self.ways[-last:]) / last


def test_the_first_call_of_a_shape_runs_both_ways_and_keeps_ours():
    m = Machine(ours=40e-6, theirs=20e-6)
    m.run(1)
    assert m.ways == [1, 0] and m.chooser.same_bits == {"shape": True}


def test_it_moves_to_the_faster_way_and_stays_there():
    m = Machine(ours=40e-6, theirs=20e-6)
    m.run(3000)
    assert m.chooser.way == 1
    assert m.share_theirs(2000) > 0.95                   # tries of ours are rare


def test_it_keeps_ours_when_the_other_way_is_slower():
    m = Machine(ours=40e-6, theirs=200e-6)
    m.run(5000)
    assert m.chooser.way == 0
    assert m.share_theirs(2000) < 0.05                   # a try every 64 windows at most
    start = m.now
    m.run(5000)
    alone = 5000 * (40e-6 + BETWEEN)
    assert m.now - start < 1.05 * alone                  # once settled, the tries cost under 5%


def test_a_try_that_goes_badly_stops_early():
    m = Machine(ours=40e-6, theirs=40e-3)                # a busy machine: 1000x slower
    m.run(1 + kernels.WARM_CALLS + kernels.WINDOW_CALLS)  # the bits check, then one window
    m.ways.clear()
    m.run(kernels.WARM_CALLS + kernels.WINDOW_CALLS)      # the first try, and after it
    assert m.ways[0] == 1                                 # it did try ...
    assert m.ways.count(1) == kernels.WARM_CALLS + 1      # ... and stopped at its first timed call
    assert m.chooser.wait_after_loss == 2                 # the next try waits longer


def test_when_the_way_in_use_slows_it_tries_the_other_at_once():
    m = Machine(ours=40e-6, theirs=20e-6)
    m.run(500)
    assert m.chooser.way == 1
    m.seconds[1] = 400e-6                                # other processes start: 20x slower
    m.run(3 * (kernels.WARM_CALLS + kernels.WINDOW_CALLS))
    assert m.chooser.way == 0
    m.seconds[1] = 20e-6                                 # ... and stop: back to theirs
    m.run(3000)
    assert m.chooser.way == 1


def test_a_long_gap_between_calls_starts_the_window_again():
    m = Machine(ours=40e-6, theirs=20e-6)
    m.run(1 + 10)                                        # the bits check, then 10 of a window
    assert m.chooser.calls == 10
    m.now += 2 * kernels.MAX_GAP_SECONDS                 # the rest of a training step
    m.run(1)
    assert m.chooser.calls == 1


def test_work_whose_bits_differ_stays_on_our_way():
    chooser = kernels.FasterWay()
    out = np.zeros(3)
    seen = []

    def way(i):                                          # the other way's last bit differs
        def run():
            seen.append(i)
            out[:] = 1.0 if i == 0 else np.nextafter(1.0, 2.0)
        return run

    chooser.run("shape", WORK, (way(0), way(1)), outputs=(out,))
    assert chooser.same_bits == {"shape": False}
    assert (out == 1.0).all()                            # our numbers, computed last
    seen.clear()
    for _ in range(500):
        chooser.run("shape", WORK, (way(0), way(1)), outputs=(out,))
    assert set(seen) == {0}


# ----- the real OpenBLAS: either way, the same numbers ------------------------------------------

@pytest.fixture
def forced(monkeypatch):
    """``forced(way)``: sampling's products held to ``way`` (no tries), at two threads."""
    previous = kernels.get_num_threads()
    kernels.set_num_threads(2)

    def force(way):
        chooser = kernels.FasterWay()
        chooser.way, chooser.wait = way, 10**9
        monkeypatch.setattr(kernels, "_few_row_way", chooser)

    yield force
    kernels.set_num_threads(previous)


@pytest.mark.parametrize("way", [0, 1])
@pytest.mark.parametrize("rows, n_in, n_out", [(32, 384, 1152), (32, 1536, 384), (8, 512, 1024),
                                               (3, 2048, 640), (32, 128, 384)])
def test_a_few_rows_give_the_one_thread_product_bit_for_bit_either_way(forced, way, rows, n_in,
                                                                        n_out):
    """Sampling's products: the numbers one thread gives, so that a seed samples the same tokens
    at any thread count."""
    rng = np.random.default_rng(rows + n_out)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    forced(way)
    ys = [kernels.affine_rows(x, w, b) for _ in range(3)]       # the bits check, then the way
    with kernels.blas_on_one_thread():
        whole = x @ w
    whole += b
    for y in ys:
        assert np.array_equal(y, whole)


def test_openblas_set_to_one_thread_keeps_sampling_on_one(monkeypatch):
    """``OPENBLAS_NUM_THREADS=1`` is the user's word: the chooser never raises OpenBLAS above it."""
    setting = {"threads": 1}
    monkeypatch.setitem(kernels._state, "blas", (lambda: setting["threads"],
                                                 lambda n: setting.update(threads=n)))
    chooser = kernels.FasterWay()
    monkeypatch.setattr(kernels, "_few_row_way", chooser)
    previous = kernels.get_num_threads()
    kernels.set_num_threads(2)
    try:
        x, w = np.ones((32, 384), np.float32), np.ones((384, 1152), np.float32)
        kernels.affine_rows(x, w)
        assert not chooser.same_bits and setting["threads"] == 1
        setting["threads"] = 4
        kernels.affine_rows(x, w)
        assert chooser.same_bits                         # now it may use OpenBLAS's threads
    finally:
        kernels.set_num_threads(previous)
