// Shared math of the fused clip-and-noise kernels (CPU and CUDA).
//
// Everything a kernel needs to turn a (seed, offset) into Gaussian noise and
// a squared norm into a clip factor lives here, written once for both
// devices, so that the CPU and CUDA kernels give *bit-identical* noise:
//
// * Philox4x32-10 (Salmon et al., SC'11), a counter-based generator: normal
//   number n of a call uses counter n / 2 and key = seed, so any element's
//   noise is computed independently (no generator state, any parallel split).
// * Box-Muller from two 53-bit uniforms in (0, 1]: radius sqrt(-2 log u1),
//   angle 2 pi u2; even n takes the cosine branch, odd n the sine branch.
// * log, sin and cos are evaluated here with +, -, *, / and sqrt only (all
//   correctly rounded in IEEE 754 double on both devices), never with the
//   platform's libm or CUDA's intrinsics, whose last bits differ. The files
//   that include this header are compiled without floating-point
//   contraction (-ffp-contract=off, nvcc -fmad=false), so every operation
//   rounds exactly the same way on CPU and GPU.
//
// 53-bit uniforms keep the smallest u1 at 2^-53, so a normal is bounded by
// about 8.6 standard deviations (at 32 bits it would be 6.7).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TDK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TDK_HOST_DEVICE inline
#endif

namespace torchdp_keras {

// ---------------------------------------------------------------- Philox4x32-10
struct Philox4x32 {
  uint32_t v[4];
};

TDK_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
}

// Philox4x32 with 10 rounds: counter (c0..c3), key (k0, k1).
TDK_HOST_DEVICE Philox4x32 philox4x32_10(uint64_t counter, uint64_t seed) {
  const uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  const uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kMul0, c0, &hi0, &lo0);
    mulhilo32(kMul1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  Philox4x32 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// Bit casts written with memcpy (exact, and understood by both compilers).
TDK_HOST_DEVICE double bits_to_double(uint64_t bits) {
  double value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

TDK_HOST_DEVICE uint64_t double_to_bits(double value) {
  uint64_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// A uniform in (0, 1] from 53 random bits: (k + 1) / 2^53. k = hi * 2^32 + lo
// is converted exactly without an int64 -> double instruction (which AVX2
// lacks): 2^52 + x has x's bits as its mantissa for x < 2^52, so
// (2^52 + x) - 2^52 = x exactly, for hi < 2^21 and lo < 2^32 alike.
TDK_HOST_DEVICE double uniform53(uint32_t high, uint32_t low) {
  const uint64_t bits = ((static_cast<uint64_t>(high) << 32) | low) >> 11;
  const uint64_t kTwo52 = 0x4330000000000000ull;  // the bits of 2^52
  const double hi = bits_to_double(kTwo52 | (bits >> 32)) - 4503599627370496.0;
  const double lo = bits_to_double(kTwo52 | (bits & 0xFFFFFFFFull)) - 4503599627370496.0;
  // hi * 2^32 + lo = k < 2^53 and k + 1 <= 2^53: every step is exact.
  return (hi * 4294967296.0 + lo + 1.0) * (1.0 / 9007199254740992.0);
}

// ------------------------------------------- log, sin, cos with basic operations
// log(u) for normal u in (0, 1]: u = m * 2^e with m in [sqrt(1/2), sqrt(2))
// (exact, from the bits), log(m) = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| <= 0.1716, by its odd series to s^19 (truncation below 1e-16).
TDK_HOST_DEVICE double log_basic(double u) {
  // u = m * 2^e with m in [sqrt(1/2), sqrt(2)), from the bits (exact; integer
  // operations only, so that loops over it vectorise): mantissas at or above
  // sqrt(2)'s take the exponent of [1/2, 1) instead of [1, 2).
  const uint64_t bits = double_to_bits(u);
  const uint64_t mantissa = bits & 0x000FFFFFFFFFFFFFull;
  const uint64_t high = mantissa >= 0x6A09E667F3BCDull ? 1u : 0u;  // sqrt(2) = 0x3FF6A09E667F3BCD
  const double m = bits_to_double(mantissa | (0x3FF0000000000000ull - (high << 52)));
  // The exponent as a double, exactly (2^52 + x - 2^52 = x for x < 2^52).
  const double e = (bits_to_double(0x4330000000000000ull | ((bits >> 52) + high)) -
                    4503599627370496.0) - 1023.0;
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  double series = 1.0 / 19.0;
  series = series * s2 + 1.0 / 17.0;
  series = series * s2 + 1.0 / 15.0;
  series = series * s2 + 1.0 / 13.0;
  series = series * s2 + 1.0 / 11.0;
  series = series * s2 + 1.0 / 9.0;
  series = series * s2 + 1.0 / 7.0;
  series = series * s2 + 1.0 / 5.0;
  series = series * s2 + 1.0 / 3.0;
  series = series * s2 + 1.0;
  const double log_m = 2.0 * s * series;
  // e * log(2), with log(2) split so that e * kLn2Hi is exact.
  const double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  return e * kLn2Hi + (log_m + e * kLn2Lo);
}

// sin and cos of t for |t| <= pi / 4, by Taylor series (truncation below 1e-14).
TDK_HOST_DEVICE double sin_small(double t) {
  const double t2 = t * t;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * t2 - 1.0 / 39916800.0;  // -1/11!
  p = p * t2 + 1.0 / 362880.0;    // 1/9!
  p = p * t2 - 1.0 / 5040.0;      // -1/7!
  p = p * t2 + 1.0 / 120.0;       // 1/5!
  p = p * t2 - 1.0 / 6.0;         // -1/3!
  return t + t * (t2 * p);
}

TDK_HOST_DEVICE double cos_small(double t) {
  const double t2 = t * t;
  double p = 1.0 / 87178291200.0;  // 1/14!
  p = p * t2 - 1.0 / 479001600.0;  // -1/12!
  p = p * t2 + 1.0 / 3628800.0;    // 1/10!
  p = p * t2 - 1.0 / 40320.0;      // -1/8!
  p = p * t2 + 1.0 / 720.0;        // 1/6!
  p = p * t2 - 1.0 / 24.0;         // -1/4!
  p = p * t2 + 0.5;                // 1/2!
  return 1.0 - t2 * p;
}

// cos(2 pi x) and sin(2 pi x) for x in (0, 1]: the turn is split into eight
// octants exactly (x has at most 53 significant bits), then reduced to
// |t| <= pi / 4 around the nearest multiple of a quarter turn.
TDK_HOST_DEVICE void sincos_turn(double x, double* sin_out, double* cos_out) {
  const double kTwoPi = 6.28318530717958647692;
  const double quarters = x * 4.0;  // exact
  // Nearest integer number of quarter turns, by comparisons only.
  const int q = (quarters >= 0.5 ? 1 : 0) + (quarters >= 1.5 ? 1 : 0) +
                (quarters >= 2.5 ? 1 : 0) + (quarters >= 3.5 ? 1 : 0);
  const double remainder = x - 0.25 * static_cast<double>(q);  // exact, in [-1/8, 1/8]
  const double t = remainder * kTwoPi;
  const double s = sin_small(t), c = cos_small(t);
  // Quadrant q: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s): a choice and
  // exact negations, written as bit operations so that loops vectorise.
  const uint64_t swap = 0ull - static_cast<uint64_t>(q & 1);  // all ones for odd q
  const uint64_t s_bits = double_to_bits(s), c_bits = double_to_bits(c);
  const uint64_t sin_sign = static_cast<uint64_t>((q >> 1) & 1) << 63;
  const uint64_t cos_sign = static_cast<uint64_t>(((q + 1) >> 1) & 1) << 63;
  *sin_out = bits_to_double(((c_bits & swap) | (s_bits & ~swap)) ^ sin_sign);
  *cos_out = bits_to_double(((s_bits & swap) | (c_bits & ~swap)) ^ cos_sign);
}

// Normals 2c and 2c + 1 of the stream (seed): one Philox call, one log and
// one sincos give the pair (cosine branch first).
TDK_HOST_DEVICE void philox_normal_pair(uint64_t seed, uint64_t pair, double* even,
                                        double* odd) {
  const Philox4x32 bits = philox4x32_10(pair, seed);
  const double u1 = uniform53(bits.v[0], bits.v[1]);
  const double u2 = uniform53(bits.v[2], bits.v[3]);
  const double radius = sqrt(-2.0 * log_basic(u1));
  double s, c;
  sincos_turn(u2, &s, &c);
  *even = radius * c;
  *odd = radius * s;
}

// Normal number n (n = 0, 1, 2, ...) of the stream (seed): standard normal.
TDK_HOST_DEVICE double philox_normal(uint64_t seed, uint64_t n) {
  double even, odd;
  philox_normal_pair(seed, n >> 1, &even, &odd);
  return (n & 1) ? odd : even;
}

// ----------------------------------------------------------------- clip factor
// Relative margin that keeps ||factor * g|| <= C under rounding; the same
// value as torchdp_keras.ops.clip_noise.CLIP_SAFETY_MARGIN.
constexpr double kClipSafetyMargin = 1e-6;

// min(1, C / (||g|| (1 + margin))), and 1 for a zero gradient.
TDK_HOST_DEVICE double clip_factor(double squared_norm, double l2_norm_clip) {
  const double norm = sqrt(squared_norm);
  const double factor = l2_norm_clip / (norm * (1.0 + kClipSafetyMargin));
  return factor < 1.0 ? factor : 1.0;
}

}  // namespace torchdp_keras
