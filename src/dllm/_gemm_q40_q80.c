/* Q4_0 x Q8_0 matrix product of T >= 1 input rows (decode, prefill, batched serving), in
 * integer SIMD as GGML's ggml_vec_dot_q4_0_q8_0 computes each block: the one compiled C part
 * of the "fast" backend (dllm.kernels_fast calls it; docs/benchmarks.md says why numba is not
 * enough here: its loops never emit the u8 x s8 pair multiply, vpmaddubsw, that this needs).
 *
 * Operands (all C-contiguous; shapes as dllm.kernels_fast builds them):
 *   codes   (G, nb, 16, R) uint8   code byte j of block b of each of the group's R rows
 *   scales  (G, nb, R)     uint16  the blocks' f16 scale bits
 *   pairs   (T, nb, 16)    int16   input codes (x_j, x_{j+16}) of each block as two int8 bytes
 *   offsets (T, nb)        int16   -8 * the block's input code sum, modulo 2^16
 *   x_scale (T, nb)        float32 the input blocks' f16-rounded scales
 *   out     (T, stride)    float32 out[t, row_base + g R + i] = row i of group g times row t
 * R is a multiple of 32. A code byte c holds lo + 16 hi (lo for element j, hi for j + 16), so a
 * block's dot product is
 *     sum_j lo_j x_j + hi_j x_{j+16}  -  8 sum_j (x_j + x_{j+16})
 * with 0 <= lo, hi <= 15 and |x| <= 127: the first sum is what vpmaddubsw forms from the
 * unpacked codes (unsigned) and the input pairs (signed), at most 3810 per pair, so it never
 * saturates; summed in wrapping int16 lanes with the offset, the result is exact because the
 * true block sum is at most 32 * 8 * 127 = 32512 in magnitude.
 *
 * Every output is then sum over blocks, in block order, of float(block sum) * (d_w * d_x) in
 * float32, with no fused multiply-add (built with -ffp-contract=off): the very operations of
 * the numba decode kernel, so a row of this product equals that row decoded alone, bit for bit.
 *
 * AVX2 only, checked at run time: on other CPUs isa() is "none" and dllm.kernels_fast keeps to
 * numba (a portable C loop measured no faster than numba's int16 kernel, so none is here).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 32    /* rows per inner loop: R is a multiple */
#define TILE 4      /* input rows per group pass: AVX2's 16 registers hold 2 x TILE sums */
#define PREFETCH_BLOCKS 4   /* decode reads this many blocks ahead (docs/benchmarks.md) */

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1

/* One group of R rows (codes/scales point at the group's block 0), tt <= TILE input rows;
 * acc (tt, R) float32 receives the sums. Block by block, so that the group's codes stream
 * through once; within a block, CHUNK rows at a time. After unpacking the (lo, hi) byte pairs
 * within 128-bit lanes, sums_a holds rows 0-7 (low half) and 16-23 (high half) of the chunk,
 * sums_b rows 8-15 and 24-31. */
static void group_avx2_t1(const uint8_t *, const uint16_t *, int, int, const int16_t *,
                          const int16_t *, const float *, float *);

__attribute__((target("avx2,f16c")))
static void group_avx2(const uint8_t *codes, const uint16_t *scales, int R, int nb,
                       const int16_t *pairs, const int16_t *offsets, const float *x_scale,
                       int tt, float *acc)
{
    if (tt == 1) {
        group_avx2_t1(codes, scales, R, nb, pairs, offsets, x_scale, acc);
        return;
    }
    const __m256i nibble = _mm256_set1_epi8(15);
    for (int k = 0; k < tt * R; k++) acc[k] = 0.0f;
    for (int b = 0; b < nb; b++) {
        for (int i0 = 0; i0 < R; i0 += CHUNK) {
            __m256i sums_a[TILE], sums_b[TILE];
            for (int t = 0; t < TILE; t++)
                sums_a[t] = sums_b[t] = _mm256_set1_epi16(t < tt ? offsets[(size_t)t * nb + b] : 0);
            const uint8_t *c = codes + (size_t)b * 16 * R + i0;
            for (int j = 0; j < 16; j++, c += R) {
                const __m256i packed = _mm256_loadu_si256((const __m256i *)c);
                const __m256i lo = _mm256_and_si256(packed, nibble);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
                const __m256i w_a = _mm256_unpacklo_epi8(lo, hi);
                const __m256i w_b = _mm256_unpackhi_epi8(lo, hi);
                for (int t = 0; t < TILE; t++) {
                    if (t < tt) {
                        const __m256i x = _mm256_set1_epi16(pairs[((size_t)t * nb + b) * 16 + j]);
                        sums_a[t] = _mm256_add_epi16(sums_a[t], _mm256_maddubs_epi16(w_a, x));
                        sums_b[t] = _mm256_add_epi16(sums_b[t], _mm256_maddubs_epi16(w_b, x));
                    }
                }
            }
            __m256 d[4];                       /* rows i0 + 8k .. i0 + 8k + 7 */
            for (int k = 0; k < 4; k++)
                d[k] = _mm256_cvtph_ps(
                    _mm_loadu_si128((const __m128i *)(scales + (size_t)b * R + i0 + 8 * k)));
            for (int t = 0; t < tt; t++) {
                const __m256 xd = _mm256_set1_ps(x_scale[(size_t)t * nb + b]);
                const __m128i part[4] = {_mm256_castsi256_si128(sums_a[t]),
                                         _mm256_castsi256_si128(sums_b[t]),
                                         _mm256_extracti128_si256(sums_a[t], 1),
                                         _mm256_extracti128_si256(sums_b[t], 1)};
                for (int k = 0; k < 4; k++) {
                    float *a = acc + (size_t)t * R + i0 + 8 * k;
                    const __m256 sum = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part[k]));
                    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a),
                                                      _mm256_mul_ps(sum, _mm256_mul_ps(d[k], xd))));
                }
            }
        }
    }
}

/* T = 1 (decode, memory-bound): one input row, so the group's R / CHUNK chunks share each
 * code byte position's input pair, the block's 16 x R code bytes are read in address order,
 * the float sums stay in registers, and the codes PREFETCH_BLOCKS blocks ahead are asked for
 * in advance. The same integer sums and float32 operations, in the same order, as the
 * general path: its results are bit for bit those of group_avx2 with tt = 1 (tested). */
__attribute__((target("avx2,f16c")))
static void group_avx2_t1(const uint8_t *codes, const uint16_t *scales, int R, int nb,
                          const int16_t *pairs, const int16_t *offsets, const float *x_scale,
                          float *acc)
{
    const __m256i nibble = _mm256_set1_epi8(15);
    const int chunks = R / CHUNK;
    __m256 sum_f[4][4];
    for (int k = 0; k < chunks; k++)
        for (int q = 0; q < 4; q++) sum_f[k][q] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i sums_a[4], sums_b[4];
        const __m256i start = _mm256_set1_epi16(offsets[b]);
        for (int k = 0; k < chunks; k++) sums_a[k] = sums_b[k] = start;
        const uint8_t *c = codes + (size_t)b * 16 * R;
        if (b + PREFETCH_BLOCKS < nb)       /* the hardware prefetcher alone falls behind */
            for (int line = 0; line < 16 * R; line += 64)
                _mm_prefetch((const char *)(c + (size_t)PREFETCH_BLOCKS * 16 * R + line),
                             _MM_HINT_T0);
        for (int j = 0; j < 16; j++, c += R) {
            const __m256i x = _mm256_set1_epi16(pairs[(size_t)b * 16 + j]);
            for (int k = 0; k < chunks; k++) {
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(c + k * CHUNK));
                const __m256i lo = _mm256_and_si256(packed, nibble);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
                sums_a[k] = _mm256_add_epi16(sums_a[k], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(lo, hi), x));
                sums_b[k] = _mm256_add_epi16(sums_b[k], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(lo, hi), x));
            }
        }
        const __m256 xd = _mm256_set1_ps(x_scale[b]);
        for (int k = 0; k < chunks; k++) {
            const __m128i part[4] = {_mm256_castsi256_si128(sums_a[k]),
                                     _mm256_castsi256_si128(sums_b[k]),
                                     _mm256_extracti128_si256(sums_a[k], 1),
                                     _mm256_extracti128_si256(sums_b[k], 1)};
            for (int q = 0; q < 4; q++) {
                const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(
                    (const __m128i *)(scales + (size_t)b * R + k * CHUNK + 8 * q)));
                const __m256 sum = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part[q]));
                sum_f[k][q] = _mm256_add_ps(sum_f[k][q], _mm256_mul_ps(sum, _mm256_mul_ps(d, xd)));
            }
        }
    }
    for (int k = 0; k < chunks; k++)
        for (int q = 0; q < 4; q++) _mm256_storeu_ps(acc + k * CHUNK + 8 * q, sum_f[k][q]);
}

static int cpu_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#else
#define HAVE_AVX2_PATH 0
static int cpu_has_avx2(void) { return 0; }
#endif

typedef void (*group_fn)(const uint8_t *, const uint16_t *, int, int, const int16_t *,
                         const int16_t *, const float *, int, float *);

#define MAX_R 128   /* the largest group (dllm.kernels_fast.GROUP_ROWS) */

static void gemm(group_fn group, const uint8_t *codes, const uint16_t *scales, Py_ssize_t R,
                 Py_ssize_t nb, Py_ssize_t g0, Py_ssize_t g1, const int16_t *pairs,
                 const int16_t *offsets, const float *x_scale, Py_ssize_t T, float *out,
                 Py_ssize_t stride, Py_ssize_t row_base)
{
    float acc[TILE * MAX_R];
    for (Py_ssize_t g = g0; g < g1; g++) {
        const uint8_t *c = codes + (size_t)g * nb * 16 * R;
        const uint16_t *s = scales + (size_t)g * nb * R;
        for (Py_ssize_t t0 = 0; t0 < T; t0 += TILE) {
            const int tt = (int)(T - t0 < TILE ? T - t0 : TILE);
            group(c, s, (int)R, (int)nb, pairs + t0 * nb * 16, offsets + t0 * nb,
                  x_scale + t0 * nb, tt, acc);
            for (int t = 0; t < tt; t++)
                memcpy(out + (t0 + t) * stride + row_base + g * R, acc + (size_t)t * R,
                       R * sizeof(float));
        }
    }
}

static int get(PyObject *obj, Py_buffer *view, Py_ssize_t need, int writable, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, the product needs %zd", name,
                     view->len, need);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static group_fn best_group(void)
{
#if HAVE_AVX2_PATH
    if (cpu_has_avx2()) return group_avx2;
#endif
    return NULL;
}

/* gemm(codes, scales, R, nb, g0, g1, pairs, offsets, x_scale, T, out, stride, row_base):
 * groups g0..g1-1 of the operands above into out; releases the GIL while it computes. */
static PyObject *py_gemm(PyObject *self, PyObject *args)
{
    PyObject *o[6];
    Py_ssize_t R, nb, g0, g1, T, stride, row_base;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOnnnnOOOnOnn", &o[0], &o[1], &R, &nb, &g0, &g1, &o[2], &o[3],
                          &o[4], &T, &o[5], &stride, &row_base))
        return NULL;
    const group_fn group = best_group();
    if (group == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "gemm: this CPU has no AVX2 (see isa())");
        return NULL;
    }
    if (R <= 0 || R % CHUNK || R > MAX_R || nb <= 0 || g0 < 0 || g1 < g0 || T < 0 || row_base < 0 ||
        row_base + g1 * R > stride) {
        PyErr_SetString(PyExc_ValueError, "gemm: inconsistent sizes");
        return NULL;
    }
    const Py_ssize_t need[6] = {g1 * nb * 16 * R, g1 * nb * R * 2, T * nb * 16 * 2, T * nb * 2,
                                T * nb * 4, T * stride * 4};
    const char *names[6] = {"codes", "scales", "pairs", "offsets", "x_scale", "out"};
    Py_buffer v[6];
    int got = 0;
    for (; got < 6; got++)
        if (get(o[got], &v[got], need[got], got == 5, names[got]) < 0) break;
    if (got == 6) {
        Py_BEGIN_ALLOW_THREADS
        gemm(group, v[0].buf, v[1].buf, R, nb, g0, g1, v[2].buf, v[3].buf, v[4].buf, T,
             v[5].buf, stride, row_base);
        Py_END_ALLOW_THREADS
    }
    for (int k = 0; k < got; k++) PyBuffer_Release(&v[k]);
    if (got < 6) return NULL;
    Py_RETURN_NONE;
}

/* isa(): the instruction set gemm runs on this CPU, "avx2", or "none" where it cannot run. */
static PyObject *py_isa(PyObject *self, PyObject *args)
{
    (void)self; (void)args;
    return PyUnicode_FromString(best_group() ? "avx2" : "none");
}

static PyMethodDef methods[] = {
    {"gemm", py_gemm, METH_VARARGS, "Q4_0 x Q8_0 groups into out (see the C source)."},
    {"isa", py_isa, METH_NOARGS, "The implementation gemm runs by default on this CPU."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gemm_q40_q80",
                                    "Q4_0 x Q8_0 GEMM in integer SIMD (dllm.kernels_fast).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__gemm_q40_q80(void) { return PyModule_Create(&module); }
