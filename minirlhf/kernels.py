"""The CPU scheduling of the fused ops: threads for the big row-wise kernels, the BLAS, freed memory,
and the kernels themselves (the end of the file), named by what they compute.

`functional.py` states each op's math and calls the kernel here; `reference.py` holds the plain
version of each. Measurements behind the constants below: benchmarks/README.md.

Threads. NumPy runs each ufunc on one core. The large fused ops of a GPT step (the linear layers,
attention, GELU, cross-entropy) work on rows that do not depend on each other, so they are cut into
blocks of rows, and the caller's thread and a small pool take the blocks one at a time until none
is left (NumPy and the BLAS release Python's GIL while they compute). Each op writes the loop body
it would write for all rows at once:

    def block(lo, hi):                       # rows lo:hi of x (N, C) and of the output y
        xp.exp(x[lo:hi], out=y[lo:hi])
    kernels.for_rows(block, N, row_size=C)

Elementwise blocks hold about 256K numbers (1 MB of float32): fewer, longer NumPy calls win, because
every call hands Python's GIL between threads and a thread left waiting for it is put to sleep.
Work that calls the BLAS (matrix products) is cut into two blocks per thread; the linear layer's
backward shares out its two products, gx and gW, as blocks of two kinds (`for_blocks`): on two
threads gW is one thread's whole product, and a training step gives one thread's numbers to the
bit wherever the BLAS computes a block of rows as it does the whole (OpenBLAS's Haswell kernels
do; tested). On CuPy arrays, small inputs or one thread, ``fn`` is simply called once.

The BLAS. Two thread pools on the same cores fight, so while our threads run matrix products
OpenBLAS is held to one thread each (and set back after). Products too small to split run on the
calling thread with OpenBLAS held to one thread too, except the few-row products of sampling (one
new token a row): there OpenBLAS's own threads are 1.2-1.35x faster on a quiet machine and up to
8x slower on a busy one (they spin between calls), so `FasterWay` times both ways as it goes and
uses the faster, checking first that both give the same bits.

Freed memory. glibc gives freed blocks larger than 128 KB back to the operating system, and the next
training step, which allocates the same activations again, faults them back in page by page. On
first use minirlhf tells glibc to keep freed memory below 32 MB for reuse (``mallopt``), as
PyTorch's and CuPy's GPU memory pools do. The cost: the process does not shrink after its peak. ``MINIRLHF_KEEP_MEMORY=0`` turns this off.

``MINIRLHF_NUM_THREADS`` (or ``set_num_threads``) sets the number of threads; by default, the CPUs
this process may use, at most 8.
"""

import contextlib
import ctypes
import itertools
import os
import queue
import threading
import time

from . import backend

BLOCK_NUMBERS = 1 << 18          # numbers per block of an elementwise op: 1 MB of float32
MIN_PARALLEL_NUMBERS = 1 << 19   # below two blocks, threads cost more than they save ...
MIN_PARALLEL_PRODUCTS = 1 << 22  # ... and for matrix work, below this many multiply-adds
MIN_ROWS_PER_WEIGHT = 64         # rows per block when every block reads one shared weight
BLAS_BLOCKS_PER_THREAD = 2       # matrix work: blocks per thread (see "Sharing the blocks")

_state = {"threads": None, "pool": None, "pool_pid": None, "memory_kept": None,
          "blas": None, "blas_regions": 0, "blas_before": None}
_lock = threading.Lock()


def get_num_threads():
    """The number of threads minirlhf's row-wise kernels use."""
    if _state["threads"] is None:
        keep_freed_memory()
        env = os.environ.get("MINIRLHF_NUM_THREADS")
        if env is not None:
            if not env.strip().isdigit() or int(env) < 1:
                raise ValueError(f"MINIRLHF_NUM_THREADS must be a positive integer, got {env!r}")
            set_num_threads(int(env))
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            set_num_threads(min(cpus or 1, 8))
    return _state["threads"]


def set_num_threads(n):
    """Use ``n`` threads for minirlhf's row-wise kernels (1: blocks run one after another)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: need a positive int, got {n!r}")
    keep_freed_memory()         # as `get_num_threads` does on first use: called first, this must too
    with _lock:
        if _state["pool"] is not None and _state["pool_pid"] == os.getpid():
            _state["pool"].shutdown()
        _state["threads"] = n
        _state["pool"] = _Pool(n - 1) if n > 1 else None
        _state["pool_pid"] = os.getpid()


def for_rows(fn, n_rows, row_size, blas=False, shared_weight=False, xp=None):
    """Call ``fn(lo, hi)`` on blocks of rows that cover ``range(n_rows)``; its results, in order.

    ``row_size``: numbers per row, which sets the block size (for BLAS work, multiply-adds per row).
    ``fn`` must only write its own rows of its outputs; what it returns (a partial sum, say) comes
    back as a list, one per block.
    ``blas=True``: ``fn`` calls the BLAS, so blocks are few and large (a couple per thread).
    ``shared_weight=True``: every block multiplies by the same weight, so each block needs
    ``MIN_ROWS_PER_WEIGHT`` rows (a few rows by a shared weight read the whole weight for little work).
    ``xp``: the array module; on CuPy ``fn(0, n_rows)`` runs once, the GPU being parallel already.
    """
    total = n_rows * row_size
    if xp is not None and xp.__name__ != "numpy":
        return [fn(0, n_rows)]                                # GPU: parallel already
    if total < (MIN_PARALLEL_PRODUCTS if blas else MIN_PARALLEL_NUMBERS):
        return one_after_another(fn, [(0, n_rows)], blas)     # too little work to split
    threads = get_num_threads()
    if blas:  # a few blocks per thread, if the product is big enough and OpenBLAS can be held to one
        min_rows = MIN_ROWS_PER_WEIGHT if shared_weight else 1
        n_blocks = min(BLAS_BLOCKS_PER_THREAD * threads, n_rows // min_rows) if _blas_splits() else 1
    else:     # blocks of BLOCK_NUMBERS numbers
        n_blocks = min(n_rows, total // BLOCK_NUMBERS)
    if n_blocks <= 1:
        return one_after_another(fn, [(0, n_rows)], blas)
    return for_blocks(fn, cut_rows(n_rows, n_blocks), blas)


def cut_rows(n_rows, n_blocks):
    """[(lo, hi)]: ``n_blocks`` blocks of rows, as equal as they come, that cover range(n_rows)."""
    bounds = [n_rows * i // n_blocks for i in range(n_blocks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def for_blocks(fn, blocks, blas=False):
    """``[fn(*block) for block in blocks]``, the blocks shared by the threads, each taken by the
    first thread free (`for_rows` chose them; `affine_rows_grads` gives two kinds)."""
    threads = get_num_threads()
    if threads > 1 and _state["pool_pid"] != os.getpid():
        set_num_threads(threads)        # a forked child: the parent's pool threads did not come along
    job = _Job(fn, blocks)
    if threads == 1 or threading.current_thread().name.startswith("minirlhf"):
        job.work()                                            # one after another
    else:
        with blas_on_one_thread() if blas else contextlib.nullcontext():
            _state["pool"].wake(job)
            job.work()                                        # this thread takes blocks too
            job.all_done.acquire()                            # no block is still running
    if job.error is not None:
        raise job.error
    return job.results


def one_after_another(fn, blocks, blas):
    """``[fn(*block) for block in blocks]`` on the calling thread: matrix work too small to split
    is small enough that OpenBLAS's own threads, spinning between calls, cost more than they save
    (see `blas_on_one_thread`), so it is held to one thread too."""
    with _blas_region() if blas else contextlib.nullcontext():
        return [fn(*block) for block in blocks]


def _blas_splits():
    """Whether matrix work may be split across our threads: more than one, and OpenBLAS found (it
    must be held to one thread while they run)."""
    return get_num_threads() > 1 and _openblas() is not None


# ----- sharing the blocks ---------------------------------------------------------------------------
#
# A thread woken from sleep starts late, so a fixed share per thread would make the caller wait for
# the last one; instead the blocks sit in a `_Job` and each thread takes the next one when it is
# free: the caller starts at once, and a pool thread that wakes late finds fewer blocks left.

class _Job:
    """One call of `for_blocks`: its blocks, taken one at a time by whichever thread is free."""

    def __init__(self, fn, blocks):
        self.fn, self.blocks = fn, blocks
        self.results = [None] * len(blocks)
        self.error = None
        self._next = itertools.count()             # next() on a count is atomic under the GIL
        self._finished = itertools.count(1)
        self.all_done = threading.Lock()           # held until the last block has finished
        self.all_done.acquire()

    def work(self):
        """Run blocks until none is left to take."""
        for i in self._next:
            if i >= len(self.blocks):
                return
            try:
                self.results[i] = self.fn(*self.blocks[i])
            except BaseException as e:             # kept for the caller, who raises it
                self.error = e
            if next(self._finished) == len(self.blocks):
                self.all_done.release()


class _Pool:
    """``n`` threads that sleep until a job is handed to them, then take its blocks."""

    def __init__(self, n):
        self.jobs = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._run, name=f"minirlhf-{i}", daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()

    def wake(self, job):
        for _ in self.threads:
            self.jobs.put(job)

    def shutdown(self):
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()

    def _run(self):
        while (job := self.jobs.get()) is not None:
            job.work()


def add_up(parts):
    """Sum per-block results elementwise: ``[(gw, gb), (gw, gb)] -> (gw + gw, gb + gb)``."""
    total = list(parts[0])
    for part in parts[1:]:
        for i, value in enumerate(part):
            total[i] += value
    return tuple(total)


# ----- OpenBLAS's thread count ----------------------------------------------------------------------

def _openblas():
    """(get, set) of the thread count of the OpenBLAS that NumPy loaded, or None when it cannot be
    found (MKL, Apple's Accelerate, a platform without /proc): then matrix products are not split
    and the BLAS threads them on its own."""
    if _state["blas"] is None:
        _state["blas"] = _find_openblas() or False
    return _state["blas"] or None


def _find_openblas():
    # NumPy is imported by now (backend.py), so its BLAS shows in the process's memory map
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_", "64_"), ("", "64_"), ("scipy_", ""), ("", "")):
            get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, put
    return None


# OpenBLAS runs a matrix-vector product of fewer numbers than this on one thread anyway (its rule:
# 2304 × GEMM_MULTITHREAD_THRESHOLD, which is 4)
GEMV_ONE_THREAD_BELOW = 2304 * 4
_NO_REGION = contextlib.nullcontext()


def blas_on_one_thread(size=None):
    """``with kernels.blas_on_one_thread():`` OpenBLAS computes on the calling thread only inside, and
    as before after.

    `for_rows` holds it while its threads run matrix products. Outside, LayerNorm's matrix-vector
    products use it: OpenBLAS would split them across its threads, which then spin waiting for
    more work and hold the cores that the next op's threads need. Regions may overlap (ops called
    from several threads of the user's): the first to enter saves OpenBLAS's setting, the last to
    leave puts it back.

    ``size``: the numbers in the matrix of the matrix-vector products inside. Below
    ``GEMV_ONE_THREAD_BELOW`` OpenBLAS keeps them on one thread itself, and the region, which costs
    more than such small products, is skipped.
    """
    if size is not None and size < GEMV_ONE_THREAD_BELOW:
        return _NO_REGION
    return _blas_region()


@contextlib.contextmanager
def _blas_region(threads=1):
    """OpenBLAS on ``threads`` threads inside (overlapping regions keep the first one's count)."""
    blas = _openblas()
    if blas is None:
        yield
        return
    get, put = blas
    with _lock:
        if _state["blas_regions"] == 0:
            _state["blas_before"] = get()
            put(threads)
        _state["blas_regions"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["blas_regions"] -= 1
            if _state["blas_regions"] == 0:
                put(_state["blas_before"])


# ----- sampling's few-row products: one thread or OpenBLAS's, by the clock ---------------------------
#
# Sampling with the KV cache multiplies a few rows (one new token a row) by each weight: too few to
# cut into blocks of rows for our pool. OpenBLAS's own threads split such a product well on a quiet
# machine (they spin between calls instead of sleeping, so they start at once): sampling the small
# and medium GPTs ran 1.23x and 1.33x faster. But a spinning thread holds a core: on a busy machine
# another process needs it and each product waits for the slowest thread (small: 8x slower), and
# even on a quiet machine the spinning can slow the Python between the products (timing the
# products alone chose the threads for the small GPT, and its sampling got slower).
#
# No one way is right on every machine at every moment, so `FasterWay` measures as it goes. It
# times windows of WINDOW_CALLS calls by the wall clock, the work between the calls included,
# keeps the way whose last window got through more multiply-adds a second, and now and then
# tries the other: more rarely each time the other loses, at once when the way in use slows well
# below the other's last rate (a busy machine's threads are several times slower, not a little).
# A try that is going badly stops early; a window with a long gap between two calls (other work
# ran in between) starts again, so that windows compare like with like.
#
# Which way ran must never change a number. OpenBLAS splits a product by rows and columns of its
# result, not along the sum, and gave the same bits at one and at two threads for every product
# tried. That is checked, not assumed: the first time a shape is seen it is computed both ways
# and compared bit for bit, and a shape where they differ stays on one thread.
#
# (Training's blocks of rows run one after another on OpenBLAS's threads instead of on our pool
# were tried and dropped: no faster for the tiny GPT, measured in separate processes;
# benchmarks/README.md.)

MIN_FEW_ROW_PRODUCTS = 2 * 65536 * 4   # OpenBLAS gives a product a thread per 65536 ×
#                                        GEMM_MULTITHREAD_THRESHOLD multiply-adds: smaller get one
WINDOW_CALLS = 32        # calls timed together before the choice is looked at again
WARM_CALLS = 4           # the first calls of a window are not counted (threads waking up)
MAX_GAP_SECONDS = 0.01   # a longer gap between two calls starts the window again
MAX_WAIT_WINDOWS = 64    # at most this many windows between two tries of the other way
WIN_MARGIN = 1.05        # a try wins when its rate beats the way in use by this factor
SLOWED_MARGIN = 1.25     # the way in use slowed when its rate fell this far below the other's
GIVE_UP_FACTOR = 3       # a try stops once it took this many times the way in use's time ...
GIVE_UP_SECONDS = 1e-3   # ... plus this (OpenBLAS's threads waking from sleep)


class FasterWay:
    """Of two ways to do the same work, the one the wall clock finds faster; way 0 is the default.

    ``run(key, work, ways, outputs)``: ``ways`` are two functions that do the work, writing
    ``outputs`` (arrays); ``key`` names the work's shapes (its bits are checked once per key);
    ``work`` is its multiply-adds. The state: ``way`` (the one in use),
    ``rate`` (multiply-adds per second of wall time in the last window of each way), ``trying``
    (this window tries the other way), and the window being timed. One is shared by the threads of
    a process: calls from several at once blur its timing, never its numbers.
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.same_bits = {}                      # key -> both ways give the same bits
        self.way = 0
        self.rate = [None, None]
        self.trying = False
        self.wait = 1                            # windows to go before the next try
        self.wait_after_loss = 1                 # doubles each time a try loses
        self._new_window()

    def _new_window(self):
        self.calls, self.work = 0, 0             # work: of the calls after the warm ones
        self.counted_start = self.last_end = None

    def run(self, key, work, ways, outputs):
        if key not in self.same_bits:
            self.same_bits[key] = _same_bits(ways, outputs)
        elif not self.same_bits[key]:
            ways[0]()
        else:
            start = self.clock()
            ways[self.way != self.trying]()             # the other way while trying
            self._count(start, self.clock(), work)

    def _count(self, start, end, work):
        if self.calls and start - self.last_end > MAX_GAP_SECONDS:
            self._new_window()                   # other work ran in between: start again
        if self.calls == WARM_CALLS:
            self.counted_start = start
        self.calls += 1
        self.last_end = end
        if self.calls <= WARM_CALLS:
            return
        self.work += work
        spent, in_use = end - self.counted_start, self.rate[self.way]
        if self.trying and spent > GIVE_UP_FACTOR * self.work / in_use + GIVE_UP_SECONDS:
            self.rate[1 - self.way] = self.work / spent          # going badly: stop here
            self._end_try(won=False)
        elif self.calls == WARM_CALLS + WINDOW_CALLS:
            self._end_window(self.work / max(spent, 1e-12))

    def _end_window(self, rate):
        self.rate[self.way != self.trying] = rate
        if self.trying:
            self._end_try(won=rate > WIN_MARGIN * self.rate[self.way])
            return
        other = self.rate[1 - self.way]
        self.wait -= 1
        if other is not None and rate * SLOWED_MARGIN < other:   # well below the other's last
            self.wait = 0
        self.trying = self.wait <= 0
        self._new_window()

    def _end_try(self, won):
        if won:
            self.way = 1 - self.way
            self.wait_after_loss = 1
        else:
            self.wait_after_loss = min(2 * self.wait_after_loss, MAX_WAIT_WINDOWS)
        self.wait = self.wait_after_loss
        self.trying = False
        self._new_window()


def _same_bits(ways, outputs):
    """Whether both ways write the same bits: way 1 first, then way 0, whose numbers stay."""
    ways[1]()
    written = [o.copy() for o in outputs]
    ways[0]()
    return all(bool((a == b).all()) for a, b in zip(written, outputs))


_few_row_way = FasterWay()      # sampling's products of a few rows: one thread, or OpenBLAS's


def _few_row_threads():
    """OpenBLAS's threads for a few-row product: minirlhf's thread count, but never more than
    OpenBLAS is set to (``OPENBLAS_NUM_THREADS=1`` keeps it at one); 1 without OpenBLAS."""
    blas = _openblas()
    return 1 if blas is None else min(get_num_threads(), blas[0]())


# ----- freed memory ---------------------------------------------------------------------------------

def keep_freed_memory():
    """Ask glibc to keep freed blocks under 32 MB for reuse instead of returning them to the OS.

    True when glibc took the settings; False elsewhere (another C library, MINIRLHF_KEEP_MEMORY=0).
    """
    if _state["memory_kept"] is None:
        _state["memory_kept"] = False
        if os.environ.get("MINIRLHF_KEEP_MEMORY", "1") != "0":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):  # not glibc
                return False
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3    # from glibc's <malloc.h>
            _state["memory_kept"] = bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)
                                         and mallopt(M_TRIM_THRESHOLD, 1 << 30))
    return _state["memory_kept"]


# ===================================================================================================
# the fused ops' kernels
#
# What the Functions of functional.py compute, scheduled for the CPU: rows cut into blocks that the
# threads above share, results written into arrays made once, intermediates reused in place. Each
# function's docstring says what it computes; functional.py states the math and calls it. On CuPy
# arrays every block is the whole array, so the same code runs as a few whole-array kernels.


def log_softmax(x, axis=-1, out=None):
    """log softmax(x) = (x - max x) - log Σ exp(x - max x) of a raw array: shifting by the max
    keeps ``exp`` from overflowing. ``out``: an array to write the result into."""
    xp = backend.get_array_module(x)
    shifted = xp.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


def log_softmax_rows(x):
    """log softmax of each row of x (N, V): a new (N, V) array."""
    xp = backend.get_array_module(x)
    logp = xp.empty(x.shape, x.dtype)

    def block(lo, hi):
        log_softmax(x[lo:hi], axis=-1, out=logp[lo:hi])

    for_rows(block, x.shape[0], x.shape[1], xp=xp)
    return logp


def softmax_rows_times(logp, scale):
    """softmax · scale of each row, from its log-softmax logp (N, V) and a scale (N, 1): (N, V)."""
    xp = backend.get_array_module(logp)
    g = xp.empty(logp.shape, logp.dtype)

    def block(lo, hi):
        xp.exp(logp[lo:hi], out=g[lo:hi])
        g[lo:hi] *= scale[lo:hi]

    for_rows(block, g.shape[0], g.shape[1], xp=xp)
    return g


def affine_rows(x, weight, bias=None):
    """x W + b for x (N, in), W (in, out), b (out,): (N, out), one GEMM per block of rows.

    With too few rows to split (a batch of 32 rows while sampling with the KV cache, one new token
    each) it is one product, on one thread or on OpenBLAS's threads, whichever `FasterWay` finds
    faster. Splitting W's columns across our threads instead was tried and dropped: OpenBLAS does
    not always compute a slice of W's columns to the same bits as the whole product (its Haswell
    kernels do not), and a seed must sample the same tokens at any thread count
    (benchmarks/README.md, 2026-12-07, third session)."""
    xp = backend.get_array_module(x)
    y = xp.empty((x.shape[0], weight.shape[1]), xp.result_type(x, weight))

    def block(lo, hi):
        y_ = y[lo:hi]
        xp.matmul(x[lo:hi], weight, out=y_)
        if bias is not None:
            y_ += bias                         # in place (`y[lo:hi] += bias` would copy it back)

    n, work = x.shape[0], x.shape[0] * weight.size
    few = xp.__name__ == "numpy" and n < 2 * MIN_ROWS_PER_WEIGHT and work >= MIN_FEW_ROW_PRODUCTS
    threads = _few_row_threads() if few else 1
    if threads > 1:
        def on(blas_threads):
            with _blas_region(blas_threads):
                block(0, n)

        key = (x.shape, x.strides, weight.shape, weight.strides, y.dtype, bias is not None)
        _few_row_way.run(key, work, (lambda: on(1), lambda: on(threads)), outputs=(y,))
    else:
        for_rows(block, n, weight.size, blas=True, shared_weight=True, xp=xp)
    return y


def affine_rows_grads(x, weight, gy, with_bias):
    """The gradients of y = x W + b over rows: gx = gy Wᵀ (N, in), gW = xᵀ gy (in, out) and, with
    ``with_bias``, gb = Σ_rows gy (out,).

    Two products of the same size, shared by the threads as two kinds of block: blocks of gx's
    rows, and shares of the sums gW and gb over blocks of rows, added up after. There are half as
    many shares as threads, so on two threads gW is one whole product, the one a single thread
    computes (the same bits), and the other thread takes gx's rows meanwhile; cutting both products
    into rows had made each thread's products smaller and added the shares up (1.02-1.17x slower
    alone at the tiny to medium GPTs' shapes, benchmarks/README.md)."""
    xp = backend.get_array_module(gy)
    gx = xp.empty(x.shape, xp.result_type(gy, weight))

    def gx_rows(lo, hi):                                # gx = gy Wᵀ, rows lo:hi
        xp.matmul(gy[lo:hi], weight.T, out=gx[lo:hi])

    def gw_share(lo, hi):                               # rows lo:hi's share of Σ_rows xᵀ gy, Σ_rows gy
        gw = x[lo:hi].T @ gy[lo:hi]
        return (gw, backend.sum_first(gy[lo:hi])) if with_bias else (gw,)

    n = gy.shape[0]
    if xp.__name__ != "numpy":                          # GPU: parallel already
        gx_rows(0, n)
        return (gx,) + gw_share(0, n)
    threads, most = get_num_threads(), max(1, n // MIN_ROWS_PER_WEIGHT)
    if n * weight.size < MIN_PARALLEL_PRODUCTS or not _blas_splits():
        n_shares, n_gx = 1, 1
        run = one_after_another
    else:
        n_shares, n_gx = min(max(1, threads // 2), most), min(threads, most)
        run = for_blocks
    blocks = ([(gw_share, lo, hi) for lo, hi in cut_rows(n, n_shares)]     # the longest first
              + [(gx_rows, lo, hi) for lo, hi in cut_rows(n, n_gx)])
    results = run(lambda part, lo, hi: part(lo, hi), blocks, blas=True)
    return (gx,) + add_up(results[:n_shares])


def normalize_rows(x, eps):
    """x̂ = (x - μ) / sqrt(σ² + eps), μ (N, 1) and rstd = 1 / sqrt(σ² + eps) (N, 1), μ and σ² each
    row's mean and variance, for x (N, C). The means are matrix-vector products on one OpenBLAS
    thread (`blas_on_one_thread` says why)."""
    xp = backend.get_array_module(x)
    with blas_on_one_thread(size=x.size):
        mu = backend.mean_last(x)[:, None]                           # (N, 1)
        xhat = x - mu                                                # x - μ
        var = backend.mean_last(xp.square(xhat))                     # σ², (N,)
    rstd = ((var + x.dtype.type(eps)) ** -0.5)[:, None]              # (N, 1)
    xhat *= rstd                                                     # x̂, in place
    return xhat, mu, rstd


def normalized_again(x, mu, rstd):
    """x̂ = (x - μ) · rstd from the μ and rstd `normalize_rows` returned: the same operations on the
    same numbers, so the same x̂ to the last bit. LayerNorm's backward remakes x̂ this way instead
    of keeping it: its input x is held by the graph anyway, x̂ would be a second (N, C) array."""
    xhat = x - mu
    xhat *= rstd
    return xhat


def layer_norm_grads(gy, xhat, weight, rstd):
    """The gradients of y = x̂ w + b over the rows of gy (N, C):
    gx = rstd · (g - mean(g) - x̂ · mean(g x̂)) with g = gy w,  gw = Σ_rows gy x̂,  gb = Σ_rows gy."""
    xp = backend.get_array_module(gy)
    gy_xhat = gy * xhat                                              # (N, C)
    w_over_C = weight / xhat.shape[-1]                               # (C,)
    with blas_on_one_thread(size=gy.size):
        gw, gb = backend.sum_first(gy_xhat), backend.sum_first(gy)   # Σ_rows gy x̂, Σ_rows gy
        mean_g = gy @ w_over_C                                       # mean(g), (N,)
        mean_g_xhat = gy_xhat @ w_over_C                             # mean(g x̂), (N,)
    gx = gy * weight                                                 # g
    gx -= mean_g[:, None]
    gx -= xp.multiply(xhat, mean_g_xhat[:, None], out=gy_xhat)      # x̂ · mean(g x̂)
    gx *= rstd
    return gx, gw, gb


GELU_C = 0.7978845608028654          # √(2/π)
GELU_KEEP_SIGMA_BELOW = 1 << 20      # GELU keeps σ(2u) for its backward below this many numbers


def _gelu_sigma(xp, xb, out):
    """σ(2u) of the elements xb, u = √(2/π)(x + 0.044715 x³), into ``out``: `gelu_tanh` and
    `gelu_tanh_grad` both call it, so the backward's σ is the forward's to the last bit."""
    c, a = xb.dtype.type(GELU_C), xb.dtype.type(0.044715)
    xp.multiply(xb, xb, out=out)               # -2u = -2√(2/π)(x + a x³) = x(-2c - 2c·a·x²)
    out *= -2 * c * a
    out -= 2 * c
    out *= xb
    xp.clip(out, -80, 80, out=out)             # exp(80) is finite in float32; σ is 0 or 1 there
    xp.exp(out, out=out)
    out += 1
    xp.divide(1, out, out=out)                 # s = σ(2u) = 1 / (1 + e^(-2u))
    return out


def gelu_tanh(x):
    """y = x σ(2u), u = √(2/π)(x + 0.044715 x³) (the same as ½ x (1 + tanh u)), shaped like x, and
    s = σ(2u) for `gelu_tanh_grad` when x has fewer than GELU_KEEP_SIGMA_BELOW numbers (else None:
    the backward computes it again from x; the array would be one of the widest a step keeps).
    σ rather than tanh, because NumPy's float32 tanh is the slower one."""
    xp = backend.get_array_module(x)
    flat, y = x.reshape(-1), xp.empty(x.size, x.dtype)
    keep = x.size < GELU_KEEP_SIGMA_BELOW
    s = xp.empty(x.size, x.dtype) if keep else None

    def block(lo, hi):                          # elements lo:hi
        xb = flat[lo:hi]
        sb = _gelu_sigma(xp, xb, s[lo:hi] if keep else xp.empty(hi - lo, x.dtype))
        xp.multiply(xb, sb, out=y[lo:hi])      # y = x σ(2u)

    for_rows(block, flat.size, 1, xp=xp)
    return y.reshape(x.shape), (s.reshape(x.shape) if keep else None)


def gelu_tanh_grad(x, gy, s=None):
    """gx = gy · (σ + x · 2σ(1 - σ) · √(2/π)(1 + 3 · 0.044715 x²)) with σ = σ(2u), shaped like x;
    σ is ``s`` from `gelu_tanh`, or computed again from x (the same bits) when it is None."""
    xp = backend.get_array_module(gy)
    flat, gy = x.reshape(-1), gy.reshape(-1)
    s = None if s is None else s.reshape(-1)
    c, a = x.dtype.type(GELU_C), x.dtype.type(0.044715)
    gx = xp.empty(flat.size, x.dtype)

    def block(lo, hi):
        xb, g = flat[lo:hi], gx[lo:hi]
        sb = s[lo:hi] if s is not None else _gelu_sigma(xp, xb, xp.empty(hi - lo, x.dtype))
        xp.multiply(xb, xb, out=g)             # 2x · c(1 + 3a x²)
        g *= 6 * c * a
        g += 2 * c
        g *= xb
        g *= sb                                # · σ(1 - σ)
        g *= 1 - sb
        g += sb                                # + σ
        g *= gy[lo:hi]

    for_rows(block, flat.size, 1, xp=xp)
    return gx.reshape(x.shape)


def compact_rows(a):
    """``a`` with compact rows (its last two axes laid out densely), copied only if it is not.
    Heads split out of one (B, T, 3C) projection are views whose rows are far apart, and batched
    GEMMs on compact copies are faster (a KV cache's slices are compact already)."""
    if a.strides[-2] == a.shape[-1] * a.itemsize and a.strides[-1] == a.itemsize:
        return a
    return backend.get_array_module(a).ascontiguousarray(a)


_CAUSAL_BIAS = {}


def causal_bias(xp, Tq, Tk, dtype):
    """(Tq, Tk): 0 where query i may see key j, -inf on the future. Query i sits at absolute
    position Tk - Tq + i, after every cached key. Built once per shape and reused."""
    key = (xp.__name__, Tq, Tk, dtype)
    if key not in _CAUSAL_BIAS:
        future = xp.triu(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)
        _CAUSAL_BIAS[key] = xp.where(future, dtype.type(-xp.inf), dtype.type(0))
    return _CAUSAL_BIAS[key]


ATTENTION_QUERY_BLOCK = 64      # queries per block of causal attention, at 128 queries or more
ATTENTION_KEEP_P_QUERIES = 128  # up to this many queries attention keeps P for its backward


def query_blocks(Tq, Tk, causal):
    """[(lo, hi, keys)]: attention's queries lo:hi and the first ``keys`` keys they may see.

    Causal attention at Tq >= 2·ATTENTION_QUERY_BLOCK is cut into blocks of queries, each taking
    only the keys up to its last query (query i sits at position Tk - Tq + i): the scores of the
    future, which softmax would turn into zeros, are never computed, exponentiated or multiplied.
    With a mask, or few queries, one block takes them all."""
    if not causal or Tq < 2 * ATTENTION_QUERY_BLOCK:
        return [(0, Tq, Tk)]
    bounds = list(range(0, Tq, ATTENTION_QUERY_BLOCK)) + [Tq]
    return [(lo, hi, Tk - Tq + hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _block_probabilities(xp, qs, k, a, b, keys, allowed, out):
    """P of queries a:b, softmax(qs[a:b] k[:keys]ᵀ + mask) with qs = scale · q, into ``out``
    (..., b - a, keys), in place. The forward and the backward both call it, on the same numbers,
    so the backward's P is the forward's to the last bit without being kept in between."""
    xp.matmul(qs[..., a:b, :], xp.swapaxes(k[..., :keys, :], -1, -2), out=out)   # s
    if allowed is None:
        if b - a > 1:                                                # (one new query sees all keys)
            out += causal_bias(xp, b - a, keys, out.dtype)           # -inf on future keys
    else:
        out[...] = xp.where(allowed, out, out.dtype.type(-xp.inf))
    out -= out.max(axis=-1, keepdims=True)
    xp.exp(out, out=out)
    out /= backend.sum_last(out)[..., None]                          # softmax, in place
    return out


def attention(q, k, v, scale, allowed=None):
    """y = P v with P = softmax(scale · q kᵀ + mask), for q (..., Tq, hs), k and v (..., Tk, hs):
    returns y (..., Tq, hs) and P for `attention_grads`, or None. The mask is causal, or, given
    ``allowed`` (a boolean array broadcastable to (..., Tq, Tk)), -inf where it is False. Blocks
    of batch rows run on threads, each computing P one block of `query_blocks` at a time.

    P, (Tq, Tk) numbers per head, grows with the square of the length and is most of attention's
    memory at longer sequences: beyond ATTENTION_KEEP_P_QUERIES queries each block's P is let go
    and `attention_grads` computes it again (the exp that remakes it costs less than keeping it,
    as FlashAttention found); up to there it is small, and kept, a list with one array per block
    (remaking it would cost about 5% of the small GPT's step)."""
    xp = backend.get_array_module(q)
    Tq, Tk = q.shape[-2], k.shape[-2]
    blocks = query_blocks(Tq, Tk, causal=allowed is None)
    keep = Tq <= ATTENTION_KEEP_P_QUERIES
    P = [xp.empty(q.shape[:-2] + (b - a, keys), q.dtype) for a, b, keys in blocks] if keep else None
    y = xp.empty(q.shape, q.dtype)                                   # (..., Tq, hs)

    def block(lo, hi):                                                # batch rows lo:hi
        q_, k_, v_, y_ = _batch_rows(lo, hi, q, q, k, v, y)
        allowed_ = None if allowed is None else _batch_rows(lo, hi, q, allowed)[0]
        qs = q_ * scale                      # scaling q (…, T, hs) is cheaper than s (…, T, T)
        for i, (a, b, keys) in enumerate(blocks):
            out = (_batch_rows(lo, hi, q, P[i])[0] if keep
                   else xp.empty(q_.shape[:-2] + (b - a, keys), q.dtype))
            Pb = _block_probabilities(xp, qs, k_, a, b, keys, allowed_, out)
            xp.matmul(Pb, v_[..., :keys, :], out=y_[..., a:b, :])   # y = P v

    _for_batch_rows(block, q, Tq * Tk, xp)
    return y, P


def attention_grads(q, k, v, y, gy, scale, allowed=None, P=None, out=None):
    """The gradients of y = P v, P = softmax(s), s = scale · q kᵀ (masked, as `attention` with the
    same ``allowed``): gv = Pᵀ gy, gs = P ⊙ (gP - D) with gP = gy vᵀ and D = Σ_j gP_j P_j, which
    is Σ_d gy_d y_d (y = P v), gq = scale · gs k, gk = scale · gsᵀ q. ``P``: what `attention`
    returned; None: each block's P is computed again, exactly as the forward computed it.
    ``out``: three arrays shaped like q, k and v to write gq, gk and gv into."""
    xp = backend.get_array_module(gy)
    gq, gk, gv = out if out is not None else (xp.empty_like(q), xp.empty_like(k), xp.empty_like(v))
    Tq, Tk = q.shape[-2], k.shape[-2]
    # the last block of `query_blocks` sees every key, so it writes gk and gv whole and the ones
    # before add to their first keys
    blocks = query_blocks(Tq, Tk, causal=allowed is None)

    def block(lo, hi):                                                # batch rows lo:hi
        q_, k_, v_, y_, gy_, gq_, gk_, gv_ = _batch_rows(lo, hi, q, q, k, v, y, gy, gq, gk, gv)
        if P is None:                                                # to remake P with
            allowed_ = None if allowed is None else _batch_rows(lo, hi, q, allowed)[0]
            qs = q_ * scale
        D = (gy_ * y_).sum(axis=-1, keepdims=True)                   # (..., Tq, 1)
        for j in reversed(range(len(blocks))):                       # the last block first
            a, b, keys = blocks[j]
            last = j == len(blocks) - 1
            if P is not None:                                        # kept by the forward
                Pb = _batch_rows(lo, hi, q, P[j])[0]
            else:
                Pb = _block_probabilities(xp, qs, k_, a, b, keys, allowed_,
                                          xp.empty(q_.shape[:-2] + (b - a, keys), q.dtype))
            gyb = gy_[..., a:b, :]
            if last:                                                 # it sees all keys
                xp.matmul(xp.swapaxes(Pb, -1, -2), gyb, out=gv_)     # (..., Tk, hs)
            else:
                gv_[..., :keys, :] += xp.swapaxes(Pb, -1, -2) @ gyb
            gs = gyb @ xp.swapaxes(v_[..., :keys, :], -1, -2)        # gP, (..., b - a, keys)
            gs -= D[..., a:b, :]                                     # gs = P ⊙ (gP - D)
            gs *= Pb
            gqb = gq_[..., a:b, :]
            xp.matmul(gs, k_[..., :keys, :], out=gqb)                # scale applied to the small
            gqb *= scale                                             # (…, T, hs) results
            if last:
                gkb = xp.matmul(xp.swapaxes(gs, -1, -2), q_[..., a:b, :], out=gk_)
                gkb *= scale
            else:
                gkb = xp.swapaxes(gs, -1, -2) @ q_[..., a:b, :]
                gkb *= scale
                gk_[..., :keys, :] += gkb

    _for_batch_rows(block, q, Tq * Tk, xp)
    return gq, gk, gv


def _for_batch_rows(block, q, scores, xp):
    """Run ``block(lo, hi)`` over blocks of the leading (batch) axis, on CPU threads; ``scores``:
    the (Tq, Tk) scores of one head."""
    if q.ndim < 3:                                                   # no batch axis: one block
        block(0, None)
        return
    per_row = q[:1].size // q.shape[-2] * scores                     # multiply-adds of one row
    for_rows(block, q.shape[0], per_row, blas=True, xp=xp)


def _batch_rows(lo, hi, q, *arrays):
    """Each array's batch rows lo:hi; an array (a mask) broadcast along that axis is kept."""
    if hi is None:
        return arrays
    n = q.shape[0]
    return tuple(a[lo:hi] if a.ndim == q.ndim and a.shape[0] == n and n > 1 else a for a in arrays)
