"""Running fast on CPU cores: threads for the big row-wise kernels, the BLAS, and freed memory.

Threads. NumPy runs each ufunc on one core. The large fused ops of a GPT step (the linear layers,
attention, GELU, cross-entropy) work on rows that do not depend on each other, so they are cut into
blocks of rows, and the caller's thread and a small pool take the blocks one at a time until none
is left (NumPy and the BLAS release Python's GIL while they compute). Each op writes the loop body
it would write for all rows at once:

    def rows(lo, hi):                       # rows lo:hi of x (N, C) and of the output y
        xp.exp(x[lo:hi], out=y[lo:hi])
    cpu.for_rows(rows, N, row_size=C)

Elementwise blocks hold about 256K numbers (1 MB of float32). Smaller blocks would stay in a core's
cache between an op's passes, but every NumPy call hands Python's GIL from one thread to the other,
and a thread that has to wait for the GIL is put to sleep and woken later (~0.1 ms on the 2-core VM
the benchmarks run on): fewer, longer calls win. Work that calls the BLAS (matrix products) is cut
into two blocks per thread. On CuPy arrays, small inputs or one thread, ``fn`` is simply called once.

The BLAS. Two thread pools on the same cores fight, so while our threads run matrix products
OpenBLAS is held to one thread each (and set back after). The products minirlhf splits are the big
ones; small ones (sampling a few rows at a time) are left to OpenBLAS's own threads.

Freed memory. glibc gives freed blocks larger than 128 KB back to the operating system, and the next
training step, which allocates the same activations again, faults them back in page by page (about
15% of a small GPT's step on a 2-core machine). On first use minirlhf tells glibc to keep freed
memory below 32 MB for reuse (``mallopt``), as PyTorch's and CuPy's GPU memory pools do. The cost:
the process does not shrink after its peak. ``MINIRLHF_KEEP_MEMORY=0`` turns this off.

``MINIRLHF_NUM_THREADS`` (or ``set_num_threads``) sets the number of threads; by default, the CPUs
this process may use, at most 8.
"""

import contextlib
import ctypes
import itertools
import os
import queue
import threading

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
    if (xp is not None and xp.__name__ != "numpy") or total < (
            MIN_PARALLEL_PRODUCTS if blas else MIN_PARALLEL_NUMBERS):
        return [fn(0, n_rows)]                                # GPU, or too little work to split
    threads = get_num_threads()
    if threads > 1 and _state["pool_pid"] != os.getpid():
        set_num_threads(threads)        # a forked child: the parent's pool threads did not come along
    if blas:  # a few blocks per thread, if the product is big enough and OpenBLAS can be held to one
        worth_it = threads > 1 and _openblas() is not None
        min_rows = MIN_ROWS_PER_WEIGHT if shared_weight else 1
        n_blocks = min(BLAS_BLOCKS_PER_THREAD * threads, n_rows // min_rows) if worth_it else 1
    else:     # blocks of BLOCK_NUMBERS numbers
        n_blocks = min(n_rows, total // BLOCK_NUMBERS)
    if n_blocks <= 1:
        return [fn(0, n_rows)]
    bounds = [n_rows * i // n_blocks for i in range(n_blocks + 1)]
    job = _Job(fn, list(zip(bounds[:-1], bounds[1:])))
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


# ----- sharing the blocks ---------------------------------------------------------------------------
#
# A thread woken from sleep starts ~0.1 ms later on the 2-core VM the benchmarks run on (an idle
# virtual CPU is halted, and waking it goes through the hypervisor). Handing each thread a fixed
# share made the caller wait for the late one at the end of every call (~0.3 ms; a GPT step makes
# ~50 calls). Instead the blocks sit in a `_Job` and each thread takes the next one when it is free:
# the caller starts at once, and a pool thread that wakes late finds fewer blocks left.

class _Job:
    """One call of `for_rows`: its blocks, taken one at a time by whichever thread is free."""

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
    """``with cpu.blas_on_one_thread():`` OpenBLAS computes on the calling thread only inside, and
    as before after.

    `for_rows` holds it while its threads run matrix products. Outside, LayerNorm's matrix-vector
    products use it: OpenBLAS would split them across its threads, which then spin for a while
    waiting for more work and hold the cores that the next op's threads need (this took a medium
    GPT step from 1.5 to 2.3 s). Regions may overlap (ops called from several threads of the
    user's): the first to enter saves OpenBLAS's setting, the last to leave puts it back.

    ``size``: the numbers in the matrix of the matrix-vector products inside. Below
    ``GEMV_ONE_THREAD_BELOW`` OpenBLAS keeps them on one thread itself, and the region is skipped:
    its calls into OpenBLAS took ~5 us, more than a LayerNorm's products over a sampling step's 8
    rows.
    """
    if size is not None and size < GEMV_ONE_THREAD_BELOW:
        return _NO_REGION
    return _blas_region()


@contextlib.contextmanager
def _blas_region():
    blas = _openblas()
    if blas is None:
        yield
        return
    get, put = blas
    with _lock:
        if _state["blas_regions"] == 0:
            _state["blas_before"] = get()
            put(1)
        _state["blas_regions"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["blas_regions"] -= 1
            if _state["blas_regions"] == 0:
                put(_state["blas_before"])


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
