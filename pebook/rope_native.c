/* RoPE, half layout, in one pass: pebook.rope_native compiles and loads this file.

   Su et al. (2021), "RoFormer", arXiv:2104.09864, eq. (34), with the features paired (j, j + half)
   as in GPT-NeoX and transformers' Llama (rotate_half). For x1 = x[:half], x2 = x[half:]:

       out1 = x1 cos - x2 sin,    out2 = x2 cos + x1 sin.

   Written to round exactly as PyTorch's eager three passes on the CPU do,

       out = x * cat(cos, cos);   out1.addcmul_(x2, sin, value=-1);   out2.addcmul_(x1, sin)

   whose vectorised addcmul is a fused multiply-add on the rounded product x*cos:
   out1 = fma(-x2, sin, x1*cos), out2 = fma(x1, sin, x2*cos). Compile with -ffp-contract=off so
   that the compiler fuses nothing else (pebook.rope_native checks the result against eager).

   Plain C: no Python or torch headers. Strides are in elements.
     x      (n_b, n_h, n_l, 2*half), strides (xs_b, xs_h, xs_l, 1): any strided view
     out    contiguous (n_b, n_h, n_l, 2*half)
     cos, sin  (n_l, half) tables (ts_b = 0) or (n_b, 1, n_l, half) ones (ts_b = n_l*half);
            ts_l is the stride between positions, the last dimension has stride 1
   Rows are the flattened (b, h, l) indices in [row_begin, row_end), so that threads can each
   take a range of them. The *_threads functions split the rows over n_threads OpenMP threads when
   built with -fopenmp (pebook.rope_native does so where that runtime is torch's own libgomp, so
   that the rows run on torch's thread team), and run them in the calling thread otherwise. */

#include <math.h>
#include <stdint.h>

/* the loader's build key (source, flags, compiler, CPU), found in the file before it is loaded */
#ifndef PEBOOK_ROPE_KEY
#define PEBOOK_ROPE_KEY "pebook-rope-native:unkeyed"
#endif
const char pebook_rope_native_key[] = PEBOOK_ROPE_KEY;

#define PEBOOK_ROPE_ROW(NAME, T, FMA)                                                             \
    static inline void NAME(const T *restrict x1, const T *restrict x2, T *restrict o1,           \
                            T *restrict o2, const T *restrict c, const T *restrict s,             \
                            int64_t half) {                                                       \
        for (int64_t j = 0; j < half; ++j) {                                                      \
            o1[j] = FMA(-x2[j], s[j], x1[j] * c[j]);                                              \
            o2[j] = FMA(x1[j], s[j], x2[j] * c[j]);                                               \
        }                                                                                         \
    }

PEBOOK_ROPE_ROW(rope_row_f32, float, fmaf)
PEBOOK_ROPE_ROW(rope_row_f64, double, fma)

#define PEBOOK_ROPE_HALF(NAME, ROW, T)                                                            \
    void NAME(const T *x, T *out, const T *cos, const T *sin, int64_t half, int64_t n_b,          \
              int64_t n_h, int64_t n_l, int64_t xs_b, int64_t xs_h, int64_t xs_l, int64_t ts_b,   \
              int64_t ts_l, int64_t row_begin, int64_t row_end) {                                 \
        if (row_begin >= row_end || half <= 0 || n_l <= 0 || n_h <= 0)                            \
            return;                                                                               \
        (void)n_b;                                                                                \
        /* (b, h, l) of the first row, then counted up: no division per row */                    \
        int64_t l = row_begin % n_l, bh = row_begin / n_l;                                        \
        int64_t h = bh % n_h, b = bh / n_h;                                                       \
        for (int64_t row = row_begin; row < row_end; ++row) {                                     \
            const T *x1 = x + b * xs_b + h * xs_h + l * xs_l;                                     \
            T *o1 = out + row * 2 * half;                                                         \
            int64_t t = b * ts_b + l * ts_l;                                                      \
            ROW(x1, x1 + half, o1, o1 + half, cos + t, sin + t, half);                            \
            if (++l == n_l) {                                                                     \
                l = 0;                                                                            \
                if (++h == n_h) {                                                                 \
                    h = 0;                                                                        \
                    ++b;                                                                          \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

PEBOOK_ROPE_HALF(pebook_rope_half_f32, rope_row_f32, float)
PEBOOK_ROPE_HALF(pebook_rope_half_f64, rope_row_f64, double)

int pebook_rope_native_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#ifdef _OPENMP
#define PEBOOK_OMP_FOR _Pragma("omp parallel for num_threads(parts) schedule(static, 1)")
#else
#define PEBOOK_OMP_FOR
#endif

#define PEBOOK_ROPE_HALF_THREADS(NAME, KERNEL, T)                                                 \
    void NAME(const T *x, T *out, const T *cos, const T *sin, int64_t half, int64_t n_b,          \
              int64_t n_h, int64_t n_l, int64_t xs_b, int64_t xs_h, int64_t xs_l, int64_t ts_b,   \
              int64_t ts_l, int64_t row_begin, int64_t row_end, int64_t n_threads) {              \
        int64_t rows = row_end - row_begin;                                                       \
        int parts = (int)(n_threads < rows ? n_threads : rows);                                   \
        if (parts <= 1) {                                                                         \
            KERNEL(x, out, cos, sin, half, n_b, n_h, n_l, xs_b, xs_h, xs_l, ts_b, ts_l, row_begin, \
                   row_end);                                                                      \
            return;                                                                               \
        }                                                                                         \
        PEBOOK_OMP_FOR                                                                            \
        for (int part = 0; part < parts; ++part)                                                  \
            KERNEL(x, out, cos, sin, half, n_b, n_h, n_l, xs_b, xs_h, xs_l, ts_b, ts_l,           \
                   row_begin + rows * part / parts, row_begin + rows * (part + 1) / parts);       \
    }

PEBOOK_ROPE_HALF_THREADS(pebook_rope_half_f32_threads, pebook_rope_half_f32, float)
PEBOOK_ROPE_HALF_THREADS(pebook_rope_half_f64_threads, pebook_rope_half_f64, double)
