# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
# distutils: define_macros=NPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION
"""Compiled simulator core: the semantics of ``reference.py``, executed in C.

``run`` views the verified instruction array (``PreparedProgram.code``) as a typed
memoryview and dispatches on the opcode in C loops that hold no Python objects and
release the GIL. The verifier has checked every index, so nothing is bounds-checked.

* The opcodes, operand columns, scoreboard tables, counts and the dispatch come from
  ``_isa.pxi``, which ``isa_pxi.py`` generates from the ISA table when the package is
  built; importing a core built from another table fails (the simulator then falls back
  to the numpy reference). An instruction's semantics is ``_execute_<mnemonic>``.
* The schedule is ``timing.Timeline`` re-done in C from the same table, in one pass over
  the code; the tests hold it equal to the reference and to ``timing.estimate``.
* Values are computed in a second pass, once per row tile of items: every instruction
  treats each item (its ``rows`` vectors of every buffer) on its own, so the whole
  program runs on a few hundred vectors at a time while their buffers stay in cache.
* Integer arithmetic is done in ``uint64_t`` and cast back: that is exactly how numpy's
  int64 wraps on overflow, without C's undefined signed overflow.
* Column sums are BLAS products (s/d gemm and gemv from scipy's ``cython_blas``, looked
  up at import time so the build needs no scipy headers). float32 is used when every
  image's largest possible column sum fits its 24-bit significand, which makes it
  exact; otherwise float64, exact below 2**53 as the reference's.
* BLAS runs on one thread while a run executes (see ``_BlasThreads``): a run makes one
  product per mvm and row tile, thousands of small ones, and a threaded BLAS hands each
  to its threads and waits for them several times per product. That gains little, and
  where the CPU is shared each wait lasts until a descheduled thread runs again: ResNet-18
  took 25 times as long on two cores that another process kept busy.
* A ``prog`` marks the crossbar's float weights to be folded from its image's cells by
  the next mvm that reads them: only the images the crossbars hold take floats, however
  many the program has. A ``progb`` maps each item's operand at once (the buffer may
  change before the mvm), the mapping of ``tvm_cim.core.cells`` re-done in C, into one
  matrix per item of the row tile; its run-time range check stops the run, and ``run``
  raises the reference's ``InputError``.
* With a lossless ADC, the bit-serial steps of a layer (one mvm, adc and shadds per DAC
  chunk and image) add a linear function of their source: the core runs each such group
  as one exact product of the rebuilt inputs and the combined weights (see
  ``bit_serial_groups``), a GEMM of the layer's own size instead of one per chunk and
  cell slice. The schedule and counts still come from every instruction.
"""

from bisect import bisect_left

from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

cimport numpy as cnp
import numpy as np

from . import isa, reference
from .timing import SimStats

cnp.import_array()


# ---------------------------------------------------------------------------- BLAS

ctypedef void (*sgemm_t)(char *transa, char *transb, int *m, int *n, int *k,
                         float *alpha, float *a, int *lda, float *b, int *ldb,
                         float *beta, float *c, int *ldc) noexcept nogil
ctypedef void (*dgemm_t)(char *transa, char *transb, int *m, int *n, int *k,
                         double *alpha, double *a, int *lda, double *b, int *ldb,
                         double *beta, double *c, int *ldc) noexcept nogil
ctypedef void (*sgemv_t)(char *trans, int *m, int *n, float *alpha, float *a, int *lda,
                         float *x, int *incx, float *beta, float *y, int *incy) noexcept nogil
ctypedef void (*dgemv_t)(char *trans, int *m, int *n, double *alpha, double *a, int *lda,
                         double *x, int *incx, double *beta, double *y, int *incy) noexcept nogil


cdef void *_blas_function(str name) except NULL:
    # An ImportError makes the simulator fall back to the numpy reference.
    try:
        from scipy.linalg import cython_blas

        capsule = cython_blas.__pyx_capi__[name]
        return PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule))
    except (ImportError, KeyError, ValueError) as exc:
        raise ImportError(f"no BLAS {name} from scipy.linalg.cython_blas: {exc}") from exc


cdef sgemm_t _sgemm = <sgemm_t>_blas_function("sgemm")
cdef dgemm_t _dgemm = <dgemm_t>_blas_function("dgemm")
cdef sgemv_t _sgemv = <sgemv_t>_blas_function("sgemv")
cdef dgemv_t _dgemv = <dgemv_t>_blas_function("dgemv")


ctypedef void (*set_threads_t)(int) noexcept nogil
ctypedef int (*get_threads_t)() noexcept nogil


cdef class _BlasThreads:
    """Keeps the BLAS behind ``cython_blas`` on one thread while any run executes.

    OpenBLAS splits every product above a small size among its threads and waits for
    each of them at several points per product; the core makes one product per mvm and
    row tile. The thread count is global to the library (other users of scipy's BLAS see
    one thread meanwhile), so the count it had comes back when the last of the runs that
    overlap ends: ``hold`` and ``release`` (``with blas_threads:``) run with the GIL
    held. A BLAS without OpenBLAS's thread calls is left as it is.
    """

    cdef set_threads_t set_threads
    cdef get_threads_t get_threads
    cdef int holders  # runs in progress
    cdef int saved  # the thread count before the first of them

    def __cinit__(self):
        try:
            import ctypes

            from scipy.linalg import cython_blas

            # dlsym through the module's handle also searches the libraries it links.
            lib = ctypes.CDLL(cython_blas.__file__)
        except (ImportError, OSError):
            return
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("", "64_"):
                try:
                    set_fn = getattr(lib, f"{prefix}_set_num_threads{suffix}")
                    get_fn = getattr(lib, f"{prefix}_get_num_threads{suffix}")
                except AttributeError:
                    continue
                self.set_threads = <set_threads_t><uintptr_t>ctypes.cast(
                    set_fn, ctypes.c_void_p).value
                self.get_threads = <get_threads_t><uintptr_t>ctypes.cast(
                    get_fn, ctypes.c_void_p).value
                return

    cdef void hold(self) noexcept:
        if self.set_threads == NULL:
            return
        if self.holders == 0:
            self.saved = self.get_threads()
            if self.saved != 1:
                self.set_threads(1)
        self.holders += 1

    cdef void release(self) noexcept:
        if self.set_threads == NULL or self.holders == 0:
            return
        self.holders -= 1
        if self.holders == 0 and self.saved != 1 and self.saved > 0:
            self.set_threads(self.saved)

    def __enter__(self):
        self.hold()
        return self

    def __exit__(self, *exc_info):
        self.release()

    @property
    def controlled(self):
        """Whether the core found the BLAS's thread calls (and sets its count in runs)."""
        return self.set_threads != NULL

    @property
    def threads(self):
        """The BLAS's thread count now (0 where not controlled). Setting it sets the
        library's count, as ``openblas_set_num_threads`` does; while runs execute, the
        count they saved comes back when the last ends."""
        return self.get_threads() if self.get_threads != NULL else 0

    @threads.setter
    def threads(self, int n):
        if self.set_threads == NULL:
            raise RuntimeError("the BLAS's thread count is not controlled")
        self.set_threads(n)


cdef _BlasThreads _blas_threads = _BlasThreads()
blas_threads = _blas_threads


# ------------------------------------------------------------------- the ISA table

# The opcodes, the operand columns (MVM_SRC, ...), the counters, the scoreboard tables
# per opcode, the tally of counts (_tally) and the dispatch, generated from isa.py when
# the package is built.
include "_isa.pxi"

if ISA_FINGERPRINT != isa.fingerprint():  # the simulator falls back to the numpy reference
    raise ImportError(
        "tvm_cim.sim._core was built for another instruction table; rebuild it "
        "(pip install -e .)"
    )

cdef enum:
    # CimArch.mapping, as the core's progb maps operands (tvm_cim.core.cells)
    _DIFF_COLUMN = 0
    _OFFSET = 1
    _DIFF_ROW = 2

_MAPPING_CODES = {
    "differential-column": _DIFF_COLUMN, "offset": _OFFSET, "differential-row": _DIFF_ROW
}

cdef enum:
    _GEMV_ROWS = 8  # fewer vectors than this: GEMV per vector rather than one GEMM
    _GROUP_ROWS = 1024  # vectors per product of a bit-serial group (see _execute_group)


# ------------------------------------------------------------------ integer helpers

cdef inline int64_t _add(int64_t a, int64_t b) noexcept nogil:
    return <int64_t>((<uint64_t>a) + (<uint64_t>b))


cdef inline int64_t _sub(int64_t a, int64_t b) noexcept nogil:
    return <int64_t>((<uint64_t>a) - (<uint64_t>b))


cdef inline int64_t _mul(int64_t a, int64_t b) noexcept nogil:
    return <int64_t>((<uint64_t>a) * (<uint64_t>b))


cdef inline int64_t _shl(int64_t a, int64_t s) noexcept nogil:
    return <int64_t>((<uint64_t>a) << s)


cdef inline int64_t _max(int64_t a, int64_t b) noexcept nogil:
    return a if a > b else b


cdef inline int64_t _round_shift(int64_t x, int64_t s) noexcept nogil:
    """``quant.rounding_right_shift``: x / 2**s rounded half to even (s in 0..62)."""
    if s == 0:
        return x
    cdef int64_t floor = x >> s  # arithmetic shift: floor division
    cdef int64_t rem = _sub(x, _shl(floor, s))
    cdef int64_t half = (<int64_t>1) << (s - 1)
    if rem > half or (rem == half and (floor & 1)):
        return floor + 1
    return floor


cdef inline void _quant_range(int64_t bits, bint signed, int64_t *lo, int64_t *hi) noexcept nogil:
    if signed:
        lo[0] = -((<int64_t>1) << (bits - 1))
        hi[0] = ((<int64_t>1) << (bits - 1)) - 1
    else:
        lo[0] = 0
        hi[0] = ((<int64_t>1) << bits) - 1


# ------------------------------------------------------------------- machine state

cdef struct Group:
    # A bit-serial group (see ``bit_serial_groups``): instructions [start, end) add
    # inputs @ weights into dst columns dmin .. dmin + span, the inputs being the k
    # columns of src from src_col, each the sum of its DAC chunks shifted by their
    # places, and the weights its members' image columns, shifted as the shadds shift
    # them, at the rows of their inputs.
    int64_t start, end
    int64_t src, src_col, k, dst, dmin, span
    int64_t xmax  # the most |input| any source value gives
    int64_t nbits, bits  # per chunk, (bit, signed, place) at pool[bits + 3 * i]
    int64_t nmembers, members  # per member, (image, input offset, nterms, terms at)
    int64_t low_bits  # > 0: each input is its value's low low_bits bits
    bint low_signed  # ... sign-extended from the top one


cdef struct Machine:
    int64_t batch  # items: the schedule and the counts scale by batch * rows
    int64_t items  # items of the row tile being executed
    int64_t first_item  # of the row tile being executed
    int crossbars
    int dac_bits
    int adc_bits  # 0: lossless
    int cell_bits
    int mapping  # _DIFF_COLUMN, _OFFSET or _DIFF_ROW
    bint f32  # column sums, images and DAC chunks in float32 (else float64)
    # program tables (owned by the _Plan), per image index
    const uint8_t **cells  # [physical_rows, cols] uint8, any strides
    Py_ssize_t *cell_strides  # bytes between rows, then between columns
    bint *differential
    int *in_rows
    int *phys_rows
    int *img_cols
    int64_t **consts
    int64_t *const_w
    int64_t *lat  # picoseconds per opcode, per vector where per-vector
    # data: C-contiguous [rows, width] int64 views of the tile's buffers and tensors
    # A buffer holds items * buf_rows[b] vectors; item i's rows follow item i - 1's.
    int64_t tile  # items per row tile
    int64_t **buf  # one allocation of tile * buf_total, in buffer order
    int64_t *buf_w
    int64_t *buf_rows
    int64_t buf_total  # int64 values of all buffers per item
    int n_inp
    int64_t **inp_base  # [batch * rows, width] input tensors
    int64_t **inp
    int64_t *inp_w
    int64_t *inp_rows
    int n_out
    char **out_base  # [batch * rows, width] output tensors
    char **out
    int64_t *out_w
    int64_t *out_rows
    int *out_size  # output itemsize: casting keeps the low bytes, as astype does
    void **weights  # folded [in_rows, cols] image per crossbar some mvm drives
    void **held  # column sums per crossbar, [vectors, held_w]
    int64_t *held_w
    void *chunks  # the DAC chunk plane of one mvm, [vectors, in_rows]
    int64_t *row  # one buffer row, for sources that overlap their destination
    int *image_on  # image each crossbar holds, as execution goes (-1: none, or a progb's)
    bint *stale  # per crossbar: its weights are not yet folded from image_on
    bint *batched  # per crossbar: it holds one matrix per item (a progb's), not an image
    int *tile_in  # ... of tile_in inputs and tile_cols columns, item after item
    int *tile_cols
    # the first progb operand value out of range (fault_at -1: none): the run stops
    int64_t fault_at, fault_item, fault_value, fault_src, fault_row, fault_col, fault_bits
    # bit-serial groups (owned by the _Plan) and their scratch (owned by the run)
    const Group *groups
    const int64_t *group_at  # per instruction: the group starting there, else -1
    const int64_t *pool
    int64_t *group_int  # combined weights [k, span] as int64
    void *group_weights  # ... as float or double
    void *group_inputs  # [_GROUP_ROWS, k]
    void *group_sums  # [_GROUP_ROWS, span]
    # schedule and counts, as timing.Timeline keeps them
    int64_t *sched_cells  # cells of what each crossbar holds, as scheduling goes
    int64_t *unit_free  # the crossbars, then the shared units
    int64_t *written  # per buffer
    int64_t *read
    int64_t *busy  # per crossbar
    int64_t latency
    int64_t sequential
    int64_t count[NOPS]
    int64_t counters[NCOUNTERS]  # indexed like COUNTERS


cdef Machine *_new_machine(int64_t nbuf, int64_t nxb, int64_t ninp, int64_t nout) noexcept:
    """A zeroed machine whose tables hold ``nbuf`` buffers, ``nxb`` crossbars and the
    tensors; NULL when memory runs out (``_free_machine`` frees a partial one)."""
    cdef Machine *m = <Machine *>calloc(1, sizeof(Machine))
    if m == NULL:
        return NULL
    nbuf, nxb, ninp, nout = max(nbuf, 1), max(nxb, 1), max(ninp, 1), max(nout, 1)
    m.buf = <int64_t **>calloc(nbuf, sizeof(int64_t *))
    m.buf_w = <int64_t *>calloc(nbuf, sizeof(int64_t))
    m.buf_rows = <int64_t *>calloc(nbuf, sizeof(int64_t))
    m.written = <int64_t *>calloc(nbuf, sizeof(int64_t))
    m.read = <int64_t *>calloc(nbuf, sizeof(int64_t))
    m.inp_base = <int64_t **>calloc(ninp, sizeof(int64_t *))
    m.inp = <int64_t **>calloc(ninp, sizeof(int64_t *))
    m.inp_w = <int64_t *>calloc(ninp, sizeof(int64_t))
    m.inp_rows = <int64_t *>calloc(ninp, sizeof(int64_t))
    m.out_base = <char **>calloc(nout, sizeof(char *))
    m.out = <char **>calloc(nout, sizeof(char *))
    m.out_w = <int64_t *>calloc(nout, sizeof(int64_t))
    m.out_rows = <int64_t *>calloc(nout, sizeof(int64_t))
    m.out_size = <int *>calloc(nout, sizeof(int))
    m.weights = <void **>calloc(nxb, sizeof(void *))
    m.held = <void **>calloc(nxb, sizeof(void *))
    m.held_w = <int64_t *>calloc(nxb, sizeof(int64_t))
    m.image_on = <int *>calloc(nxb, sizeof(int))
    m.stale = <bint *>calloc(nxb, sizeof(bint))
    m.batched = <bint *>calloc(nxb, sizeof(bint))
    m.tile_in = <int *>calloc(nxb, sizeof(int))
    m.tile_cols = <int *>calloc(nxb, sizeof(int))
    m.sched_cells = <int64_t *>calloc(nxb, sizeof(int64_t))
    m.busy = <int64_t *>calloc(nxb, sizeof(int64_t))
    m.unit_free = <int64_t *>calloc(nxb + NSHARED, sizeof(int64_t))
    if not (m.buf and m.buf_w and m.buf_rows and m.written and m.read and m.inp_base
            and m.inp and m.inp_w and m.inp_rows and m.out_base and m.out and m.out_w
            and m.out_rows and m.out_size and m.weights and m.held and m.held_w
            and m.image_on and m.stale and m.batched and m.tile_in and m.tile_cols
            and m.sched_cells and m.busy and m.unit_free):
        _free_machine(m)
        return NULL
    return m


cdef void _free_machine(Machine *m) noexcept:
    free(m.buf)
    free(m.buf_w)
    free(m.buf_rows)
    free(m.written)
    free(m.read)
    free(m.inp_base)
    free(m.inp)
    free(m.inp_w)
    free(m.inp_rows)
    free(m.out_base)
    free(m.out)
    free(m.out_w)
    free(m.out_rows)
    free(m.out_size)
    free(m.weights)
    free(m.held)
    free(m.held_w)
    free(m.image_on)
    free(m.stale)
    free(m.batched)
    free(m.tile_in)
    free(m.tile_cols)
    free(m.sched_cells)
    free(m.busy)
    free(m.unit_free)
    free(m)


cdef inline int64_t _vectors(Machine *m, int op, const int64_t *ops) noexcept nogil:
    """Vectors a per-vector instruction treats in the whole batch."""
    return m.batch * m.buf_rows[ops[_ROWS_OPERAND[op]]]


cdef inline void _schedule(Machine *m, int op, const int64_t *ops) noexcept nogil:
    """``Timeline.issue``: list-schedule one instruction on its unit."""
    cdef int64_t lat = m.lat[op] * (
        _vectors(m, op, ops) if _PER_VECTOR[op] else (m.batch if _PER_ITEM[op] else 1)
    )
    cdef int unit = <int>ops[_XB_OPERAND[op]] if _UNIT[op] < 0 else m.crossbars + _UNIT[op]
    cdef int64_t start = m.unit_free[unit], end, b
    cdef int i
    for i in range(_NREADS[op]):
        start = _max(start, m.written[ops[_READS[op][i]]])
    for i in range(_NWRITES[op]):
        b = ops[_WRITES[op][i]]
        start = _max(start, _max(m.written[b], m.read[b]))
    end = start + lat
    m.unit_free[unit] = end
    for i in range(_NREADS[op]):
        b = ops[_READS[op][i]]
        m.read[b] = _max(m.read[b], end)
    for i in range(_NWRITES[op]):
        m.written[ops[_WRITES[op][i]]] = end
    m.latency = _max(m.latency, end)
    m.sequential += lat
    if _UNIT[op] < 0:
        m.busy[unit] += lat
    m.count[op] += 1


cdef inline int64_t _held_cells(Machine *m, int64_t xb) noexcept nogil:
    """Cells of what crossbar ``xb`` holds, as scheduling goes."""
    return m.sched_cells[xb]


cdef inline int64_t _image_cells(Machine *m, int64_t img) noexcept nogil:
    """Cells of image ``img``."""
    return <int64_t>m.phys_rows[img] * m.img_cols[img]


cdef inline int64_t _tile_cells(Machine *m, int64_t params) noexcept nogil:
    """Cells of the tile a progb with geometry constant ``params`` writes
    (``isa.progb_tile``)."""
    cdef const int64_t *g = m.consts[params]
    cdef int64_t rows = (g[PROGB_P_R1] - g[PROGB_P_R0]) * (2 if m.mapping == _DIFF_ROW else 1)
    return rows * (g[PROGB_P_C1] - g[PROGB_P_C0])


cdef inline const int64_t *_source_row(Machine *m, int64_t dst, int64_t dst_col,
                                       int64_t src, int64_t src_col, int64_t n,
                                       const int64_t *s) noexcept nogil:
    """Row ``s`` of the source, copied first where writing the destination would clobber
    columns still to be read (numpy computes the whole source term first)."""
    if src == dst and src_col < dst_col < src_col + n:
        memcpy(m.row, s, n * sizeof(int64_t))
        return m.row
    return s


# -------------------------------------------------------------- float kernels

ctypedef fused real:
    float
    double


cdef void _dac_plane(real *plane, const int64_t *x, int64_t stride, int64_t batch,
                     int64_t k, int64_t bit, int dac_bits, bint signed) noexcept nogil:
    """``quant.dac_chunk`` of ``x[:, :k]`` into the float plane ``[batch, k]``."""
    cdef int64_t mask = ((<int64_t>1) << dac_bits) - 1
    cdef int64_t sign = (<int64_t>1) << (dac_bits - 1)
    cdef int64_t r, j
    cdef const int64_t *row
    cdef real *dst
    for r in range(batch):
        row = x + r * stride
        dst = plane + r * k
        # Chunks fit int32, whose conversion to float vectorizes (int64's may not).
        if signed:  # sign-extend the chunk's top bit
            for j in range(k):
                dst[j] = <real>(<int32_t>((((row[j] >> bit) & mask) ^ sign) - sign))
        else:
            for j in range(k):
                dst[j] = <real>(<int32_t>((row[j] >> bit) & mask))


cdef void _adc_plane(int64_t *dst, int64_t dst_stride, const real *sums, int64_t sums_stride,
                     int64_t rows, int64_t n, int adc_bits, int64_t shift,
                     bint signed) noexcept nogil:
    """``quant.adc_read`` of integral float column sums into an int64 buffer."""
    cdef int64_t r, j, lo = 0, hi = 0, v, floor, rem, up
    cdef int64_t half = ((<int64_t>1) << (shift - 1)) if shift else 0
    cdef int64_t mask = ((<int64_t>1) << shift) - 1
    cdef const real *s
    cdef int64_t *d
    _quant_range(adc_bits if adc_bits else 1, signed, &lo, &hi)
    for r in range(rows):
        s = sums + r * sums_stride
        d = dst + r * dst_stride
        if adc_bits == 0:  # lossless
            for j in range(n):
                # float32 sums are below 2**24: the int32 conversion vectorizes
                d[j] = <int32_t>s[j] if real is float else <int64_t>s[j]
        elif shift == 0:
            for j in range(n):
                v = <int64_t>s[j]
                d[j] = lo if v < lo else (hi if v > hi else v)
        elif real is float and shift < 31:
            _adc_round_int32(d, s, n, shift, lo, hi)
        else:
            # _round_shift without branches: the remainders are random, branches mispredict.
            for j in range(n):
                v = <int64_t>s[j]
                floor = v >> shift
                rem = v & mask
                up = (rem > half) | ((rem == half) & floor & 1)
                v = floor + up
                v = lo if v < lo else (hi if v > hi else v)
                d[j] = _shl(v, shift)


cdef inline void _adc_round_int32(int64_t *d, const float *s, int64_t n, int64_t shift,
                                  int64_t lo, int64_t hi) noexcept nogil:
    """The finite-ADC read of float32 sums (below 2**24) in int32, which vectorizes.

    Half to even as ``(v + half - 1 + odd(v >> shift)) >> shift``: no branches, and no
    overflow for such sums. Clamping the code range to int32 changes nothing for them.
    """
    cdef int32_t lo32 = <int32_t>_max(lo, -2147483648)
    cdef int32_t hi32 = <int32_t>(hi if hi < 2147483647 else 2147483647)
    cdef int32_t bias = ((<int32_t>1) << (shift - 1)) - 1
    cdef int32_t sh = <int32_t>shift
    cdef int32_t v
    cdef int64_t j
    for j in range(n):
        v = <int32_t>s[j]
        v = (v + bias + ((v >> sh) & 1)) >> sh
        v = lo32 if v < lo32 else v
        v = hi32 if v > hi32 else v
        d[j] = _shl(v, sh)


cdef void _fold(real *dst, Machine *m, int img) noexcept nogil:
    """``CrossbarImage.folded`` of image ``img`` into the float plane ``[in_rows, cols]``."""
    cdef const uint8_t *cells = m.cells[img]
    cdef Py_ssize_t row_stride = m.cell_strides[2 * img], col_stride = m.cell_strides[2 * img + 1]
    cdef int k = m.in_rows[img], cols = m.img_cols[img], r, j
    cdef bint differential = m.differential[img]
    cdef const uint8_t *pos
    cdef const uint8_t *neg = cells
    cdef real *d
    for r in range(k):
        pos = cells + r * row_stride
        if differential:
            neg = cells + (r + k) * row_stride
        d = dst + r * cols
        if col_stride != 1:  # a broadcast or strided view
            for j in range(cols):
                d[j] = <real>(<int32_t>pos[j * col_stride]
                              - (<int32_t>neg[j * col_stride] if differential else 0))
        elif differential:
            for j in range(cols):
                d[j] = <real>(<int32_t>pos[j] - <int32_t>neg[j])
        else:
            for j in range(cols):
                d[j] = <real>pos[j]


cdef void _column_sums(real *image, int k, int cols, real *chunks, real *sums,
                       int rows) noexcept nogil:
    """Row-major ``sums[rows, cols] = chunks[rows, k] @ image[k, cols]``.

    In BLAS's column-major terms that is ``image^T-view @ chunks^T-view``:
    gemm('N', 'N', cols, rows, k). A GEMM packs the whole image on every call, which
    dominates for a few vectors: those take one GEMV per vector instead.
    """
    cdef char no = b'N'
    cdef real one = 1, zero = 0
    cdef int one_i = 1, r
    if rows < _GEMV_ROWS:
        for r in range(rows):
            if real is float:
                _sgemv(&no, &cols, &k, &one, image, &cols, chunks + r * k, &one_i, &zero,
                       sums + r * cols, &one_i)
            else:
                _dgemv(&no, &cols, &k, &one, image, &cols, chunks + r * k, &one_i, &zero,
                       sums + r * cols, &one_i)
    elif real is float:
        _sgemm(&no, &no, &cols, &rows, &k, &one, image, &cols, chunks, &k, &zero, sums, &cols)
    else:
        _dgemm(&no, &no, &cols, &rows, &k, &one, image, &cols, chunks, &k, &zero, sums, &cols)


cdef inline void _drive(real *chunks, real *weights, real *held, Machine *m,
                        const int64_t *ops) noexcept nogil:
    """An mvm in the core's float type: DAC chunks of the source, times the weights (each
    item's vectors times its own matrix where a progb wrote the crossbar)."""
    cdef int64_t xb = ops[MVM_XB], src = ops[MVM_SRC], item
    cdef int img = m.image_on[xb], k, cols
    cdef int rows = <int>(m.items * m.buf_rows[src]), per_item = <int>m.buf_rows[src]
    if m.batched[xb]:
        k, cols = m.tile_in[xb], m.tile_cols[xb]
    else:
        k, cols = m.in_rows[img], m.img_cols[img]
    m.held_w[xb] = cols
    _dac_plane(chunks, m.buf[src] + ops[MVM_SRC_COL], m.buf_w[src], rows, k, ops[MVM_BIT],
               m.dac_bits, ops[MVM_SIGNED] != 0)
    if not m.batched[xb]:
        _column_sums(weights, k, cols, chunks, held, rows)
        return
    for item in range(m.items):
        _column_sums(weights + item * k * cols, k, cols, chunks + item * per_item * k,
                     held + item * per_item * cols, per_item)


cdef inline void _convert(const real *held, Machine *m, const int64_t *ops) noexcept nogil:
    """An adc in the core's float type: held column sums into the destination."""
    cdef int64_t dst = ops[ADC_DST], xb = ops[ADC_XB]
    cdef int64_t rows = m.items * m.buf_rows[dst]  # as many as the mvm's source
    _adc_plane(m.buf[dst] + ops[ADC_DST_COL], m.buf_w[dst], held + ops[ADC_COL], m.held_w[xb],
               rows, ops[ADC_NCOLS], m.adc_bits, ops[ADC_SHIFT], ops[ADC_SIGNED] != 0)


# -------------------------------------------------------------- instructions
# One ``_execute_<mnemonic>`` per row of the ISA table; the generated ``_dispatch`` calls
# them. Operands are read by their generated column names (``MVM_SRC``).

cdef void _execute_halt(Machine *m, const int64_t *ops) noexcept nogil:
    pass


cdef void _execute_prog(Machine *m, const int64_t *ops) noexcept nogil:
    """Mark the crossbar's weights to be folded from the image by the next mvm that
    reads them, unless they hold it already (from the previous row tile). Bit-serial
    groups read the cells themselves: a crossbar only they drive never folds."""
    cdef int64_t xb = ops[PROG_XB]
    cdef int img = <int>ops[PROG_IMAGE]
    if m.image_on[xb] == img:
        return
    m.image_on[xb] = img
    m.batched[xb] = False
    m.stale[xb] = m.weights[xb] != NULL


cdef bint _operand_in_range(Machine *m, const int64_t *g, int64_t src) noexcept nogil:
    """Whether every operand value of the tile's items lies within signed ``bits``;
    where one does not, the first (items, then the buffer's rows and columns in order)
    is recorded as the machine's fault."""
    cdef bint transpose = g[PROGB_P_TRANSPOSE] != 0
    cdef int64_t height = g[PROGB_P_N] if transpose else g[PROGB_P_K]
    cdef int64_t width = g[PROGB_P_K] if transpose else g[PROGB_P_N]
    cdef int64_t stride = m.buf_w[src], lo = 0, hi = 0, item, r, j, v
    cdef const int64_t *row
    _quant_range(g[PROGB_P_BITS], True, &lo, &hi)
    for item in range(m.items):
        for r in range(height):
            row = m.buf[src] + (item * m.buf_rows[src] + r) * stride + g[PROGB_P_COL]
            for j in range(width):
                v = row[j]
                if v < lo or v > hi:
                    m.fault_item, m.fault_value, m.fault_src = m.first_item + item, v, src
                    m.fault_row, m.fault_col = r, g[PROGB_P_COL] + j
                    m.fault_bits = g[PROGB_P_BITS]
                    return False
    return True


cdef void _fold_operand(real *dst, Machine *m, const int64_t *g, int64_t src) noexcept nogil:
    """Each item's tile of its mapped operand, folded (``CrossbarImage.folded``), into
    ``dst`` ``[items, r1 - r0, c1 - c0]``: ``tvm_cim.core.cells.map_cells`` cell by cell.

    Logical column ``c`` belongs to block ``c // N`` (output ``c % N``): slice ``block``
    (differential-column: slice ``block // 2``, negative for odd blocks), except the
    offset mapping's ones column after the last block.
    """
    cdef bint transpose = g[PROGB_P_TRANSPOSE] != 0
    cdef int64_t n = g[PROGB_P_N], bits = g[PROGB_P_BITS], cb = m.cell_bits
    cdef int64_t slices = (bits + cb - 1) // cb, mask = ((<int64_t>1) << cb) - 1
    cdef int64_t offset = (<int64_t>1) << (bits - 1)
    cdef int64_t r0 = g[PROGB_P_R0], c0 = g[PROGB_P_C0]
    cdef int64_t inputs = g[PROGB_P_R1] - r0, cols = g[PROGB_P_C1] - c0
    cdef int64_t stride = m.buf_w[src], item, i, j, c, block, shift, out, v, cell
    cdef int64_t step_in, step_out  # buffer strides of the operand's inputs and outputs
    cdef bint negative
    cdef const int64_t *base
    cdef real *d
    step_in = 1 if transpose else stride
    step_out = stride if transpose else 1
    for item in range(m.items):
        base = m.buf[src] + item * m.buf_rows[src] * stride + g[PROGB_P_COL] + r0 * step_in
        d = dst + item * inputs * cols
        for j in range(cols):
            c = c0 + j
            if m.mapping == _OFFSET and c == slices * n:  # the ones column
                for i in range(inputs):
                    d[i * cols + j] = 1
                continue
            block = c // n
            out = c - block * n
            negative = m.mapping == _DIFF_COLUMN and (block & 1)
            shift = cb * (block >> 1 if m.mapping == _DIFF_COLUMN else block)
            for i in range(inputs):
                v = base[i * step_in + out * step_out]
                if m.mapping == _OFFSET:
                    cell = ((v + offset) >> shift) & mask
                elif m.mapping == _DIFF_ROW:  # the top row's cell minus the bottom row's
                    cell = (((v if v > 0 else 0) >> shift) & mask) - (
                        ((-v if v < 0 else 0) >> shift) & mask)
                elif negative:
                    cell = ((-v if v < 0 else 0) >> shift) & mask
                else:
                    cell = ((v if v > 0 else 0) >> shift) & mask
                d[i * cols + j] = <real>cell


cdef void _execute_progb(Machine *m, const int64_t *ops) noexcept nogil:
    """Check each item's operand, then map it into the crossbar's per-item weights where
    an mvm drives it (a crossbar nothing drives keeps no floats)."""
    cdef int64_t xb = ops[PROGB_XB], src = ops[PROGB_SRC]
    cdef const int64_t *g = m.consts[ops[PROGB_PARAMS]]
    if not _operand_in_range(m, g, src):
        m.fault_at = 0  # the caller puts the instruction's index
        return
    m.image_on[xb] = -1  # a later prog folds its image again
    m.stale[xb] = False
    m.batched[xb] = True
    m.tile_in[xb] = <int>(g[PROGB_P_R1] - g[PROGB_P_R0])
    m.tile_cols[xb] = <int>(g[PROGB_P_C1] - g[PROGB_P_C0])
    if m.weights[xb] == NULL:
        return
    if m.f32:
        _fold_operand(<float *>m.weights[xb], m, g, src)
    else:
        _fold_operand(<double *>m.weights[xb], m, g, src)


cdef inline void _fold_if_stale(Machine *m, int64_t xb) noexcept nogil:
    if not m.stale[xb]:
        return
    m.stale[xb] = False
    if m.f32:
        _fold(<float *>m.weights[xb], m, m.image_on[xb])
    else:
        _fold(<double *>m.weights[xb], m, m.image_on[xb])


cdef void _execute_load(Machine *m, const int64_t *ops) noexcept nogil:
    cdef int64_t dst = ops[LOAD_DST], dst_col = ops[LOAD_DST_COL], t = ops[LOAD_TENSOR]
    cdef int64_t src_col = ops[LOAD_SRC_COL], n = ops[LOAD_NCOLS], r
    for r in range(m.items * m.buf_rows[dst]):
        memcpy(m.buf[dst] + r * m.buf_w[dst] + dst_col,
               m.inp[t] + r * m.inp_w[t] + src_col, n * sizeof(int64_t))


cdef void _execute_mvm(Machine *m, const int64_t *ops) noexcept nogil:
    cdef int64_t xb = ops[MVM_XB]
    _fold_if_stale(m, xb)
    if m.f32:
        _drive(<float *>m.chunks, <float *>m.weights[xb], <float *>m.held[xb], m, ops)
    else:
        _drive(<double *>m.chunks, <double *>m.weights[xb], <double *>m.held[xb], m, ops)


cdef void _execute_adc(Machine *m, const int64_t *ops) noexcept nogil:
    if m.f32:
        _convert(<float *>m.held[ops[ADC_XB]], m, ops)
    else:
        _convert(<double *>m.held[ops[ADC_XB]], m, ops)


cdef void _execute_shadd(Machine *m, const int64_t *ops) noexcept nogil:
    cdef int64_t dst = ops[SHADD_DST], dst_col = ops[SHADD_DST_COL], src = ops[SHADD_SRC]
    cdef int64_t src_col = ops[SHADD_SRC_COL], n = ops[SHADD_NCOLS], shift = ops[SHADD_SHIFT]
    cdef bint neg = ops[SHADD_NEG] != 0, bcast = ops[SHADD_BCAST] != 0
    cdef int64_t r, j, term
    cdef int64_t *d
    cdef const int64_t *s
    for r in range(m.items * m.buf_rows[dst]):
        d = m.buf[dst] + r * m.buf_w[dst] + dst_col
        s = m.buf[src] + r * m.buf_w[src] + src_col
        if bcast:  # the single source column, read before any write
            term = _shl(s[0], shift)
            if neg:
                term = _sub(0, term)
            for j in range(n):
                d[j] = _add(d[j], term)
            continue
        s = _source_row(m, dst, dst_col, src, src_col, n, s)
        if neg:
            for j in range(n):
                d[j] = _sub(d[j], _shl(s[j], shift))
        else:
            for j in range(n):
                d[j] = _add(d[j], _shl(s[j], shift))


cdef void _execute_acc(Machine *m, const int64_t *ops) noexcept nogil:
    """Each item's source rows into destination rows ``dst_row ..`` of the same item."""
    cdef int64_t dst = ops[ACC_DST], dst_col = ops[ACC_DST_COL], src = ops[ACC_SRC]
    cdef int64_t src_col = ops[ACC_SRC_COL], n = ops[ACC_NCOLS], first = ops[ACC_DST_ROW]
    cdef int64_t rows = m.buf_rows[src], item, r, j
    cdef int64_t *d
    cdef const int64_t *s
    for item in range(m.items):
        for r in range(rows):
            d = m.buf[dst] + (item * m.buf_rows[dst] + first + r) * m.buf_w[dst] + dst_col
            s = m.buf[src] + (item * rows + r) * m.buf_w[src] + src_col
            s = _source_row(m, dst, dst_col, src, src_col, n, s)
            for j in range(n):
                d[j] = _add(d[j], s[j])


cdef void _execute_req(Machine *m, const int64_t *ops) noexcept nogil:
    cdef int64_t dst = ops[REQ_DST], dst_col = ops[REQ_DST_COL], src = ops[REQ_SRC]
    cdef int64_t src_col = ops[REQ_SRC_COL], n = ops[REQ_NCOLS], zp = ops[REQ_ZP]
    cdef int64_t lo = 0, hi = 0, r, j, v
    cdef const int64_t *bias = m.consts[ops[REQ_PARAMS]]
    cdef const int64_t *mult = bias + m.const_w[ops[REQ_PARAMS]]
    cdef const int64_t *shift = mult + m.const_w[ops[REQ_PARAMS]]
    cdef int64_t *d
    cdef const int64_t *s
    _quant_range(ops[REQ_BITS], ops[REQ_SIGNED] != 0, &lo, &hi)
    if ops[REQ_RELU]:  # clamp below at the zero point
        lo = _max(lo, zp)
    for r in range(m.items * m.buf_rows[dst]):
        d = m.buf[dst] + r * m.buf_w[dst] + dst_col
        s = m.buf[src] + r * m.buf_w[src] + src_col
        s = _source_row(m, dst, dst_col, src, src_col, n, s)
        for j in range(n):
            v = _add(_round_shift(_mul(_add(s[j], bias[j]), mult[j]), shift[j]), zp)
            v = _max(v, lo)  # np.clip is max-then-min: lo > hi gives hi
            d[j] = hi if v > hi else v


cdef void _execute_store(Machine *m, const int64_t *ops) noexcept nogil:
    cdef int64_t t = ops[STORE_TENSOR], dst_col = ops[STORE_DST_COL], src = ops[STORE_SRC]
    cdef int64_t src_col = ops[STORE_SRC_COL], n = ops[STORE_NCOLS], r, j
    cdef const int64_t *s
    cdef char *d
    cdef int size = m.out_size[t]
    for r in range(m.items * m.buf_rows[src]):
        s = m.buf[src] + r * m.buf_w[src] + src_col
        d = m.out[t] + (r * m.out_w[t] + dst_col) * size
        if size == 8:
            memcpy(d, s, n * sizeof(int64_t))
        elif size == 4:
            for j in range(n):
                (<uint32_t *>d)[j] = <uint32_t>(<uint64_t>s[j])
        elif size == 2:
            for j in range(n):
                (<uint16_t *>d)[j] = <uint16_t>(<uint64_t>s[j])
        else:
            for j in range(n):
                (<uint8_t *>d)[j] = <uint8_t>(<uint64_t>s[j])


cdef void _execute_im2col(Machine *m, const int64_t *ops) noexcept nogil:
    """Gather each item's convolution windows; ``pad`` where a tap falls outside."""
    cdef int64_t dst = ops[IM2COL_DST], src = ops[IM2COL_SRC], pad = ops[IM2COL_PAD]
    cdef const int64_t *g = m.consts[ops[IM2COL_PARAMS]]  # isa.IM2COL_PARAMS
    cdef int64_t H = g[0], W = g[1], C = g[2], KH = g[3], KW = g[4]
    cdef int64_t sh = g[5], sw = g[6], pt = g[7], pl = g[8], dh = g[11], dw = g[12]
    cdef int64_t OW = g[14], oh0 = ops[IM2COL_OH0]
    cdef int64_t window = m.buf_rows[dst] // OW  # the output rows dst holds per item
    cdef int64_t item, oh, ow, kh, kw, h, w, c
    cdef const int64_t *s
    cdef const int64_t *row
    cdef int64_t *d = m.buf[dst]  # dst rows are window*OW, its width KH*KW*C: in order
    for item in range(m.items):
        s = m.buf[src] + item * H * W * C
        for oh in range(oh0, oh0 + window):
            for ow in range(OW):
                for kh in range(KH):
                    h = oh * sh - pt + kh * dh
                    if h < 0 or h >= H:  # a whole kernel row of padding
                        for c in range(KW * C):
                            d[c] = pad
                        d += KW * C
                        continue
                    row = s + h * W * C
                    for kw in range(KW):
                        w = ow * sw - pl + kw * dw
                        if w < 0 or w >= W:
                            for c in range(C):
                                d[c] = pad
                        elif C >= 16:
                            memcpy(d, row + w * C, C * sizeof(int64_t))
                        else:  # a call costs more than a few moves
                            for c in range(C):
                                d[c] = row[w * C + c]
                        d += C


# ----------------------------------------------------------- bit-serial groups

cdef void _add_columns(int64_t *d, const uint8_t *pos, const uint8_t *neg, Py_ssize_t cs,
                       int64_t n, int64_t shift, bint subtract, bint bcast) noexcept nogil:
    """d[j] += (or -=) (pos - neg) << shift of n cells ``cs`` bytes apart (the same
    cell for all j where ``bcast``); ``neg`` NULL where the image is not differential."""
    cdef int64_t j, v
    if bcast:
        v = _shl(<int64_t>pos[0] - (<int64_t>neg[0] if neg != NULL else 0), shift)
        v = _sub(0, v) if subtract else v
        for j in range(n):
            d[j] = _add(d[j], v)
    elif cs == 1 and neg != NULL:
        for j in range(n):
            v = _shl(<int64_t>(<int32_t>pos[j] - <int32_t>neg[j]), shift)
            d[j] = _sub(d[j], v) if subtract else _add(d[j], v)
    elif cs == 1:
        for j in range(n):
            v = _shl(<int64_t>pos[j], shift)
            d[j] = _sub(d[j], v) if subtract else _add(d[j], v)
    else:  # a broadcast or strided view
        for j in range(n):
            v = _shl(<int64_t>pos[j * cs] - (<int64_t>neg[j * cs] if neg != NULL else 0), shift)
            d[j] = _sub(d[j], v) if subtract else _add(d[j], v)


cdef int64_t _group_weights(Machine *m, const Group *g) noexcept nogil:
    """The group's weights, ``[k, span]`` int64 into ``m.group_int``: per member and
    shadd, the image columns it reads shifted by its shift, at its inputs' rows.
    Returns the largest sum of |weights| of one column: with the most |input|, it
    bounds every partial sum of the product."""
    cdef int64_t span = g.span, i, t, r, j, v, most = 0
    cdef int img, k
    cdef Py_ssize_t rs, cs
    cdef const int64_t *member
    cdef const int64_t *term
    cdef const uint8_t *cells
    cdef int64_t *w = m.group_int
    cdef int64_t *total = m.group_int + g.k * span  # per column: the sum of |weights|
    cdef int64_t *row
    memset(w, 0, g.k * span * sizeof(int64_t))
    for i in range(g.nmembers):
        member = m.pool + g.members + 4 * i
        img = <int>member[0]
        k, cells = m.in_rows[img], m.cells[img]
        rs, cs = m.cell_strides[2 * img], m.cell_strides[2 * img + 1]
        for t in range(member[2]):
            term = m.pool + member[3] + 6 * t  # col, dst offset, ncols, neg, shift, bcast
            for r in range(k):
                _add_columns(w + (member[1] + r) * span + term[1], cells + r * rs + term[0] * cs,
                             cells + (r + k) * rs + term[0] * cs if m.differential[img] else NULL,
                             cs, term[2], term[4], term[3] != 0, term[5] != 0)
    memset(total, 0, span * sizeof(int64_t))
    for r in range(g.k):
        row = w + r * span
        for j in range(span):
            v = row[j]
            total[j] += v if v >= 0 else -v
    for j in range(span):
        most = _max(most, total[j])
    return most


cdef void _group_inputs(real *x, const int64_t *src, int64_t stride, int64_t rows,
                        Machine *m, const Group *g) noexcept nogil:
    """Each source value's chunks, shifted and summed, into the float plane [rows, k]."""
    cdef int64_t k = g.k, r, j, i, v, c
    cdef int64_t top = 64 - g.low_bits
    cdef uint64_t low = ((<uint64_t>1) << g.low_bits) - 1 if g.low_bits else 0
    cdef int64_t mask = ((<int64_t>1) << m.dac_bits) - 1
    cdef int64_t sign = (<int64_t>1) << (m.dac_bits - 1)
    cdef bint narrow = g.xmax < (<int64_t>1 << 31)  # int32 to float vectorizes
    cdef const int64_t *row
    cdef const int64_t *bit
    cdef real *d
    for r in range(rows):
        row = src + r * stride
        d = x + r * k
        if g.low_bits and g.low_signed and narrow:
            for j in range(k):
                d[j] = <real>(<int32_t>(<int64_t>((<uint64_t>row[j]) << top) >> top))
        elif g.low_bits and narrow:
            for j in range(k):
                d[j] = <real>(<int32_t>((<uint64_t>row[j]) & low))
        else:
            for j in range(k):
                v = 0
                for i in range(g.nbits):
                    bit = m.pool + g.bits + 3 * i  # bit, signed, shift
                    c = (row[j] >> bit[0]) & mask
                    if bit[1]:
                        c = (c ^ sign) - sign
                    v = _add(v, _shl(c, bit[2]))
                d[j] = <real>v


cdef void _group_product(real *weights, real *inputs, real *sums, Machine *m,
                         const Group *g) noexcept nogil:
    """dst += inputs @ weights, in blocks of _GROUP_ROWS vectors (exact: see
    ``_execute_group``)."""
    cdef int64_t i, r, j, block, r0 = 0, rows = m.items * m.buf_rows[g.src]
    cdef int64_t sw = m.buf_w[g.src], dw = m.buf_w[g.dst], span = g.span
    cdef int64_t *d
    cdef const real *s
    for i in range(g.k * span):
        weights[i] = <real>m.group_int[i]
    while r0 < rows:
        block = _GROUP_ROWS if r0 + _GROUP_ROWS <= rows else rows - r0
        _group_inputs(inputs, m.buf[g.src] + r0 * sw + g.src_col, sw, block, m, g)
        _column_sums(weights, <int>g.k, <int>span, inputs, sums, <int>block)
        for r in range(block):
            d = m.buf[g.dst] + (r0 + r) * dw + g.dmin
            s = sums + r * span
            for j in range(span):
                # float32 sums are below 2**24: the int32 conversion vectorizes
                d[j] = _add(d[j], <int32_t>s[j] if real is float else <int64_t>s[j])
        r0 += block


cdef bint _execute_group(Machine *m, const Group *g) noexcept nogil:
    """Run a bit-serial group as one product; False (nothing done) where its float sums
    might not be exact, and its instructions then run one by one.

    Every partial sum of a product is at most (most |input|) x (largest column sum of
    |weights|): below 2**24 float32 holds it exactly, below 2**53 float64 does. The
    instructions add the same integers into dst, so the result is the same, wrapping
    included (int64 addition is exact modulo 2**64 in any order).
    """
    cdef int64_t bound = _group_weights(m, g) * g.xmax  # the plan bounds this below 2**62
    if bound < (<int64_t>1 << 24):
        _group_product(<float *>m.group_weights, <float *>m.group_inputs,
                       <float *>m.group_sums, m, g)
    elif bound < (<int64_t>1 << 53):
        _group_product(<double *>m.group_weights, <double *>m.group_inputs,
                       <double *>m.group_sums, m, g)
    else:
        return False
    return True


cdef void _schedule_all(Machine *m, const int64_t *code, Py_ssize_t n,
                        Py_ssize_t width) noexcept nogil:
    cdef Py_ssize_t i
    cdef const int64_t *row
    for i in range(n):
        row = code + i * width
        _schedule(m, <int>row[0], row + 1)
        _tally(m, <int>row[0], row + 1)


cdef void _execute_tile(Machine *m, const int64_t *code, Py_ssize_t n,
                        Py_ssize_t width) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef int64_t g
    while i < n:
        g = m.group_at[i] if m.group_at != NULL else -1
        if g >= 0 and _execute_group(m, &m.groups[g]):
            # the progs within still say which image each crossbar holds
            for i in range(i, m.groups[g].end):
                if code[i * width] == PROG:
                    _dispatch(m, PROG, code + i * width + 1)
            i = m.groups[g].end
            continue
        _dispatch(m, <int>code[i * width], code + i * width + 1)
        if m.fault_at >= 0:
            m.fault_at = i
            return
        i += 1


cdef void _execute(Machine *m, const int64_t *code, Py_ssize_t n,
                   Py_ssize_t width) noexcept nogil:
    """Run the program on row tiles of ``m.tile`` items, one after the other.

    Every instruction treats each item on its own, so running the whole program per tile
    gives the same values while the tile's buffers stay in cache. Buffers are zeroed per
    tile, as the reference zeroes them per run.
    """
    cdef int64_t r0 = 0, i
    while r0 < m.batch and m.fault_at < 0:
        m.items = m.tile if r0 + m.tile <= m.batch else m.batch - r0
        m.first_item = r0
        if m.buf_total:
            memset(m.buf[0], 0, m.tile * m.buf_total * sizeof(int64_t))
        for i in range(m.n_inp):
            m.inp[i] = m.inp_base[i] + r0 * m.inp_rows[i] * m.inp_w[i]
        for i in range(m.n_out):
            m.out[i] = m.out_base[i] + r0 * m.out_rows[i] * m.out_w[i] * m.out_size[i]
        _execute_tile(m, code, n, width)
        r0 += m.tile


# ------------------------------------------------------------------------ the plan

_INT64_LIMIT = 2**63


#: Bounds that keep a group's int64 arithmetic (inputs, weights, their bound) exact.
_GROUP_LIMIT = 2**62
#: Most weights (inputs x destination columns) of one group: its scratch stays small.
_GROUP_WEIGHTS = 1 << 20


def bit_serial_groups(prepared):
    """The bit-serial groups of a verified program, which the core runs as one product
    each: ``(start, end, src, src_col, k, dst, dmin, span, bits, members)`` per group.

    A step is an mvm of one DAC chunk, the adc of its column sums into a buffer and the
    shadds of that buffer into one destination. A run of steps on one crossbar, image
    and source that combine the columns alike, each shifted by a place of its own (its
    chunk's) plus the same shifts beyond, adds ``chunks @ columns`` per step when the
    ADC is lossless (a read returns the sums), which is linear: the run adds ``inputs @
    weights``, each input the sum of its chunks shifted by their places and each weight
    the sum of the image's columns shifted by the shifts beyond. What a run leaves in
    the adc's buffer and the crossbar's column sums must be dead (overwritten before any
    read), as the product does not compute them. Runs with the same source, chunks and
    destination, one after the other (progs between them), add into one product: a
    group. ``bits`` holds ``(bit, signed, place)`` per chunk, ``members`` ``(image,
    input offset, terms)`` per run, ``terms`` ``(col, dst offset, ncols, neg, shift,
    bcast)`` per shadd.
    """
    arch = prepared.arch
    if arch.adc_bits:  # a finite ADC rounds and saturates each read: not linear
        return []
    code = prepared.code.tolist()
    accesses = _Accesses(code)
    runs, image_on, i = [], {}, 0
    while i < len(code):
        op, *ops = code[i]
        if op == PROG:
            image_on[ops[PROG_XB]] = ops[PROG_IMAGE]
        elif op == PROGB:  # one matrix per item: its mvms run one by one
            image_on.pop(ops[PROGB_XB], None)
        elif op == MVM and ops[MVM_XB] in image_on:
            run = _match_run(prepared, code, accesses, i, image_on[ops[MVM_XB]])
            if run is not None:
                runs.append(run)
                i = run[1]
                continue
        i += 1
    return _merge_runs(prepared, code, runs)


def _match_run(prepared, code, accesses, start, image):
    """``(start, end, image, src, src_col, dst, dmin, span, bits, terms)`` of the run
    that starts with the mvm at ``start``, or None."""
    xb, src, src_col = (code[start][1 + f] for f in (MVM_XB, MVM_SRC, MVM_SRC_COL))
    read, pattern, bits, i = None, None, [], start
    while i + 1 < len(code):
        mvm, adc = code[i], code[i + 1]
        if mvm[0] != MVM or (mvm[1 + MVM_XB], mvm[1 + MVM_SRC], mvm[1 + MVM_SRC_COL]) != (
            xb, src, src_col
        ):
            break
        if adc[0] != ADC or adc[1 + ADC_XB] != xb:
            break
        key = tuple(adc[1 + f] for f in (ADC_DST, ADC_DST_COL, ADC_COL, ADC_NCOLS))
        if read not in (None, key):
            break
        read = key
        terms, j = _shadds(code, i + 2, key)
        if not terms:
            break
        place = min(t[5] for t in terms)
        step = sorted(t[:5] + (t[5] - place,) + t[6:] for t in terms)
        if pattern not in (None, step):
            break
        pattern = step
        bits.append((mvm[1 + MVM_BIT], mvm[1 + MVM_SIGNED], place))
        i = j
    if not bits:
        return None
    tmp = read[0]
    dsts = {t[0] for t in pattern}
    if len(dsts) != 1:
        return None
    dst = dsts.pop()
    rows = prepared.buffer_rows
    if len({src, tmp, dst}) < 3 or len({rows[src], rows[tmp], rows[dst]}) != 1:
        return None
    if not _dead_after(code, accesses, i, xb, read):
        return None
    # the common factor of the places moves into the shifts: runs of other slices match
    low = min(place for _, _, place in bits)
    bits = tuple((bit, signed, place - low) for bit, signed, place in bits)
    dmin = min(t[1] for t in pattern)
    span = max(t[1] + t[3] for t in pattern) - dmin
    # (col, dst column, ncols, neg, shift, bcast), the col in the image
    terms = [(read[2] + sc - read[1], dc, n, neg, sh + low, bc)
             for _, dc, sc, n, neg, sh, bc in pattern]
    return (start, i, image, src, src_col, dst, dmin, span, bits, terms)


def _shadds(code, i, read):
    """The shadds from ``i`` that read the adc's columns ``read``: ``(dst, dst_col,
    src_col, ncols, neg, shift, bcast)`` each, and the index after them."""
    tmp, tmp_col, _, ncols = read
    terms = []
    while i < len(code) and code[i][0] == SHADD and code[i][1 + SHADD_SRC] == tmp:
        dst, dc, _, sc, n, sh, neg, bc = code[i][1:9]
        if not (tmp_col <= sc and sc + (1 if bc else n) <= tmp_col + ncols):
            return [], i
        terms.append((dst, dc, sc, n, neg, sh, bc))
        i += 1
    return terms, i


class _Accesses:
    """Per buffer, the instructions that read or write it; per crossbar, its mvms and
    adcs: in code order, for finding the next access after a point."""

    def __init__(self, code):
        self.buffers, self.sums = {}, {}
        for n, row in enumerate(code):
            spec = isa.BY_OPCODE[row[0]]  # field_index counts the opcode's column
            for b in {row[spec.field_index(f)] for f in spec.reads + spec.writes}:
                self.buffers.setdefault(b, []).append(n)
            if row[0] in (MVM, ADC):
                self.sums.setdefault(row[1 + (MVM_XB if row[0] == MVM else ADC_XB)], []).append(n)

    @staticmethod
    def next(at, i):
        """The first index of ``at`` from ``i`` on, or None."""
        j = bisect_left(at, i)
        return at[j] if j < len(at) else None


def _dead_after(code, accesses, i, xb, read):
    """Whether nothing from ``i`` on reads the crossbar's column sums or the adc's
    columns ``read`` before they are overwritten."""
    tmp, tmp_col, _, ncols = read
    n = accesses.next(accesses.sums.get(xb, []), i)
    if n is not None and code[n][0] == ADC:  # reads the sums an mvm of the run left
        return False
    n = accesses.next(accesses.buffers.get(tmp, []), i)
    if n is None:
        return True
    row = code[n]
    op, spec = row[0], isa.BY_OPCODE[row[0]]  # field_index counts the opcode's column
    if any(row[spec.field_index(f)] == tmp for f in spec.reads):
        return False
    if op == IM2COL:  # overwrites all of its destination
        return True
    if op in (ADC, REQ, LOAD):  # overwrite every row of their columns
        first = row[spec.field_index("dst_col")]
        return first <= tmp_col and tmp_col + ncols <= first + row[spec.field_index("ncols")]
    return False  # shadd and acc add to what is there


def _merge_runs(prepared, code, runs):
    """Consecutive runs (progs between them) with one source, chunks and destination,
    as groups whose weights stay below _GROUP_WEIGHTS and whose bounds within int64."""
    groups, current = [], None
    for run in runs:
        start, end, image, src, src_col, dst, dmin, span, bits, terms = run
        k = prepared.images[image].in_rows
        if current is not None:
            lo, hi = min(current[1], src_col), max(current[1] + current[2], src_col + k)
            first, last = min(current[3], dmin), max(current[3] + current[4], dmin + span)
            joins = (
                (src, dst, bits) == current[5]
                and all(code[j][0] == PROG for j in range(current[7], start))
                and (hi - lo) * (last - first) <= _GROUP_WEIGHTS
                and _bounded(prepared, bits, current[6] + [(image, src_col, terms)])
            )
            if joins:
                current[1:5] = [lo, hi - lo, first, last - first]
                current[6].append((image, src_col, terms))
                current[7] = end
                continue
            groups.append(_group(current))
            current = None
        if _bounded(prepared, bits, [(image, src_col, terms)]):
            current = [start, src_col, k, dmin, span, (src, dst, bits),
                       [(image, src_col, terms)], end]
    if current is not None:
        groups.append(_group(current))
    return groups


def _group(current):
    start, src_col, k, dmin, span, (src, dst, bits), members, end = current
    members = [
        (image, col - src_col, [(c, dc - dmin, n, neg, sh, bc) for c, dc, n, neg, sh, bc in terms])
        for image, col, terms in members
    ]
    return (start, end, src, src_col, k, dst, dmin, span, bits, members)


def _bounded(prepared, bits, members):
    """Whether a group's inputs, weights and their bound stay within int64."""
    cell = (1 << prepared.arch.cell_bits) - 1
    total = 0
    for image, _, terms in members:
        if max(t[4] for t in terms) >= 62:
            return False
        img = prepared.images[image]
        total += img.in_rows * sum(cell << t[4] for t in terms) * (1 + img.differential_rows)
    return _input_bound(prepared.arch, bits) * total < _GROUP_LIMIT


def _input_bound(arch, bits):
    """The most |input| of a group: each chunk at its most, shifted by its place."""
    chunk = 1 << arch.dac_bits
    return sum((chunk // 2 if signed else chunk - 1) << place for _, signed, place in bits)


def _low_bits(arch, bits):
    """``(n, signed)`` where the chunks rebuild each value's low n bits (plain, or
    sign-extended where the top chunk is signed), else ``(0, False)``."""
    for i, (bit, signed, place) in enumerate(bits):
        if bit != i * arch.dac_bits or place != bit or (signed and i != len(bits) - 1):
            return 0, False
    n = len(bits) * arch.dac_bits
    return (n, bool(bits[len(bits) - 1][1])) if n < 63 else (0, False)


cdef inline void *_data(a):
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef class _Plan:
    """What ``run`` needs from a ``PreparedProgram`` beyond its code, made once per
    prepared program (which is immutable) and cached on it."""

    cdef object keep  # the arrays the pointers below point into
    cdef const uint8_t **cells
    cdef Py_ssize_t *cell_strides
    cdef bint *differential
    cdef int *in_rows
    cdef int *phys_rows
    cdef int *img_cols
    cdef int64_t **consts
    cdef int64_t *const_w
    cdef int64_t lat[NOPS]
    cdef bint f32
    cdef int max_in_rows
    cdef int max_cols
    cdef object sums_xbs  # crossbars some mvm drives
    cdef object weight_sizes  # per crossbar of sums_xbs: most floats an image there folds to
    cdef object item_sizes  # ... and most floats per item a progb maps there
    cdef object mvm_rows  # most rows per item an mvm drives (the held sums' height)
    cdef object max_rows  # most rows per item of any buffer
    cdef object bound  # every count and time is at most batch * bound
    cdef Group *groups
    cdef object group_at  # int64 per instruction: the group starting there, else -1
    cdef object pool  # int64 bits and terms of the groups
    cdef object group_k  # most inputs of a group (0: no groups)
    cdef object group_span  # most destination columns of a group
    cdef object group_weights  # most weights (k x span) of a group

    def __cinit__(self, prepared):
        arch = prepared.arch
        images = prepared.images
        nimg, ncon = len(images), len(prepared.constants)
        self.cells = <const uint8_t **>calloc(max(nimg, 1), sizeof(uint8_t *))
        self.cell_strides = <Py_ssize_t *>calloc(max(2 * nimg, 1), sizeof(Py_ssize_t))
        self.differential = <bint *>calloc(max(nimg, 1), sizeof(bint))
        self.in_rows = <int *>calloc(max(nimg, 1), sizeof(int))
        self.phys_rows = <int *>calloc(max(nimg, 1), sizeof(int))
        self.img_cols = <int *>calloc(max(nimg, 1), sizeof(int))
        self.consts = <int64_t **>calloc(max(ncon, 1), sizeof(int64_t *))
        self.const_w = <int64_t *>calloc(max(ncon, 1), sizeof(int64_t))
        if not (self.cells and self.cell_strides and self.differential and self.in_rows
                and self.phys_rows and self.img_cols and self.consts and self.const_w):
            raise MemoryError()

        code = prepared.code
        ops = code[:, 0]
        # (crossbar, inputs, physical rows, columns) of each progb's tile
        differential = arch.mapping == "differential-row"
        tiles = [
            (xb, *isa.progb_tile(prepared.constants[c][0], differential))
            for xb, c in code[ops == PROGB][:, [1 + PROGB_XB, 1 + PROGB_PARAMS]].tolist()
        ]
        # float32 is exact when no column sum can reach 2**24.
        largest = ((1 << arch.dac_bits) * ((1 << arch.cell_bits) - 1))
        physical = [img.physical_rows for img in images] + [t[2] for t in tiles]
        self.f32 = all(rows * largest < (1 << 24) for rows in physical)
        keep = []
        for i, img in enumerate(images):
            cells = img.cells  # verified uint8: read in place, folded by each prog
            keep.append(cells)
            self.cells[i] = <const uint8_t *>_data(cells)
            self.cell_strides[2 * i] = cells.strides[0]
            self.cell_strides[2 * i + 1] = cells.strides[1]
            self.differential[i] = img.differential_rows
            self.in_rows[i] = img.in_rows
            self.phys_rows[i] = img.physical_rows
            self.img_cols[i] = img.cols
        for i, const in enumerate(prepared.constants):
            const = np.ascontiguousarray(const, dtype=np.int64)
            keep.append(const)
            self.consts[i] = <int64_t *>_data(const)
            self.const_w[i] = const.shape[1]
        self.keep = keep
        self.max_in_rows = max([img.in_rows for img in images] + [t[1] for t in tiles],
                               default=1)
        self.max_cols = max([img.cols for img in images] + [t[3] for t in tiles], default=1)

        self.sums_xbs = sorted({int(x) for x in code[ops == MVM, 1 + MVM_XB]})
        sizes = [img.in_rows * img.cols for img in images]
        largest_on = {}
        for xb, image in code[ops == PROG][:, [1 + PROG_XB, 1 + PROG_IMAGE]].tolist():
            largest_on[xb] = max(largest_on.get(xb, 0), sizes[image])
        self.weight_sizes = [largest_on.get(xb, 0) for xb in self.sums_xbs]
        per_item_on = {}
        for xb, inputs, _, cols in tiles:
            per_item_on[xb] = max(per_item_on.get(xb, 0), inputs * cols)
        self.item_sizes = [per_item_on.get(xb, 0) for xb in self.sums_xbs]
        buffer_rows = np.array(list(prepared.buffer_rows) + [1], dtype=np.int64)
        # rows per item each instruction treats (1 for those that are not per vector)
        rows = np.ones(len(code), dtype=np.int64)
        for spec in isa.INSTRUCTIONS:
            if spec.per_vector:
                at = ops == spec.opcode
                rows[at] = buffer_rows[code[at, spec.field_index(spec.rows_from)]]
        self.mvm_rows = int(rows[ops == MVM].max(initial=1))
        self.max_rows = int(buffer_rows.max())
        per_class = arch.latency_ps()
        total_ps = 0
        counted = dict.fromkeys(COUNTERS, 0)  # each counter's most, per item
        for spec in isa.INSTRUCTIONS:
            at = ops == spec.opcode
            ps = per_class[spec.latency_class] if spec.latency_class else 0
            total_ps += ps * int(rows[at].sum())
            self.lat[spec.opcode] = ps if ps < _INT64_LIMIT else 0
            for count in spec.counts:
                times = code[at, spec.field_index(count.operand)] if count.operand else 1
                most = int((rows[at] * times).sum())
                counted[count.counter] += most * arch.rows * arch.cols if count.per_cell else most
        self.bound = max(total_ps, int(rows.sum()), *counted.values())
        self._plan_groups(prepared)

    def _plan_groups(self, prepared):
        """The bit-serial groups' C table (see ``bit_serial_groups``)."""
        cdef Group *g
        found = bit_serial_groups(prepared)
        self.group_k = max((g[4] for g in found), default=0)
        self.group_span = max((g[7] for g in found), default=0)
        self.group_weights = max((g[4] * g[7] for g in found), default=0)
        if not found:
            return
        self.groups = <Group *>calloc(len(found), sizeof(Group))
        if self.groups == NULL:
            raise MemoryError()
        at = np.full(len(prepared.code), -1, dtype=np.int64)
        pool = []
        for n, (start, end, src, src_col, k, dst, dmin, span, bits, members) in enumerate(found):
            at[start] = n
            g = &self.groups[n]
            g.start, g.end, g.src, g.src_col, g.k, g.dst = start, end, src, src_col, k, dst
            g.dmin, g.span = dmin, span
            g.xmax = _input_bound(prepared.arch, bits)
            g.low_bits, g.low_signed = _low_bits(prepared.arch, bits)
            g.nbits, g.bits = len(bits), len(pool)
            pool += [v for step in bits for v in step]
            table = []  # (image, input offset, nterms, terms at) per member
            for image, offset, terms in members:
                table += [image, offset, len(terms), len(pool)]
                pool += [v for term in terms for v in term]
            g.nmembers, g.members = len(members), len(pool)
            pool += table
        self.group_at = at
        self.pool = np.array(pool or [0], dtype=np.int64)

    def __dealloc__(self):
        free(self.cells)
        free(self.cell_strides)
        free(self.differential)
        free(self.in_rows)
        free(self.phys_rows)
        free(self.img_cols)
        free(self.consts)
        free(self.const_w)
        free(self.groups)


cdef _Plan _plan_for(prepared):
    plan = getattr(prepared, "_core_plan", None)
    if plan is None:
        plan = _Plan(prepared)
        prepared._core_plan = plan
    return <_Plan>plan


# ------------------------------------------------------------------------- entry

#: Bytes of buffers, column sums and DAC chunks one row tile may take: small enough to
#: stay in cache, while the tile is tall enough (_MIN_TILE vectors) for GEMMs to run
#: efficiently. A tile holds whole items (``memory_bytes`` counts what it really takes).
_TILE_BYTES = 2 << 20
_MIN_TILE = 128


def _tile_layout(_Plan plan, prepared, batch):
    """``(float dtype, items per row tile, int64 values of each buffer per item)`` of a
    functional run of ``batch`` items."""
    dtype = np.float32 if plan.f32 else np.float64
    per_item = [w * r for w, r in zip(prepared.buffers, prepared.buffer_rows)]
    item_bytes = 8 * sum(per_item) + dtype().itemsize * (
        plan.mvm_rows * (len(plan.sums_xbs) * plan.max_cols + plan.max_in_rows)
        + sum(plan.item_sizes)
    )
    min_items = -(-_MIN_TILE // plan.max_rows)
    tile = min(batch, max(min_items, _TILE_BYTES // item_bytes, 1))
    return dtype, tile, per_item


def _weight_floats(_Plan plan, tile):
    """Floats of the weights of each crossbar of ``plan.sums_xbs``: the largest image it
    folds, or its progbs' matrices for the ``tile`` items of a row tile."""
    return [max(w, tile * i) for w, i in zip(plan.weight_sizes, plan.item_sizes)]


def memory_bytes(prepared, batch, functional):
    """Bytes ``run`` allocates for ``batch`` items: the outputs, and for values the int64
    inputs, the crossbars' float weights, one row tile of buffers, column sums and DAC
    chunks, and a row of scratch. The same sizes ``run`` allocates, from the same plan."""
    cdef _Plan plan = _plan_for(prepared)
    if batch * plan.bound >= _INT64_LIMIT:  # run hands such a batch to the reference
        return reference.memory_bytes(prepared, batch, functional)
    total = reference.OVERHEAD_BYTES + sum(
        batch * t.rows * t.width * np.dtype(t.dtype).itemsize for t in prepared.outputs
    )
    if not functional:
        return total
    dtype, tile, per_item = _tile_layout(plan, prepared, batch)
    size = dtype().itemsize
    vectors = tile * plan.mvm_rows
    total += 8 * batch * sum(t.rows * t.width for t in prepared.inputs)
    total += size * max(sum(_weight_floats(plan, tile)), 1)
    total += 8 * max(tile * sum(per_item), 1)
    total += size * max(len(plan.sums_xbs), 1) * vectors * plan.max_cols
    total += size * vectors * plan.max_in_rows
    total += _group_scratch_bytes(plan, tile)
    return total + 8 * max(prepared.buffers, default=1)


def _group_rows(_Plan plan, tile):
    """Vectors per product of a bit-serial group: at most _GROUP_ROWS, or the tile's."""
    return min(_GROUP_ROWS, tile * plan.max_rows)


def _group_scratch_bytes(_Plan plan, tile):
    """Bytes of the groups' scratch (int64 and float64 weights, inputs and sums)."""
    if not plan.group_k:
        return 0
    rows = _group_rows(plan, tile)
    return 8 * (2 * plan.group_weights + plan.group_span + rows * (plan.group_k + plan.group_span))


def run(prepared, arrays, batch, functional):
    """Execute a verified ``PreparedProgram``; returns ``(outputs, stats)`` exactly as
    ``reference.run`` does."""
    cdef _Plan plan = _plan_for(prepared)
    if batch * plan.bound >= _INT64_LIMIT:  # the tally would overflow: keep Python's ints
        return reference.run(prepared, arrays, batch, functional)
    arch = prepared.arch
    cdef const int64_t[:, ::1] code = prepared.code
    cdef int64_t nb = batch, tile, offset
    outputs = [np.zeros((nb * t.rows, t.width), dtype=t.dtype) for t in prepared.outputs]
    cdef Py_ssize_t i
    cdef Machine *m = _new_machine(
        len(prepared.buffers), arch.crossbars, len(prepared.inputs), len(prepared.outputs)
    )
    if m == NULL:
        raise MemoryError()
    try:
        m.batch = nb
        for i, rows in enumerate(prepared.buffer_rows):
            m.buf_rows[i] = rows
        m.crossbars = arch.crossbars
        m.dac_bits = arch.dac_bits
        m.adc_bits = arch.adc_bits or 0
        m.cell_bits = arch.cell_bits
        m.mapping = _MAPPING_CODES[arch.mapping]
        m.fault_at = -1
        m.f32 = plan.f32
        m.cells = plan.cells
        m.cell_strides = plan.cell_strides
        m.differential = plan.differential
        m.in_rows = plan.in_rows
        m.phys_rows = plan.phys_rows
        m.img_cols = plan.img_cols
        m.consts = plan.consts
        m.const_w = plan.const_w
        m.lat = plan.lat
        with nogil:
            _schedule_all(m, &code[0, 0], code.shape[0], code.shape[1])
        if functional:
            dtype, tile, per_item = _tile_layout(plan, prepared, nb)
            widths = prepared.buffers
            nsums = len(plan.sums_xbs)
            # this run's own: runs of one prepared program may overlap (without the GIL)
            weight_floats = _weight_floats(plan, tile)
            weights = np.empty(max(sum(weight_floats), 1), dtype=dtype)
            offset = 0
            for i, xb in enumerate(plan.sums_xbs):
                m.weights[xb] = <char *>_data(weights) + offset
                offset += weight_floats[i] * weights.itemsize
            for i in range(arch.crossbars):
                m.image_on[i] = -1
            m.tile = tile
            m.buf_total = sum(per_item)
            tile_buffers = np.empty(max(tile * m.buf_total, 1), dtype=np.int64)
            offset = 0
            for i, w in enumerate(widths):
                m.buf[i] = <int64_t *>_data(tile_buffers) + offset
                m.buf_w[i] = w
                offset += tile * per_item[i]
            arrays = [np.ascontiguousarray(a, dtype=np.int64) for a in arrays]
            m.n_inp = len(arrays)
            for i, a in enumerate(arrays):
                m.inp_base[i] = <int64_t *>_data(a)
                m.inp_w[i] = a.shape[1]
                m.inp_rows[i] = prepared.inputs[i].rows
            m.n_out = len(outputs)
            for i, o in enumerate(outputs):
                m.out_base[i] = <char *>_data(o)
                m.out_w[i] = o.shape[1]
                m.out_rows[i] = prepared.outputs[i].rows
                m.out_size[i] = o.itemsize
            vectors = tile * plan.mvm_rows  # the most one mvm of the tile drives
            sums = np.empty((max(nsums, 1), vectors * plan.max_cols), dtype=dtype)
            offset = sums.strides[0]
            for i, xb in enumerate(plan.sums_xbs):
                m.held[xb] = <char *>_data(sums) + i * offset
            chunks = np.empty(vectors * plan.max_in_rows, dtype=dtype)
            m.chunks = _data(chunks)
            row = np.empty(max(widths, default=1), dtype=np.int64)
            m.row = <int64_t *>_data(row)
            if plan.group_k:  # float64 sized: a group takes float32 or float64
                group_rows = _group_rows(plan, tile)
                group_int = np.empty(plan.group_weights + plan.group_span, dtype=np.int64)
                group_weights = np.empty(plan.group_weights, dtype=np.float64)
                group_inputs = np.empty(group_rows * plan.group_k, dtype=np.float64)
                group_sums = np.empty(group_rows * plan.group_span, dtype=np.float64)
                m.groups = plan.groups
                m.group_at = <int64_t *>_data(plan.group_at)
                m.pool = <int64_t *>_data(plan.pool)
                m.group_int = <int64_t *>_data(group_int)
                m.group_weights = _data(group_weights)
                m.group_inputs = _data(group_inputs)
                m.group_sums = _data(group_sums)
            _blas_threads.hold()
            try:
                with nogil:
                    _execute(m, &code[0, 0], code.shape[0], code.shape[1])
            finally:
                _blas_threads.release()
            if m.fault_at >= 0:
                raise reference.operand_range_error(
                    m.fault_at, m.fault_item, m.fault_value, m.fault_src, m.fault_row,
                    m.fault_col, m.fault_bits
                )
        return outputs, _stats(m, arch, batch)
    finally:
        _free_machine(m)


cdef _stats(Machine *m, arch, batch):
    instructions = {
        spec.mnemonic: int(m.count[spec.opcode])
        for spec in isa.INSTRUCTIONS
        if m.count[spec.opcode]
    }
    return SimStats(
        arch,
        batch,
        latency_ps=int(m.latency),
        sequential_ps=int(m.sequential),
        instructions=instructions,
        **{name: int(m.counters[i]) for i, name in enumerate(COUNTERS)},
        busy_ps=[int(m.busy[x]) for x in range(arch.crossbars)],
    )
