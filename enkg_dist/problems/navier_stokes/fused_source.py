"""C source of the fused lane kernels (`fused.py`): a lane step's elementwise passes in four loops, the same IEEE
operations in the same order as `kernels.lane_step`'s torch ops (no FMA contraction: -ffp-contract=off), and the
transposing copies between its transforms' stages.

Complex numbers are interleaved (re, im); M complex values per field, every spectrum in the solver's k1-contiguous
layout; a stack of K fields is K consecutive fields. Batch strides (in complex values) are given where an operand may
be shared by the lane's members (the step's factors e, g: 0) or strided (n1 from the scripted look: 2M).
"""

SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
typedef uint32_t U_f32;
typedef uint64_t U_f64;
#define R restrict
#define MRE(ar, ai, br, bi) ((ar) * (br) - (ai) * (bi))
#define MIM(ar, ai, br, bi) ((ar) * (bi) + (ai) * (br))

/* ew = w e;  spec_j = (ew + g n1) tm_j, j < 3  (kernels.heun_cn: w_hat * e, addcmul, unsqueeze * tendency_mult) */
#define PREDICT(T, S)                                                                                                 \
static void predict1_##S(long M, const T *R w, const T *R e, const T *R g, const T *R n1, const T *R tm,              \
                         T *R ew, T *R spec) {                                                                        \
  _Pragma("GCC ivdep") for (long i = 0; i < M; i++) {                                                                 \
    T xr = MRE(w[2*i], w[2*i+1], e[2*i], e[2*i+1]), xi = MIM(w[2*i], w[2*i+1], e[2*i], e[2*i+1]);                     \
    ew[2*i] = xr; ew[2*i+1] = xi;                                                                                     \
    T tr = xr + MRE(g[2*i], g[2*i+1], n1[2*i], n1[2*i+1]), ti = xi + MIM(g[2*i], g[2*i+1], n1[2*i], n1[2*i+1]);       \
    for (int j = 0; j < 3; j++) {                                                                                     \
      const T *m = tm + 2*j*M; T *s = spec + 2*j*M;                                                                   \
      s[2*i] = MRE(tr, ti, m[2*i], m[2*i+1]); s[2*i+1] = MIM(tr, ti, m[2*i], m[2*i+1]);                               \
    }                                                                                                                 \
  }                                                                                                                   \
}                                                                                                                     \
void predict_##S(long B, long M, const T *w, const T *e, long es, const T *g, long gs, const T *n1, long ns,          \
                 const T *tm, T *ew, T *spec) {                                                                       \
  for (long b = 0; b < B; b++)                                                                                        \
    predict1_##S(M, w + 2*b*M, e + 2*b*es, g + 2*b*gs, n1 + 2*b*ns, tm, ew + 2*b*M, spec + 2*b*3*M);                  \
}

/* the tendency at mode i from the flux spectra f, f1 and multipliers fm, q: f fm + f1 q (mul_, then add_) */
#define TEND(T)                                                                                                       \
  T tr = MRE(f[2*i], f[2*i+1], fm[2*i], fm[2*i+1]) + MRE(f1[2*i], f1[2*i+1], q[2*i], q[2*i+1]);                       \
  T ti = MIM(f[2*i], f[2*i+1], fm[2*i], fm[2*i+1]) + MIM(f1[2*i], f1[2*i+1], q[2*i], q[2*i+1]);

/* at mode i: w = ew + (g/2)(n1 + N), N = TEND (+ the forcing when FORCED); spec_j = w lm_j, j < K */
#define CORRECT_AT(T, K, FORCED)                                                                                      \
  TEND(T)                                                                                                             \
  if (FORCED) { tr += f_mode; ti += (T)0; }                                                                           \
  T sr = n1[2*i] + tr, si = n1[2*i+1] + ti, hr = (T)0.5 * g[2*i], hi = (T)0.5 * g[2*i+1];                             \
  T xr = ew[2*i] + MRE(hr, hi, sr, si), xi = ew[2*i+1] + MIM(hr, hi, sr, si);                                         \
  w[2*i] = xr; w[2*i+1] = xi;                                                                                         \
  for (int j = 0; j < K; j++) {                                                                                       \
    const T *m = lm + 2*j*M; T *s = spec + 2*j*M;                                                                     \
    s[2*i] = MRE(xr, xi, m[2*i], m[2*i+1]); s[2*i+1] = MIM(xr, xi, m[2*i], m[2*i+1]);                                 \
  }

/* the corrector over a member's modes, then its forcing mode fidx again with the forcing (one mode, no branch in
   the vectorised loop) */
#define CORRECT(T, S, K)                                                                                              \
static void correct1_##K##_##S(long M, const T *R f, const T *R fm, long fidx, T f_mode, const T *R ew,               \
                               const T *R g, const T *R n1, const T *R lm, T *R w, T *R spec) {                       \
  const T *R f1 = f + 2*M, *R q = fm + 2*M;                                                                           \
  _Pragma("GCC ivdep") for (long i = 0; i < M; i++) { CORRECT_AT(T, K, 0) }                                           \
  if (fidx >= 0) { long i = fidx; CORRECT_AT(T, K, 1) }                                                               \
}

/* whether any of n values is not finite (the caller stores NaN for such a member, else 0) */
#define FINITE(T, S, TMAX)                                                                                            \
static int nonfinite_##S(long n, const T *R x) {                                                                      \
  int bad = 0;                                                                                                        \
  for (long i = 0; i < n; i++) bad |= !(x[i] <= TMAX && x[i] >= -TMAX);                                               \
  return bad;                                                                                                         \
}

#define DRIVE_CORRECT(T, S)                                                                                           \
void correct_##S(long B, long M, long K, const T *fh, const T *fm, long fidx, T f_mode, const T *ew, const T *g,      \
                 long gs, const T *n1, long ns, const T *lm, T *w, T *spec, T *bad) {                                 \
  for (long b = 0; b < B; b++) {                                                                                      \
    const T *f = fh + 4*b*M, *gb = g + 2*b*gs, *nb = n1 + 2*b*ns, *eb = ew + 2*b*M;                                   \
    T *wb = w + 2*b*M, *sb = spec + 2*b*K*M;                                                                          \
    if (K == 5) correct1_5_##S(M, f, fm, fidx, f_mode, eb, gb, nb, lm, wb, sb);                                       \
    else correct1_3_##S(M, f, fm, fidx, f_mode, eb, gb, nb, lm, wb, sb);                                              \
    bad[b] = nonfinite_##S(2*M, wb) ? (T)NAN : (T)0;                                                                  \
  }                                                                                                                   \
}

/* out = fh0 fm0 + fh1 fm1, + the forcing at fidx (kernels.tendency_from_spectra's last lines) */
#define TENDENCY(T, S)                                                                                                \
static void tendency1_##S(long M, const T *R f, const T *R fm, T *R o) {                                              \
  const T *R f1 = f + 2*M, *R q = fm + 2*M;                                                                           \
  _Pragma("GCC ivdep") for (long i = 0; i < M; i++) {                                                                 \
    TEND(T)                                                                                                           \
    o[2*i] = tr; o[2*i+1] = ti;                                                                                       \
  }                                                                                                                   \
}                                                                                                                     \
void tendency_##S(long B, long M, const T *fh, const T *fm, long fidx, T f_mode, T *out) {                            \
  for (long b = 0; b < B; b++) {                                                                                      \
    tendency1_##S(M, fh + 4*b*M, fm, out + 2*b*M);                                                                    \
    if (fidx >= 0) { out[2*(b*M+fidx)] += f_mode; out[2*(b*M+fidx)+1] += (T)0; }                                      \
  }                                                                                                                   \
}

/* (u w, v w) from the fields (w, u, v[, U, V]) of n x n = P points; s2 = max(U^2 + V^2) when K = 5 (NaN if any) */
#define PRODUCT(T, S, FMAX)                                                                                           \
static void flux1_##S(long P, const T *R w, const T *R u, const T *R v, T *R fu, T *R fv) {                           \
  _Pragma("GCC ivdep") for (long i = 0; i < P; i++) { fu[i] = u[i] * w[i]; fv[i] = v[i] * w[i]; }                     \
}                                                                                                                     \
static T speed1_##S(long P, const T *R U, const T *R V) {                                                             \
  U_##S m = 0;                                                                                                        \
  for (long i = 0; i < P; i++) {                                                                                      \
    T x = U[i] * U[i] + V[i] * V[i]; U_##S b; memcpy(&b, &x, sizeof b); m = b > m ? b : m;                            \
  }                                                                                                                   \
  T r; memcpy(&r, &m, sizeof r); return r;                                                                            \
}                                                                                                                     \
void product_##S(long B, long P, long K, const T *f, T *flux, T *s2) {                                                \
  for (long b = 0; b < B; b++) {                                                                                      \
    const T *w = f + b*K*P;                                                                                           \
    flux1_##S(P, w, w + P, w + 2*P, flux + 2*b*P, flux + (2*b+1)*P);                                                  \
    if (K == 5) s2[b] = speed1_##S(P, w + 3*P, w + 4*P);                                                              \
  }                                                                                                                   \
}

/* dst[b][c][r] = src[b][r][c] for B matrices of rows x cols complex values (E: one complex as an integer type of its
   size), src rows ss values apart: the transposing copy between a 2D transform's two stages, in TILE x TILE blocks
   (torch's copy reads or writes one of them along 1 KiB strides at n = 128: cache-set conflicts) */
typedef struct { uint64_t re, im; } E_f64;
typedef uint64_t E_f32;
#define TRANSPOSE(S, TILE)                                                                                            \
void transpose_##S(long B, long rows, long cols, const E_##S *src, long ss, E_##S *dst) {                             \
  for (long b = 0; b < B; b++) {                                                                                      \
    const E_##S *R s = src + b*rows*ss; E_##S *R d = dst + b*rows*cols;                                               \
    for (long r0 = 0; r0 < rows; r0 += TILE)                                                                          \
      for (long c0 = 0; c0 < cols; c0 += TILE) {                                                                      \
        long r1 = r0 + TILE < rows ? r0 + TILE : rows, c1 = c0 + TILE < cols ? c0 + TILE : cols;                      \
        for (long c = c0; c < c1; c++)                                                                                \
          for (long r = r0; r < r1; r++) d[c*rows + r] = s[r*ss + c];                                                 \
      }                                                                                                               \
  }                                                                                                                   \
}

#define ALL(T, S, TMAX, FMAX, TILE) PREDICT(T, S) CORRECT(T, S, 3) CORRECT(T, S, 5) FINITE(T, S, TMAX)                \
  DRIVE_CORRECT(T, S) TENDENCY(T, S) PRODUCT(T, S, FMAX) TRANSPOSE(S, TILE)
ALL(float, f32, FLT_MAX, fmaxf, 32)
ALL(double, f64, DBL_MAX, fmax, 16)
"""
