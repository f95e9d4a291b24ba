/* One-token softmax attention for a batch of rows, float32, on the CPU.
 *
 * out[b, h, :] = softmax(scale * q[b, h] . k[b, g, j] over allowed j) @ v[b, g, :, :]
 * with g = h / (Hq / Hkv) (grouped-query attention). One task per (b, g) pair, spread over
 * OpenMP threads; each task reads its keys and values once for all Hq / Hkv query heads.
 *
 * Layouts (strides in elements; the last axis of every tensor is contiguous):
 *   q    (B, Hq, D)        contiguous
 *   k    (B, Hkv, S, D)    strides k_sb, k_sh, k_ss
 *   v    (B, Hkv, S, Dv)   strides v_sb, v_sh, v_ss
 *   mask (B, S) bytes, nonzero = attend, strides m_sb, m_ss; NULL = attend to all
 *   out  (B, Hq, Dv)       contiguous
 *   scratch  threads * (Hq / Hkv) * S floats
 * A row whose mask allows nothing gets zeros.
 */
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

int decode_attention_abi(void) { return 1; }

/* exp(x) for float32 x: 2^n * p(f), |f| <= 1/2 (the algorithm of MLX's CPU exp). */
static inline float exp_poly(float x) {
    float y = x * 1.442695f;
    float n = rintf(y); /* not (y + 1.5 * 2^23) - 1.5 * 2^23: -fassociative-math folds it */
    float f = y - n;
    float p = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    union { int i; float f; } scale;
    scale.i = ((int)n + 127) << 23;
    return x < -88.0f ? 0.0f : p * scale.f;
}

static void one_group(const float *q, const float *k, long k_ss, const float *v, long v_ss,
                      const unsigned char *mask, long m_ss, float *out, int rep, int S, int D,
                      int Dv, float scale, float *scores) {
    /* Columns after the last allowed one are never read: rows of different lengths share
     * one buffer width, and a short row stops at its own end. */
    if (mask)
        while (S > 0 && !mask[(long)(S - 1) * m_ss]) S--;
    for (int r = 0; r < rep; r++) {
        float *s = scores + (long)r * S;
        const float *qr = q + (long)r * D;
        for (int j = 0; j < S; j++) {
            const float *kj = k + (long)j * k_ss;
            float acc = 0.0f;
            for (int d = 0; d < D; d++) acc += qr[d] * kj[d];
            s[j] = acc * scale;
        }
    }
    for (int r = 0; r < rep; r++) {
        float *s = scores + (long)r * S;
        float peak = -INFINITY;
        for (int j = 0; j < S; j++)
            if (!mask || mask[(long)j * m_ss]) peak = s[j] > peak ? s[j] : peak;
        float *o = out + (long)r * Dv;
        memset(o, 0, sizeof(float) * (size_t)Dv);
        if (peak == -INFINITY) continue;
        float total = 0.0f;
        for (int j = 0; j < S; j++) {
            float w = (!mask || mask[(long)j * m_ss]) ? exp_poly(s[j] - peak) : 0.0f;
            s[j] = w;
            total += w;
        }
        for (int j = 0; j < S; j++) {
            float w = s[j];
            if (w == 0.0f) continue;
            const float *vj = v + (long)j * v_ss;
            for (int d = 0; d < Dv; d++) o[d] += w * vj[d];
        }
        float inv = 1.0f / total;
        for (int d = 0; d < Dv; d++) o[d] *= inv;
    }
}

int decode_attention_f32(const float *q, const float *k, long k_sb, long k_sh, long k_ss,
                         const float *v, long v_sb, long v_sh, long v_ss,
                         const unsigned char *mask, long m_sb, long m_ss, float *out,
                         float *scratch, int B, int Hq, int Hkv, int S, int D, int Dv,
                         float scale, int threads) {
    if (B <= 0 || Hkv <= 0 || Hq % Hkv != 0 || S <= 0 || threads < 1) return -1;
    int rep = Hq / Hkv;
    long tasks = (long)B * Hkv;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *scores = scratch + (long)tid * rep * S;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (long t = 0; t < tasks; t++) {
            long b = t / Hkv, g = t % Hkv;
            one_group(q + (b * Hq + g * rep) * (long)D, k + b * k_sb + g * k_sh, k_ss,
                      v + b * v_sb + g * v_sh, v_ss, mask ? mask + b * m_sb : NULL, m_ss,
                      out + (b * Hq + g * rep) * (long)Dv, rep, S, D, Dv, scale, scores);
        }
    }
    return 0;
}
