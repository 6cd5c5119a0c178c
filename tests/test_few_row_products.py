"""`kernels.FewRowProducts`: sampling's few-row products go to whichever way is faster, one thread or
OpenBLAS's own threads, and which way ran never changes a number.

A fake clock and a fake OpenBLAS thread count stand in for the machine: each product "takes" the
time the test gives the way it ran on, so every decision is checked on every machine.
"""

import numpy as np
import pytest

from minirlhf import kernels

PRODUCT = 1000                     # multiply-adds of each fake product
BETWEEN = 20e-6                    # seconds of other work between two products (a decoding step)


@pytest.fixture
def fake_blas(monkeypatch):
    """OpenBLAS's thread count as a dict entry, and two threads for minirlhf."""
    setting = {"threads": 2}
    monkeypatch.setitem(kernels._state, "blas", (lambda: setting["threads"],
                                                 lambda n: setting.update(threads=n)))
    monkeypatch.setitem(kernels._state, "threads", 2)
    return setting


class Machine:
    """A fake clock, and products whose time depends on the OpenBLAS thread count they ran at."""

    def __init__(self, blas, one_thread, threaded):
        self.blas, self.now = blas, 0.0
        self.seconds = {1: one_thread, 2: threaded}    # a product's time, by thread count
        self.ways = []                                  # the thread count of each product
        self.out = np.zeros(1)
        self.products = kernels.FewRowProducts(clock=lambda: self.now)

    def product(self):
        threads = self.blas["threads"]
        self.now += self.seconds[threads]
        self.out[0] = 1.0
        self.ways.append(threads)

    def run(self, n, between=BETWEEN):
        for _ in range(n):
            self.products.run(self.product, self.out, "shape", PRODUCT)
            self.now += between

    def share_threaded(self, last):
        return sum(w == 2 for w in self.ways[-last:]) / last


def test_it_moves_to_the_faster_way_and_stays_there(fake_blas):
    m = Machine(fake_blas, one_thread=40e-6, threaded=20e-6)
    m.run(3000)
    assert m.products.threaded
    assert m.share_threaded(2000) > 0.95                 # tries of one thread are rare


def test_it_stays_on_one_thread_when_the_threads_are_slower(fake_blas):
    m = Machine(fake_blas, one_thread=40e-6, threaded=200e-6)
    m.run(5000)
    assert not m.products.threaded
    assert m.share_threaded(2000) < 0.05                 # a try every 64 windows at most
    start = m.now
    m.run(5000)
    alone = 5000 * (40e-6 + BETWEEN)
    assert m.now - start < 1.05 * alone                  # once settled, the tries cost under 5%


def test_a_try_that_goes_badly_stops_early(fake_blas):
    m = Machine(fake_blas, one_thread=40e-6, threaded=40e-3)     # a busy machine: 1000x slower
    m.run(1 + kernels.WARM_CALLS + kernels.WINDOW_CALLS)          # the bits check, one window
    m.ways.clear()
    m.run(kernels.WARM_CALLS + kernels.WINDOW_CALLS)              # the first try, and after it
    assert m.ways[0] == 2                                         # it did try ...
    assert m.ways.count(2) == 1                                   # ... and stopped after one product
    assert m.products.wait_after_loss == 2                        # the next try waits longer


def test_when_the_way_in_use_slows_it_tries_the_other_at_once(fake_blas):
    m = Machine(fake_blas, one_thread=40e-6, threaded=20e-6)
    m.run(500)
    assert m.products.threaded
    m.seconds[2] = 400e-6                                # other processes start: threads 20x slower
    m.run(3 * (kernels.WARM_CALLS + kernels.WINDOW_CALLS))
    assert not m.products.threaded
    m.seconds[2] = 20e-6                                 # ... and stop: back to the threads
    m.run(3000)
    assert m.products.threaded


def test_a_long_gap_between_products_starts_the_window_again(fake_blas):
    m = Machine(fake_blas, one_thread=40e-6, threaded=20e-6)
    m.run(1 + 10)                                        # the bits check, then 10 of a window
    assert m.products.calls == 10
    m.now += 2 * kernels.MAX_GAP_SECONDS                 # the rest of a training step
    m.run(1)
    assert m.products.calls == 1


def test_a_shape_whose_bits_differ_stays_on_one_thread(fake_blas):
    products = kernels.FewRowProducts()
    out = np.zeros(3)
    seen = []

    def product():                                       # the threads' last bit differs
        seen.append(fake_blas["threads"])
        out[:] = 1.0 if fake_blas["threads"] == 1 else np.nextafter(1.0, 2.0)

    products.run(product, out, "shape", PRODUCT)
    assert products.same_bits == {"shape": False}
    assert (out == 1.0).all()                            # the one-thread product, computed last
    seen.clear()
    for _ in range(500):
        products.run(product, out, "shape", PRODUCT)
    assert set(seen) == {1}


def test_at_one_thread_products_stay_on_one_thread(fake_blas, monkeypatch):
    monkeypatch.setitem(kernels._state, "threads", 1)
    m = Machine(fake_blas, one_thread=40e-6, threaded=1e-6)
    m.run(500)
    assert set(m.ways) == {1}


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("rows, n_in, n_out", [(32, 384, 1152), (32, 1536, 384), (8, 512, 1024),
                                               (3, 2048, 640), (32, 128, 384)])
def test_a_few_rows_give_the_one_thread_product_bit_for_bit_either_way(monkeypatch, threaded, rows,
                                                                        n_in, n_out):
    """With the real OpenBLAS: `affine_rows` at two threads, on either way, gives the numbers one
    thread gives, so that a seed samples the same tokens at any thread count."""
    rng = np.random.default_rng(rows + n_out)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    chooser = kernels.FewRowProducts()
    chooser.threaded = threaded
    monkeypatch.setattr(kernels, "_few_row_products", chooser)
    previous = kernels.get_num_threads()
    kernels.set_num_threads(2)
    try:
        ys = [kernels.affine_rows(x, w, b) for _ in range(3)]   # the bits check, then the way chosen
    finally:
        kernels.set_num_threads(previous)
    with kernels.blas_on_one_thread():
        whole = x @ w
    whole += b
    for y in ys:
        assert np.array_equal(y, whole)
