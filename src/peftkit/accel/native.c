/* Dropout on the CPU in one pass: the keep mask from a counter-based hash, and the masked,
 * rescaled tensor. Built by peftkit/native.py with the machine's C compiler; dropout.py
 * computes the same numbers with torch ops where no compiler is at hand.
 *
 * The mask: word w (from 0) of a call is splitmix64's output for the counter
 * seed + (w + 1) * 0x9E3779B97F4A7C15; element i reads the 16-bit lane i % 4 of word i / 4
 * (the low lane first) as a signed number and is kept when it is >= threshold.
 *
 * The values: y = (x * keep) * scale in float arithmetic, rounded to the tensor's dtype, which
 * is what torch's x.mul(keep).mul_(scale) gives.
 *
 * Work is split between OpenMP threads in blocks of BLOCK elements (a multiple of 4, so no
 * word straddles two blocks); `threads` is how many to use.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 8192

static inline uint64_t mix(uint64_t seed, int64_t word) {
    uint64_t z = seed + (uint64_t)(word + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* keep[begin:end] for one block; begin is a multiple of 4 */
static void mask_block(uint8_t *keep, int64_t begin, int64_t end, uint64_t seed, int32_t threshold) {
    int64_t w0 = begin / 4, w1 = end / 4;
    uint32_t *out = (uint32_t *)(keep + begin); /* four mask bytes per word, lane 0 in the low byte */
    for (int64_t w = w0; w < w1; ++w) {
        uint64_t z = mix(seed, w);
        uint32_t k = 0;
        for (int j = 0; j < 4; ++j)
            k |= (uint32_t)((int16_t)(uint16_t)(z >> (16 * j)) >= threshold) << (8 * j);
        memcpy(out + (w - w0), &k, 4);
    }
    if (end % 4) {
        uint64_t z = mix(seed, w1);
        for (int64_t i = 4 * w1; i < end; ++i)
            keep[i] = (int16_t)(uint16_t)(z >> (16 * (i % 4))) >= threshold;
    }
}

void peftkit_keep_mask(uint8_t *keep, int64_t n, uint64_t seed, int32_t threshold, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1 && n > BLOCK)
    for (int64_t b = 0; b < n; b += BLOCK)
        mask_block(keep, b, b + BLOCK < n ? b + BLOCK : n, seed, threshold);
}

static void apply_f32(float *restrict y, const float *restrict x, const uint8_t *restrict keep, int64_t begin,
                      int64_t end, float scale) {
    for (int64_t i = begin; i < end; ++i) y[i] = (x[i] * (float)keep[i]) * scale;
}

static void apply_bf16(uint16_t *restrict y, const uint16_t *restrict x, const uint8_t *restrict keep,
                       int64_t begin, int64_t end, float scale) {
    /* x * keep is x, a signed zero or a NaN, all exact in bf16: one rounding, after the scale */
    for (int64_t i = begin; i < end; ++i) y[i] = float_to_bf16((bf16_to_float(x[i]) * (float)keep[i]) * scale);
}

/* y = x * keep * scale; with make_mask, keep is drawn first (block by block, while it is in cache) */
#define DROPOUT(name, type, apply)                                                                          \
    void name(type *y, const type *x, uint8_t *keep, int64_t n, int make_mask, uint64_t seed, int32_t threshold, \
              float scale, int threads) {                                                                     \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1 && n > BLOCK)")       \
        for (int64_t b = 0; b < n; b += BLOCK) {                                                              \
            int64_t e = b + BLOCK < n ? b + BLOCK : n;                                                        \
            if (make_mask) mask_block(keep, b, e, seed, threshold);                                           \
            apply(y, x, keep, b, e, scale);                                                                   \
        }                                                                                                     \
    }

DROPOUT(peftkit_dropout_f32, float, apply_f32)
DROPOUT(peftkit_dropout_bf16, uint16_t, apply_bf16)
