/* charlm's single-step kernels: one call runs a whole decoding step of M models for B <= 16 rows.
 * See charlm/cells/native.py for the layouts, the build and the fallback. */
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { K_F32 = 0, K_BF16 = 1, K_I8 = 2 };
enum { C_LSTM = 0, C_PEEPHOLE = 1, C_GRU = 2, C_RNN = 3, C_MINGRU = 4, C_MINLSTM = 5 };

typedef struct {
    int32_t kind, rows, cols, kpad, ngroups, pad_;
    const void *w;          /* groups of 64 rows; see native.py pack() */
    const float *scale;     /* int8: one per row */
    const int32_t *rowsum;  /* int8: sum of each row's int8 weights */
} mat_t;

typedef struct {
    int32_t cell, layers, H, V, G, pad_;
    const float *table0;          /* (V, G*H): layer 0's input product and its biases, per id */
    const mat_t *rec;             /* [layers]: recurrent matrix (lstm/peephole/rnn: layer 0 only; gru: every layer) */
    const mat_t *inp;             /* [layers]: k >= 1: [W_ih W_hh] (lstm/peephole/rnn) or W_ih (gru, minimal) */
    const float *const *bias;     /* [layers]: k >= 1: the input side's bias (G*H) */
    const float *const *bias_h;   /* [layers]: gru: b_hh (3H) */
    const float *const *peep;     /* [layers]: peephole: (3, H) for i, f, o */
    mat_t head;
    const float *head_b;          /* (V) */
} model_t;

int cl_version(void) { return 2; }

int cl_features(void) {
    int f = 0;
#if defined(__AVX512F__)
    f |= 1;
#endif
#if defined(__AVX512BF16__)
    f |= 2;
#endif
#if defined(__AVX512VNNI__)
    f |= 4;
#endif
#if defined(_OPENMP)
    f |= 8;
#endif
    return f;
}

/* ---- the activations' math: 16 lanes at a time (GCC/clang vector extensions, any ISA) ---- */
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#define VL 16

static inline vf vsplat(float a) { return (vf){0} + a; }
static inline vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
static inline vf vload(const float *p, int m) {
    vf v = {0};
    if (m == VL) memcpy(&v, p, sizeof v);
    else memcpy(&v, p, sizeof(float) * m);
    return v;
}
static inline void vstore(float *p, vf v, int m) {
    if (m == VL) memcpy(p, &v, sizeof v);
    else memcpy(p, &v, sizeof(float) * m);
}

/* exp(x) to ~2 ulp (Cephes' expf); 0 at and below -87, so that a -inf logit stays impossible. */
static inline vf v_exp(vf x) {
    vi low = x <= -87.0f;
    vf xc = vsel(low, vsplat(-87.0f), x);
    xc = vsel(xc > 88.0f, vsplat(88.0f), xc);
    vf y = xc * 1.44269504088896341f + 0.5f;
    vi t = __builtin_convertvector(y, vi);
    t = t + (vi)(__builtin_convertvector(t, vf) > y); /* truncation -> floor (a true comparison is -1) */
    vf n = __builtin_convertvector(t, vf);
    vf r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vf e = p * (vf)((t + 127) << 23); /* times 2^n */
    return vsel(low, vsplat(0.0f), e);
}
static inline vf v_sigmoid(vf x) { return 1.0f / (1.0f + v_exp(-x)); }
/* Cephes' tanhf: an odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above. */
static inline vf v_tanh(vf x) {
    vi neg = x < 0.0f;
    vf a = vsel(neg, -x, x);
    vf z = x * x;
    vf small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z
                - 3.33332819422e-1f) * z * x + x;
    vf big = 1.0f - 2.0f / (v_exp(2.0f * a) + 1.0f);
    big = vsel(neg, -big, big);
    return vsel(a < 0.625f, small, big);
}
static inline float cl_exp(float x) {
    vf v = v_exp(vsplat(x));
    return v[0];
}

/* ---- packing the activations of one matrix-vector product ---- */
static inline uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even, as torch's .to(bfloat16) */
    return (uint16_t)(u >> 16);
}

/* x[b] = [x1[b], x2[b]] zero-padded to kpad, in the matrix's input format; returns bytes used. */
static size_t pack_x(const mat_t *m, int B, const float *x1, int n1, int ld1, const float *x2, int n2, int ld2,
                     void *buf, float *qscale) {
    int kp = m->kpad;
    if (m->kind == K_F32) {
        float *xs = (float *)buf;
        for (int b = 0; b < B; b++) {
            float *d = xs + (size_t)b * kp;
            memcpy(d, x1 + (size_t)b * ld1, sizeof(float) * n1);
            if (n2) memcpy(d + n1, x2 + (size_t)b * ld2, sizeof(float) * n2);
            for (int k = n1 + n2; k < kp; k++) d[k] = 0.0f;
        }
        return sizeof(float) * (size_t)B * kp;
    }
    if (m->kind == K_BF16) {
        uint16_t *xs = (uint16_t *)buf;
        for (int b = 0; b < B; b++) {
            uint16_t *d = xs + (size_t)b * kp;
            const float *s1 = x1 + (size_t)b * ld1, *s2 = x2 ? x2 + (size_t)b * ld2 : 0;
            for (int k = 0; k < n1; k++) d[k] = to_bf16(s1[k]);
            for (int k = 0; k < n2; k++) d[n1 + k] = to_bf16(s2[k]);
            for (int k = n1 + n2; k < kp; k++) d[k] = 0;
        }
        return sizeof(uint16_t) * (size_t)B * kp;
    }
    /* int8 weights: the activations as 16-bit integers with one scale per row, split in a high and a
     * low byte (x = 256 * hi + lo), so that both halves go through u8 x s8 dot products exactly. */
    uint8_t *hi = (uint8_t *)buf, *lo = hi + (size_t)B * kp;
    for (int b = 0; b < B; b++) {
        const float *s1 = x1 + (size_t)b * ld1, *s2 = x2 ? x2 + (size_t)b * ld2 : 0;
        float amax = 0.0f;
        for (int k = 0; k < n1; k++) { float v = fabsf(s1[k]); amax = v > amax ? v : amax; }
        for (int k = 0; k < n2; k++) { float v = fabsf(s2[k]); amax = v > amax ? v : amax; }
        float s = amax > 0.0f ? amax / 32767.0f : 1.0f;
        qscale[b] = s;
        uint8_t *h = hi + (size_t)b * kp, *l = lo + (size_t)b * kp;
        for (int k = 0; k < n1 + n2; k++) {
            float v = (k < n1 ? s1[k] : s2[k - n1]) / s; /* rounded half to even below, as torch.round */
            int32_t q = (int32_t)lrintf(v);
            q = q > 32767 ? 32767 : (q < -32767 ? -32767 : q);
            h[k] = (uint8_t)((q >> 8) + 128);
            l[k] = (uint8_t)(q & 255);
        }
        for (int k = n1 + n2; k < kp; k++) { h[k] = 128; l[k] = 0; }
    }
    return 2 * (size_t)B * kp;
}

/* ---- one group of 64 rows (4 blocks of 16) against RB <= 4 activation rows ---- */
#define GROUP 64
#if defined(__AVX512F__)
static inline __attribute__((always_inline)) void tile_f32(const float *w, int kp, const float *x, int RB, float *out) {
    __m512 acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int g = 0; g < 4; g++) acc[r][g] = _mm512_setzero_ps();
    for (int k = 0; k < kp; k++) {
        const float *wk = w + (size_t)k * GROUP;
        __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16), w2 = _mm512_loadu_ps(wk + 32), w3 = _mm512_loadu_ps(wk + 48);
        for (int r = 0; r < RB; r++) {
            __m512 xv = _mm512_set1_ps(x[(size_t)r * kp + k]);
            acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(xv, w2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(xv, w3, acc[r][3]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int g = 0; g < 4; g++) _mm512_storeu_ps(out + r * GROUP + g * 16, acc[r][g]);
}
#else
static inline __attribute__((always_inline)) void tile_f32(const float *w, int kp, const float *x, int RB, float *out) {
    float acc[4][GROUP];
    for (int r = 0; r < RB; r++)
        for (int l = 0; l < GROUP; l++) acc[r][l] = 0.0f;
    for (int k = 0; k < kp; k++) {
        const float *wk = w + (size_t)k * GROUP;
        for (int r = 0; r < RB; r++) {
            float xv = x[(size_t)r * kp + k];
            for (int l = 0; l < GROUP; l++) acc[r][l] += xv * wk[l];
        }
    }
    for (int r = 0; r < RB; r++) memcpy(out + r * GROUP, acc[r], sizeof(float) * GROUP);
}
#endif

/* bf16: weights as pairs along the input ([kpad/2][64][2]), activations as bf16 pairs. */
#if defined(__AVX512BF16__)
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *w, int kp, const uint16_t *x, int RB, float *out) {
    __m512 acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int g = 0; g < 4; g++) acc[r][g] = _mm512_setzero_ps();
    for (int k = 0; k < kp; k += 2) {
        const uint16_t *wk = w + (size_t)k * GROUP;
        __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 32), w2 = _mm512_loadu_si512(wk + 64), w3 = _mm512_loadu_si512(wk + 96);
        for (int r = 0; r < RB; r++) {
            int32_t pair;
            memcpy(&pair, x + (size_t)r * kp + k, 4);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, (__m512bh)w0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, (__m512bh)w1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xv, (__m512bh)w2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xv, (__m512bh)w3);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int g = 0; g < 4; g++) _mm512_storeu_ps(out + r * GROUP + g * 16, acc[r][g]);
}
#else
static inline float bf16_f(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *w, int kp, const uint16_t *x, int RB, float *out) {
    float acc[4][GROUP];
    for (int r = 0; r < RB; r++)
        for (int l = 0; l < GROUP; l++) acc[r][l] = 0.0f;
    for (int k = 0; k < kp; k += 2) {
        const uint16_t *wk = w + (size_t)k * GROUP;
        for (int r = 0; r < RB; r++) {
            float x0 = bf16_f(x[(size_t)r * kp + k]), x1 = bf16_f(x[(size_t)r * kp + k + 1]);
            for (int l = 0; l < GROUP; l++) acc[r][l] += x0 * bf16_f(wk[2 * l]) + x1 * bf16_f(wk[2 * l + 1]);
        }
    }
    for (int r = 0; r < RB; r++) memcpy(out + r * GROUP, acc[r], sizeof(float) * GROUP);
}
#endif

/* int8: weights in fours along the input ([kpad/4][64][4]); integer sums of both activation bytes. */
#if defined(__AVX512VNNI__)
static inline __attribute__((always_inline)) void tile_i8(const int8_t *w, int kp, const uint8_t *xh, const uint8_t *xl, int RB,
                                                          int32_t *oh, int32_t *ol) {
    __m512i ah[2][4], al[2][4];
    for (int r = 0; r < RB; r++)
        for (int g = 0; g < 4; g++) ah[r][g] = al[r][g] = _mm512_setzero_si512();
    for (int k = 0; k < kp; k += 4) {
        const int8_t *wk = w + (size_t)k * GROUP;
        __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 64), w2 = _mm512_loadu_si512(wk + 128), w3 = _mm512_loadu_si512(wk + 192);
        for (int r = 0; r < RB; r++) {
            int32_t qh, ql;
            memcpy(&qh, xh + (size_t)r * kp + k, 4);
            memcpy(&ql, xl + (size_t)r * kp + k, 4);
            __m512i vh = _mm512_set1_epi32(qh), vl = _mm512_set1_epi32(ql);
            ah[r][0] = _mm512_dpbusd_epi32(ah[r][0], vh, w0);
            ah[r][1] = _mm512_dpbusd_epi32(ah[r][1], vh, w1);
            ah[r][2] = _mm512_dpbusd_epi32(ah[r][2], vh, w2);
            ah[r][3] = _mm512_dpbusd_epi32(ah[r][3], vh, w3);
            al[r][0] = _mm512_dpbusd_epi32(al[r][0], vl, w0);
            al[r][1] = _mm512_dpbusd_epi32(al[r][1], vl, w1);
            al[r][2] = _mm512_dpbusd_epi32(al[r][2], vl, w2);
            al[r][3] = _mm512_dpbusd_epi32(al[r][3], vl, w3);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int g = 0; g < 4; g++) {
            _mm512_storeu_si512(oh + r * GROUP + g * 16, ah[r][g]);
            _mm512_storeu_si512(ol + r * GROUP + g * 16, al[r][g]);
        }
}
#else
static inline __attribute__((always_inline)) void tile_i8(const int8_t *w, int kp, const uint8_t *xh, const uint8_t *xl, int RB,
                                                          int32_t *oh, int32_t *ol) {
    int32_t ah[2][GROUP], al[2][GROUP];
    for (int r = 0; r < RB; r++)
        for (int l = 0; l < GROUP; l++) ah[r][l] = al[r][l] = 0;
    for (int k = 0; k < kp; k += 4) {
        const int8_t *wk = w + (size_t)k * GROUP;
        for (int r = 0; r < RB; r++) {
            const uint8_t *h = xh + (size_t)r * kp + k, *lo = xl + (size_t)r * kp + k;
            for (int l = 0; l < GROUP; l++) {
                const int8_t *q = wk + 4 * l;
                ah[r][l] += h[0] * q[0] + h[1] * q[1] + h[2] * q[2] + h[3] * q[3];
                al[r][l] += lo[0] * q[0] + lo[1] * q[1] + lo[2] * q[2] + lo[3] * q[3];
            }
        }
    }
    for (int r = 0; r < RB; r++) {
        memcpy(oh + r * GROUP, ah[r], sizeof(int32_t) * GROUP);
        memcpy(ol + r * GROUP, al[r], sizeof(int32_t) * GROUP);
    }
}
#endif

/* One group's products for rows [r0, r0 + RB): written to y (+ init), only the matrix's real rows. */
static void group_rows(const mat_t *m, int gi, const void *xs, const float *qscale, int B, int r0, int RB,
                       const float *init, int ldi, float *y, int ldy) {
    float out[4 * GROUP];
    int32_t oh[4 * GROUP], ol[4 * GROUP];
    int kp = m->kpad;
    size_t gsize = (size_t)kp * GROUP;
    int base = gi * GROUP, n = m->rows - base < GROUP ? m->rows - base : GROUP;
    if (m->kind == K_F32) {
        const float *w = (const float *)m->w + gi * gsize, *x = (const float *)xs + (size_t)r0 * kp;
        switch (RB) {
        case 1: tile_f32(w, kp, x, 1, out); break;
        case 2: tile_f32(w, kp, x, 2, out); break;
        case 3: tile_f32(w, kp, x, 3, out); break;
        default: tile_f32(w, kp, x, 4, out); break;
        }
    } else if (m->kind == K_BF16) {
        const uint16_t *w = (const uint16_t *)m->w + gi * gsize, *x = (const uint16_t *)xs + (size_t)r0 * kp;
        switch (RB) {
        case 1: tile_bf16(w, kp, x, 1, out); break;
        case 2: tile_bf16(w, kp, x, 2, out); break;
        case 3: tile_bf16(w, kp, x, 3, out); break;
        default: tile_bf16(w, kp, x, 4, out); break;
        }
    } else {
        if (RB > 2) { /* two rows at a time: four of them would not fit the registers */
            group_rows(m, gi, xs, qscale, B, r0, 2, init, ldi, y, ldy);
            group_rows(m, gi, xs, qscale, B, r0 + 2, RB - 2, init, ldi, y, ldy);
            return;
        }
        const int8_t *w = (const int8_t *)m->w + gi * gsize;
        const uint8_t *xh = (const uint8_t *)xs + (size_t)r0 * kp, *xl = (const uint8_t *)xs + (size_t)B * kp + (size_t)r0 * kp;
        if (RB == 1) tile_i8(w, kp, xh, xl, 1, oh, ol);
        else tile_i8(w, kp, xh, xl, 2, oh, ol);
        for (int r = 0; r < RB; r++) {
            double s = qscale[r0 + r];
            for (int l = 0; l < n; l++) {
                int o = base + l;
                double v = 256.0 * (double)(oh[r * GROUP + l] - 128 * m->rowsum[o]) + (double)ol[r * GROUP + l];
                out[r * GROUP + l] = (float)(v * s * (double)m->scale[o]);
            }
        }
    }
    for (int r = 0; r < RB; r++) {
        float *d = y + (size_t)(r0 + r) * ldy + base;
        const float *o = out + r * GROUP;
        if (init) {
            const float *a = init + (size_t)(r0 + r) * ldi + base;
            for (int l = 0; l < n; l++) d[l] = a[l] + o[l];
        } else {
            for (int l = 0; l < n; l++) d[l] = o[l];
        }
    }
}

/* y[b] = init[b] + W [x1[b]; x2[b]] for b < B (init may be y itself, or have ldi 0: one bias row). */
void cl_matvec(const mat_t *m, int B, const float *x1, int n1, int ld1, const float *x2, int n2, int ld2,
               const float *init, int ldi, float *y, int ldy, void *scratch, int nthreads) {
    float qscale[64];
    const int maxb = 64;
    for (int b0 = 0; b0 < B; b0 += maxb) {
        int nb = B - b0 < maxb ? B - b0 : maxb;
        pack_x(m, nb, x1 + (size_t)b0 * ld1, n1, ld1, x2 ? x2 + (size_t)b0 * ld2 : 0, n2, ld2, scratch, qscale);
        const float *ini = init ? init + (size_t)b0 * ldi : 0;
        float *yy = y + (size_t)b0 * ldy;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int gi = 0; gi < m->ngroups; gi++)
            for (int r0 = 0; r0 < nb; r0 += 4)
                group_rows(m, gi, scratch, qscale, nb, r0, nb - r0 < 4 ? nb - r0 : 4, ini, ldi, yy, ldy);
    }
}

/* ---- the cells' pointwise work, one row of B, 16 units at a time ---- */
static void lstm_row(const float *gt, const float *cp, float *c, float *h, int H) {
    for (int j = 0; j < H; j += VL) {
        int m = H - j < VL ? H - j : VL;
        vf i = v_sigmoid(vload(gt + j, m)), f = v_sigmoid(vload(gt + H + j, m));
        vf g = v_tanh(vload(gt + 2 * H + j, m)), o = v_sigmoid(vload(gt + 3 * H + j, m));
        vf cn = f * vload(cp + j, m) + i * g;
        vstore(c + j, cn, m);
        vstore(h + j, o * v_tanh(cn), m);
    }
}
static void peephole_row(const float *gt, const float *p, const float *cp, float *c, float *h, int H) {
    for (int j = 0; j < H; j += VL) {
        int m = H - j < VL ? H - j : VL;
        vf cpv = vload(cp + j, m);
        vf i = v_sigmoid(vload(gt + j, m) + vload(p + j, m) * cpv);
        vf f = v_sigmoid(vload(gt + H + j, m) + vload(p + H + j, m) * cpv);
        vf cn = f * cpv + i * v_tanh(vload(gt + 2 * H + j, m));
        vf o = v_sigmoid(vload(gt + 3 * H + j, m) + vload(p + 2 * H + j, m) * cn);
        vstore(c + j, cn, m);
        vstore(h + j, o * v_tanh(cn), m);
    }
}
static void gru_row(const float *gi, const float *gh, const float *hp, float *h, int H) {
    for (int j = 0; j < H; j += VL) {
        int m = H - j < VL ? H - j : VL;
        vf r = v_sigmoid(vload(gi + j, m) + vload(gh + j, m));
        vf z = v_sigmoid(vload(gi + H + j, m) + vload(gh + H + j, m));
        vf n = v_tanh(vload(gi + 2 * H + j, m) + r * vload(gh + 2 * H + j, m));
        vstore(h + j, n + z * (vload(hp + j, m) - n), m);
    }
}
static void tanh_row(const float *x, float *h, int H) {
    for (int j = 0; j < H; j += VL) {
        int m = H - j < VL ? H - j : VL;
        vstore(h + j, v_tanh(vload(x + j, m)), m);
    }
}
/* minGRU / minLSTM: h = a * h_prev + b; the output adds the layer's input above layer 0 (res). */
static inline vf v_g(vf x) { return vsel(x >= 0.0f, x + 0.5f, v_sigmoid(x)); }
static void minimal_row(int cell, const float *pr, const float *hp, float *h, const float *res, float *out, int H) {
    for (int j = 0; j < H; j += VL) {
        int m = H - j < VL ? H - j : VL;
        vf a, b;
        if (cell == C_MINGRU) {
            vf z = v_sigmoid(vload(pr + j, m));
            a = 1.0f - z;
            b = z * v_g(vload(pr + H + j, m));
        } else {
            vf f = v_sigmoid(vload(pr + j, m)), i = v_sigmoid(vload(pr + H + j, m)), t = f + i;
            a = f / t;
            b = i / t * v_g(vload(pr + 2 * H + j, m));
        }
        vf hn = b + a * vload(hp + j, m);
        vstore(h + j, hn, m);
        vstore(out + j, res ? hn + vload(res + j, m) : hn, m);
    }
}

/* ---- a whole step: M members, B rows; state tensors (M, L, B, H); logits (M, B, V) ---- */
size_t cl_scratch_bytes(const model_t *md, int M, int B) {
    size_t need = 0;
    for (int m = 0; m < M; m++) {
        const model_t *d = md + m;
        size_t kp = (size_t)d->head.kpad;
        for (int k = 0; k < d->layers; k++) {
            if (d->rec[k].w && (size_t)d->rec[k].kpad > kp) kp = d->rec[k].kpad;
            if (d->inp[k].w && (size_t)d->inp[k].kpad > kp) kp = d->inp[k].kpad;
        }
        size_t h = (size_t)d->H, rows = B < 64 ? B : 64;
        size_t n = sizeof(float) * (size_t)B * (4 * h + 3 * h + 2 * h) + 4 * rows * kp + 256;
        if (n > need) need = n;
    }
    return need;
}

void cl_log_softmax(const float *x, int rows, int n, float *out);

int cl_step(const model_t *md, int M, const int64_t *ids, int B, const float *h_in, const float *c_in,
            float *h_out, float *c_out, float *logits, int log_probs, void *scratch, int nthreads) {
    for (int m = 0; m < M; m++) {
        const model_t *d = md + m;
        int L = d->layers, H = d->H, G = d->G, V = d->V;
        size_t lay = (size_t)B * H, mem = (size_t)L * lay;
        const float *hi = h_in + m * mem, *ci = c_in ? c_in + m * mem : 0;
        float *ho = h_out + m * mem, *co = c_out ? c_out + m * mem : 0;
        float *gates = (float *)scratch, *gh = gates + (size_t)B * 4 * H, *xo = gh + (size_t)B * 3 * H;
        float *xo2 = xo + (size_t)B * H;
        void *work = (void *)(xo2 + (size_t)B * H);
        const float *x = 0;  /* the layer below's output, (B, H) rows */
        for (int k = 0; k < L; k++) {
            const float *hp = hi + k * lay;
            float *hn = ho + k * lay;
            size_t gw = (size_t)G * H;
            if (k == 0)
                for (int b = 0; b < B; b++) {
                    int64_t id = ids[b];
                    if (id < 0 || id >= V) return -1;
                    memcpy(gates + b * gw, d->table0 + (size_t)id * gw, sizeof(float) * gw);
                }
            switch (d->cell) {
            case C_LSTM:
            case C_PEEPHOLE:
            case C_RNN:
                if (k == 0)
                    cl_matvec(&d->rec[0], B, hp, H, H, 0, 0, 0, gates, (int)gw, gates, (int)gw, work, nthreads);
                else
                    cl_matvec(&d->inp[k], B, x, H, H, hp, H, H, d->bias[k], 0, gates, (int)gw, work, nthreads);
                if (d->cell == C_RNN) {
                    for (int b = 0; b < B; b++) tanh_row(gates + b * gw, hn + b * H, H);
                } else {
                    const float *cp = ci + k * lay;
                    float *cn = co + k * lay;
                    for (int b = 0; b < B; b++) {
                        if (d->cell == C_LSTM)
                            lstm_row(gates + b * gw, cp + b * H, cn + b * H, hn + b * H, H);
                        else
                            peephole_row(gates + b * gw, d->peep[k], cp + b * H, cn + b * H, hn + b * H, H);
                    }
                }
                x = hn;
                break;
            case C_GRU:
                if (k > 0) cl_matvec(&d->inp[k], B, x, H, H, 0, 0, 0, d->bias[k], 0, gates, (int)gw, work, nthreads);
                cl_matvec(&d->rec[k], B, hp, H, H, 0, 0, 0, d->bias_h[k], 0, gh, (int)gw, work, nthreads);
                for (int b = 0; b < B; b++) gru_row(gates + b * gw, gh + b * gw, hp + b * H, hn + b * H, H);
                x = hn;
                break;
            default: { /* minimal cells: the output (with the residual above layer 0) feeds the layer above */
                if (k > 0) cl_matvec(&d->inp[k], B, x, H, H, 0, 0, 0, d->bias[k], 0, gates, (int)gw, work, nthreads);
                float *out = (k & 1) ? xo2 : xo;
                for (int b = 0; b < B; b++)
                    minimal_row(d->cell, gates + b * gw, hp + b * H, hn + b * H, k > 0 ? x + b * H : 0, out + b * H, H);
                x = out;
            }
            }
        }
        float *lg = logits + (size_t)m * B * V;
        cl_matvec(&d->head, B, x, H, H, 0, 0, 0, d->head_b, 0, lg, V, work, nthreads);
        if (log_probs) cl_log_softmax(lg, B, V, lg);
    }
    return 0;
}

/* out = log_softmax(x) over rows of n (out may be x) */
void cl_log_softmax(const float *x, int rows, int n, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *a = x + (size_t)r * n;
        float *o = out + (size_t)r * n;
        float mx = a[0];
        for (int j = 1; j < n; j++) mx = a[j] > mx ? a[j] : mx;
        vf acc = {0};
        for (int j = 0; j < n; j += VL) {
            int m = n - j < VL ? n - j : VL;
            vf e = v_exp(vload(a + j, m) - mx);
            if (m < VL) e = vsel((vi){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} < m, e, vsplat(0.0f)); /* lanes past n */
            acc += e;
        }
        float s = 0.0f;
        for (int l = 0; l < VL; l++) s += acc[l];
        float ls = mx + logf(s);
        for (int j = 0; j < n; j++) o[j] = a[j] - ls;
    }
}

/* The inverse-CDF draw of charlm/decoding/sampling.py (draw) for one row of logits at temperature t:
 * the first symbol whose cumulative mass exceeds u times the total (sums in double; the second pass
 * repeats the first's sums exactly, so no buffer is needed). */
int cl_draw(const float *x, int n, float t, double u) {
    float mx = x[0] / t;
    for (int j = 1; j < n; j++) { float v = x[j] / t; mx = v > mx ? v : mx; }
    double c = 0.0;
    for (int j = 0; j < n; j++) c += (double)cl_exp(x[j] / t - mx);
    double target = u * c;
    c = 0.0;
    for (int j = 0; j < n; j++) {
        c += (double)cl_exp(x[j] / t - mx);
        if (c > target) return j;
    }
    return n - 1;
}

/* Dynamic evaluation's update of one weight tensor (charlm/decoding/dynamic.py, Adapter._update), in one
 * pass over memory instead of six, with PyTorch's operations in PyTorch's order (no contraction into
 * fused multiply-adds: -ffp-contract=off), so the weights come out bit for bit as the tensor code's:
 *   pull = p0 - p;  p = p - lr * (g * scale);  p = p + pull * decay   (scale, decay_v: per weight or none) */
void cl_dyn_update(float *p, const float *g, const float *scale, const float *p0, const float *decay_v, float decay,
                   float lr, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float pull = p0[i] - p[i];
        float s = scale ? g[i] * scale[i] : g[i];
        float q = p[i] - lr * s;
        p[i] = q + pull * (decay_v ? decay_v[i] : decay);
    }
}
