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
#include <stdlib.h>
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
   size), src rows ss values apart (tile_copy: dst rows ds apart): the transposing copy between a 2D transform's two
   stages, in TILE x TILE blocks
   (torch's copy reads or writes one of them along 1 KiB strides at n = 128: cache-set conflicts) */
typedef struct { uint64_t re, im; } E_f64;
typedef uint64_t E_f32;
#define TRANSPOSE(S, TILE)                                                                                            \
static void tile_copy_##S(long rows, long cols, const E_##S *R s, long ss, E_##S *R d, long ds) {                     \
  for (long r0 = 0; r0 < rows; r0 += TILE)                                                                            \
    for (long c0 = 0; c0 < cols; c0 += TILE) {                                                                        \
      long r1 = r0 + TILE < rows ? r0 + TILE : rows, c1 = c0 + TILE < cols ? c0 + TILE : cols;                        \
      for (long c = c0; c < c1; c++)                                                                                  \
        for (long r = r0; r < r1; r++) d[c*ds + r] = s[r*ss + c];                                                     \
    }                                                                                                                 \
}                                                                                                                     \
void transpose_##S(long B, long rows, long cols, const E_##S *src, long ss, E_##S *dst) {                             \
  for (long b = 0; b < B; b++) tile_copy_##S(rows, cols, src + b*rows*ss, ss, dst + b*rows*cols, rows);               \
}

/* MKL's DFTI, as torch's CPU build exports it (bound at run time by mkl_bind; fused.py passes the addresses) */
typedef long (*dfti_create)(void **, int, ...);
typedef long (*dfti_set)(void *, int, ...);
typedef long (*dfti_commit)(void *);
typedef long (*dfti_compute)(void *, void *, ...);
typedef long (*dfti_free)(void **);
static dfti_create create_f32, create_f64;
static dfti_set dfti_set_value;
static dfti_commit dfti_commit_descriptor;
static dfti_compute dfti_forward, dfti_backward;
static dfti_free dfti_free_descriptor;
void mkl_bind(void *cs, void *cd, void *set, void *commit, void *fwd, void *bwd, void *fr) {
  create_f32 = (dfti_create)cs; create_f64 = (dfti_create)cd; dfti_set_value = (dfti_set)set;
  dfti_commit_descriptor = (dfti_commit)commit; dfti_forward = (dfti_compute)fwd; dfti_backward = (dfti_compute)bwd;
  dfti_free_descriptor = (dfti_free)fr;
}
/* whether all k plans were made; if not, the ones that were are freed */
static int planned(void **h, int k) {
  int all = 1;
  for (int i = 0; i < k; i++) all &= h[i] != 0;
  for (int i = 0; i < k && !all; i++) if (h[i]) dfti_free_descriptor(&h[i]);
  return all;
}
enum { BACKWARD_SCALE = 5, NUMBER_OF_TRANSFORMS = 7, CONJUGATE_EVEN_STORAGE = 10, PLACEMENT = 11, INPUT_STRIDES = 12,
       OUTPUT_STRIDES = 13, INPUT_DISTANCE = 14, OUTPUT_DISTANCE = 15, THREAD_LIMIT = 27,
       DOMAIN_COMPLEX = 32, DOMAIN_REAL = 33, COMPLEX_COMPLEX = 39, NOT_INPLACE = 44 };

/* a batch of 1D transforms configured as torch's _plan_mkl_fft does for a contiguous tensor (so torch's bits),
   on one thread: `howmany` transforms of length len, id / od values apart; bscale: the backward transforms' scale
   (torch's default norm: 1/len), 0 for none */
static void *plan(dfti_create create, int domain, long len, long howmany, long id, long od, double bscale) {
  void *h = 0; long unit[2] = {0, 1};
  if (create(&h, domain, len)) return 0;
  long r = dfti_set_value(h, PLACEMENT, NOT_INPLACE) | dfti_set_value(h, NUMBER_OF_TRANSFORMS, howmany)
         | dfti_set_value(h, INPUT_DISTANCE, id) | dfti_set_value(h, OUTPUT_DISTANCE, od)
         | dfti_set_value(h, INPUT_STRIDES, unit) | dfti_set_value(h, OUTPUT_STRIDES, unit)
         | dfti_set_value(h, THREAD_LIMIT, 1L);
  if (domain == DOMAIN_REAL) r |= dfti_set_value(h, CONJUGATE_EVEN_STORAGE, COMPLEX_COMPLEX);
  if (bscale != 0) r |= dfti_set_value(h, BACKWARD_SCALE, bscale);
  if (r || dfti_commit_descriptor(h)) { dfti_free_descriptor(&h); return 0; }
  return h;
}

/* one member's transforms at n x n: [0] for 3 stacked fields, [1] for 5; the flux pair's forward ones */
typedef struct { long n; void *c2c[2], *c2r[2], *r2c, *c2c_flux; } Plans;

/* the lane step of kernels.lane_step for one member at a time (its transforms, the fused passes above and the C
   transposes, all in cache), the members' results independent of each other: chunk=1's bits; buf: one member's
   scratch, 26 M + 7 P reals (kept by the caller from step to step) */
#define STEP(T, S)                                                                                                    \
void *plans_##S(long n) {                                                                                             \
  long m = n/2 + 1; Plans *p = calloc(1, sizeof *p); if (!p) return 0;                                                \
  p->n = n;                                                                                                           \
  for (int k = 0; k < 2; k++) {                                                                                       \
    long K = k ? 5 : 3;                                                                                               \
    p->c2c[k] = plan(create_##S, DOMAIN_COMPLEX, n, K*m, n, n, 0);                                                    \
    p->c2r[k] = plan(create_##S, DOMAIN_REAL, n, K*n, m, n, 0);                                                       \
  }                                                                                                                   \
  p->r2c = plan(create_##S, DOMAIN_REAL, n, 2*n, n, m, 0);                                                            \
  p->c2c_flux = plan(create_##S, DOMAIN_COMPLEX, n, 2*m, n, n, 0);                                                    \
  if (!planned((void *[]){p->c2c[0], p->c2c[1], p->c2r[0], p->c2r[1], p->r2c, p->c2c_flux}, 6)) {                   \
    free(p); return 0;                                                                                                \
  }                                                                                                                   \
  return p;                                                                                                           \
}                                                                                                                     \
/* the flux spectra fh of (u w, v w) from the stacked spectra a of (w, u, v[, U, V]) (kernels.irfft2_k1 unscaled,  \
   the products, kernels.rfft2_k1), and max(U^2 + V^2) into s2 when K = 5; a and b are scratch */                    \
static void flux_spectra_##S(const Plans *p, long K, T *a, T *b, T *fields, T *fl, T *fh, T *s2) {                    \
  long n = p->n, m = n/2 + 1, P = n*n; int k = K == 5;                                                                \
  dfti_backward(p->c2c[k], a, b);                                                                                     \
  transpose_##S(K, m, n, (const E_##S *)b, n, (E_##S *)a);                                                            \
  dfti_backward(p->c2r[k], a, fields);                                                                                \
  flux1_##S(P, fields, fields + P, fields + 2*P, fl, fl + P);                                                         \
  if (K == 5) *s2 = speed1_##S(P, fields + 3*P, fields + 4*P);                                                        \
  dfti_forward(p->r2c, fl, b);                                                                                        \
  transpose_##S(2, n, m, (const E_##S *)b, m, (E_##S *)a);                                                            \
  dfti_forward(p->c2c_flux, a, fh);                                                                                   \
}                                                                                                                     \
void step_##S(const Plans *p, long B, long K, const T *w, const T *e, long es, const T *g, const T *n1, long ns,       \
             const T *tm, const T *lm, const T *fm, long fidx, T f_mode, T *wo, T *n1o, T *s2, T *bad, T *buf) {     \
  long n = p->n, M = n*(n/2 + 1), P = n*n;                                                                            \
  T *a = buf, *b = a + 10*M, *fields = b + 10*M, *fl = fields + 5*P, *fh = fl + 2*P, *ew = fh + 4*M;                 \
  for (long i = 0; i < B; i++) {                                                                                      \
    const T *eb = e + 2*i*es, *gb = g + 2*i*es, *nb = n1 + 2*i*ns; T *wb = wo + 2*i*M, *ob = n1o + 2*i*M;             \
    predict1_##S(M, w + 2*i*M, eb, gb, nb, tm, ew, a);                                                                \
    flux_spectra_##S(p, 3, a, b, fields, fl, fh, 0);                                                                  \
    if (K == 5) correct1_5_##S(M, fh, fm, fidx, f_mode, ew, gb, nb, lm, wb, a);                                       \
    else correct1_3_##S(M, fh, fm, fidx, f_mode, ew, gb, nb, lm, wb, a);                                              \
    bad[i] = nonfinite_##S(2*M, wb) ? (T)NAN : (T)0;                                                                  \
    flux_spectra_##S(p, K, a, b, fields, fl, fh, K == 5 ? s2 + i : 0);                                                \
    tendency1_##S(M, fh, fm, ob);                                                                                     \
    if (fidx >= 0) { ob[2*fidx] += f_mode; ob[2*fidx+1] += (T)0; }                                                    \
  }                                                                                                                   \
}                                                                                                                     \
/* only the transforms (and their transposing copies) of `steps` steps of B members with K-field looks, on zeroed   \
   scratch: what `step` costs beyond its elementwise passes (benchmarks/bench_ns_solver.py, "fft floor") */           \
int transforms_##S(const Plans *p, long B, long K, long steps) {                                                      \
  long n = p->n, m = n/2 + 1, M = n*m, P = n*n;                                                                       \
  size_t bytes = sizeof(T) * (size_t)(24*M + 7*P); bytes = (bytes + 63) / 64 * 64;                                    \
  T *a = aligned_alloc(64, bytes); if (!a) return 1;                                                                  \
  memset(a, 0, bytes);                                                                                                \
  T *b = a + 10*M, *fields = b + 10*M, *fl = fields + 5*P, *fh = fl + 2*P;                                            \
  for (long s = 0; s < steps; s++)                                                                                    \
    for (long i = 0; i < B; i++)                                                                                      \
      for (int k = 0; k < 2; k++) {                                                                                   \
        long Kk = k ? K : 3; int j = Kk == 5;                                                                         \
        dfti_backward(p->c2c[j], a, b);                                                                               \
        transpose_##S(Kk, m, n, (const E_##S *)b, n, (E_##S *)a);                                                     \
        dfti_backward(p->c2r[j], a, fields);                                                                          \
        dfti_forward(p->r2c, fl, b);                                                                                  \
        transpose_##S(2, n, m, (const E_##S *)b, m, (E_##S *)a);                                                      \
        dfti_forward(p->c2c_flux, a, fh);                                                                             \
      }                                                                                                               \
  free(a); return 0;                                                                                                  \
}

/* kernels.cn_factors for a real L/2 (hv's imaginary parts all zero, as NavierStokes2D makes it) and B steps dts:
   q = 1/(1 - a dt), e = 2q - 1, g = q dt, imaginary parts +0 (torch's complex ops give these bits for such input,
   tested); returns 1, having written nothing useful, where an imaginary part of hv is not zero */
#define FACTORS(T, S)                                                                                                 \
int cn_factors_##S(long B, long M, const T *R hv, const T *R dts, T *R e, T *R g) {                                   \
  for (long i = 0; i < M; i++) if (hv[2*i+1] != (T)0) return 1;                                                       \
  for (long b = 0; b < B; b++) {                                                                                      \
    T d = dts[b]; T *R eb = e + 2*b*M, *R gb = g + 2*b*M;                                                             \
    _Pragma("GCC ivdep") for (long i = 0; i < M; i++) {                                                               \
      T q = (T)1 / ((T)1 - hv[2*i] * d);                                                                              \
      eb[2*i] = (T)2 * q - (T)1; eb[2*i+1] = (T)0; gb[2*i] = q * d; gb[2*i+1] = (T)0;                                 \
    }                                                                                                                 \
  }                                                                                                                   \
  return 0;                                                                                                           \
}

#define ALL(T, S, TMAX, FMAX, TILE) PREDICT(T, S) CORRECT(T, S, 3) CORRECT(T, S, 5) FINITE(T, S, TMAX)                \
  DRIVE_CORRECT(T, S) TENDENCY(T, S) PRODUCT(T, S, FMAX) TRANSPOSE(S, TILE) STEP(T, S) FACTORS(T, S)
ALL(float, f32, FLT_MAX, fmaxf, 32)
ALL(double, f64, DBL_MAX, fmax, 16)

/* The MPI slab solver's local work (mpi_slab.py), float64: a rank owns nl = n/ranks physical rows (nl, n) and kl
   spectral columns k2 (padded to kp = ranks kl), its spectra k1-contiguous (kl, n). Its transforms are SlabFFT's
   torch calls, planned as torch plans them: the inverse is a c2c along k1 (scaled 1/n), the Alltoall, the unpacking
   of the received (ranks, K, kl, nl) rows into (K, nl, kp) and a c2r along y (scaled 1/n); the forward an r2c along
   y, the packing into (ranks, 2, kl, nl) (padding columns zero), the Alltoall and a c2c along k1. mpi_slab.py runs
   the Alltoalls between these calls (with one rank the send buffer is the received one). */
typedef struct { long n, nl, kl, kp, ranks; void *c2c_b[2], *c2r[2], *r2c, *c2c_f; } Slab;

void *slab_plans(long n, long ranks) {
  long m = n/2 + 1, kl = (m + ranks - 1) / ranks; Slab *p = calloc(1, sizeof *p); if (!p) return 0;
  p->n = n; p->ranks = ranks; p->nl = n / ranks; p->kl = kl; p->kp = kl * ranks;
  for (int k = 0; k < 2; k++) {
    long K = k ? 5 : 3;
    p->c2c_b[k] = plan(create_f64, DOMAIN_COMPLEX, n, K*kl, n, n, 1.0 / n);
    p->c2r[k] = plan(create_f64, DOMAIN_REAL, n, K*p->nl, p->kp, n, 1.0 / n);
  }
  p->r2c = plan(create_f64, DOMAIN_REAL, n, 2*p->nl, n, m, 0);
  p->c2c_f = plan(create_f64, DOMAIN_COMPLEX, n, 2*kl, n, n, 0);
  if (!planned((void *[]){p->c2c_b[0], p->c2c_b[1], p->c2r[0], p->c2r[1], p->r2c, p->c2c_f}, 6)) { free(p); return 0; }
  return p;
}

/* the predictor (ew = w e, spec = (ew + g n1) tm, 3 fields) and the inverse's first stage into out (3, kl, n) */
void slab_predict(const Slab *p, const double *w, const double *e, const double *g, const double *n1,
                  const double *tm, double *ew, double *spec, double *out) {
  predict_f64(1, p->n * p->kl, w, e, 0, g, 0, n1, 0, tm, ew, spec);
  dfti_backward(p->c2c_b[0], spec, out);
}

/* the inverse's rest from the received rows recv (ranks, K, kl, nl) (half: (K, nl, kp) scratch), the products
   (u w, v w) (max(U^2 + V^2) into s2 when K = 5) and the forward's first stage, packed into send (ranks, 2, kl, nl)
   (a: scratch) */
void slab_flux(const Slab *p, long K, const double *recv, double *half, double *fields, double *fl, double *a,
               double *send, double *s2) {
  long n = p->n, nl = p->nl, kl = p->kl, kp = p->kp, m = n/2 + 1, P = nl*n;
  for (long s = 0; s < p->ranks; s++)
    for (long j = 0; j < K; j++)
      tile_copy_f64(kl, nl, (const E_f64 *)recv + (s*K + j)*kl*nl, nl, (E_f64 *)half + j*nl*kp + s*kl, kp);
  dfti_backward(p->c2r[K == 5], half, fields);
  product_f64(1, P, K, fields, fl, s2);
  dfti_forward(p->r2c, fl, a);
  for (long r = 0; r < p->ranks; r++) {
    long c = m - r*kl < kl ? (m - r*kl > 0 ? m - r*kl : 0) : kl;  /* rank r's columns that exist */
    for (long j = 0; j < 2; j++) {
      E_f64 *d = (E_f64 *)send + (r*2 + j)*kl*nl;
      tile_copy_f64(nl, c, (const E_f64 *)a + j*nl*m + r*kl, m, d, nl);
      memset(d + c*nl, 0, sizeof(E_f64) * (size_t)((kl - c)*nl));
    }
  }
}

/* the forward's last stage of the received flux rows spec (2, kl, n) into fh, the corrector (w = ew + (g/2)(n1 + N),
   the K look fields w lm), bad = NaN if w is not finite (else 0), and the look's inverse first stage into out */
void slab_correct(const Slab *p, long K, const double *spec, double *fh, const double *fm, long fidx, double f_mode,
                  const double *ew, const double *g, const double *n1, const double *lm, double *w, double *look,
                  double *out, double *bad) {
  dfti_forward(p->c2c_f, (void *)spec, fh);
  correct_f64(1, p->n * p->kl, K, fh, fm, fidx, f_mode, ew, g, 0, n1, 0, lm, w, look, bad);
  dfti_backward(p->c2c_b[K == 5], look, out);
}

/* the forward's last stage of the received flux rows spec into fh and the tendency N = fh0 fm0 + fh1 fm1 (+ forcing) */
void slab_tendency(const Slab *p, const double *spec, double *fh, const double *fm, long fidx, double f_mode,
                   double *out) {
  dfti_forward(p->c2c_f, (void *)spec, fh);
  tendency_f64(1, p->n * p->kl, fh, fm, fidx, f_mode, out);
}
"""
