// Bit-packed integer convolution on the CPU, for the deployed low-precision model.
//
// S[n,y,x,o] = sum of p*q and T[n,y,x] = sum of p over the in-bounds taps and channels, where p
// are uint8 activation codes (NHWC) and q the weight codes stored as bit planes;
// expcuda/deploy/reference.py is the definition of correct.
//
// Each output pixel's in-bounds taps are gathered into one row of K = KH*KW*C code bytes
// (out-of-bounds taps stay zero, so they add nothing to S or T; T is the row's code sum, taken
// while packing it). Rows are then multiplied with the filters in one of two ways:
//   bitserial: the row is packed into a_bits planes of K bits (planes stay tight across taps,
//              so few channels waste no bits), each filter into w_bits planes, and
//              S = sum_ij 2^(i+j) popcount(x_i AND w_j); 1x1 bit is one AND + popcount per word.
//   dot:       the code bytes times the weight codes as int8 with AVX-512 VNNI vpdpbusd
//              (weight codes <= 127, so w_bits <= 7).
// The popcount ISA is picked at run time (AVX-512 VPOPCNTDQ, AVX-512BW nibble lookup, AVX2
// nibble lookup, scalar); EXPCUDA_PACKED_ISA forces one, EXPCUDA_PACKED_ALGO=bitserial|dot one
// of the two ways. The file compiles with the default flags: each SIMD function carries its own
// target attribute and runs only after __builtin_cpu_supports said yes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/packed_checks.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

// GCC 12 warns about the undefined pass-through operands inside its own AVX-512 intrinsics
// (_mm512_sll_epi64, _mm512_cvtepi64_epi32, _mm512_reduce_add_epi64)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace expcuda {
namespace {

using at::Tensor;

constexpr int64_t kRows = 16;  // output pixels per task: their gathered rows stay in L2

enum class Isa { kScalar, kAvx2, kAvx512bw, kVpopcntdq };
enum class Algo { kBitserial, kDot };

constexpr Isa kIsas[] = {Isa::kVpopcntdq, Isa::kAvx512bw, Isa::kAvx2, Isa::kScalar};  // best first

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kVpopcntdq: return "vpopcntdq";
    case Isa::kAvx512bw: return "avx512bw";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

bool cpu_has(Isa isa) {
  __builtin_cpu_init();
  const bool bw = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  switch (isa) {
    case Isa::kVpopcntdq: return bw && __builtin_cpu_supports("avx512vpopcntdq");
    case Isa::kAvx512bw: return bw;
    case Isa::kAvx2: return __builtin_cpu_supports("avx2");
    default: return true;
  }
}

bool cpu_has_vnni() {
  return cpu_has(Isa::kAvx512bw) && __builtin_cpu_supports("avx512vnni");
}

// The ISA of this call: EXPCUDA_PACKED_ISA when set (read on every call, so tests can switch),
// else the best one this CPU has.
Isa pick_isa() {
  const char* env = std::getenv("EXPCUDA_PACKED_ISA");
  if (env != nullptr && *env != '\0') {
    const std::string want(env);
    for (Isa isa : kIsas) {
      if (want == isa_name(isa)) {
        TORCH_CHECK_VALUE(cpu_has(isa), "EXPCUDA_PACKED_ISA=", want,
                          " was forced but this CPU lacks that instruction set");
        return isa;
      }
    }
    TORCH_CHECK_VALUE(false, "EXPCUDA_PACKED_ISA must be one of vpopcntdq, avx512bw, avx2, scalar; got '",
                      want, "'");
    return Isa::kScalar;
  }
  for (Isa isa : kIsas) {
    if (cpu_has(isa)) return isa;
  }
  return Isa::kScalar;
}

// Which of the two ways is the default, from benchmarks/benchmark_packed.py (SVHN layers, AVX-512
// Xeon, one thread): bit-serial costs a_bits*w_bits popcounts per 64 channel-taps, VNNI one
// vpdpbusd per 4 plus re-laying the weights as bytes. At 2/2 bits bit-serial was as fast or
// faster on every layer (VNNI 0.96-2.7x its time); at 4/4 VNNI was 1.4-3.9x faster except where
// a call has very few output pixels and the weights' re-layout dominates (0.4-0.95x there).
bool dot_is_faster(int64_t a_bits, int64_t w_bits) {
  return a_bits * w_bits >= 8;
}

Algo pick_algo(Isa isa, int64_t a_bits, int64_t w_bits) {
  const bool dot_ok = (isa == Isa::kVpopcntdq || isa == Isa::kAvx512bw) && cpu_has_vnni();
  const char* env = std::getenv("EXPCUDA_PACKED_ALGO");
  const std::string want = env == nullptr ? "" : env;
  if (want == "bitserial") return Algo::kBitserial;
  if (want == "dot") {
    TORCH_CHECK_VALUE(dot_ok, "EXPCUDA_PACKED_ALGO=dot needs AVX-512 VNNI and an AVX-512 ISA; "
                      "this CPU or EXPCUDA_PACKED_ISA=", isa_name(isa), " has none");
    TORCH_CHECK_VALUE(w_bits <= 7, "EXPCUDA_PACKED_ALGO=dot takes w_bits <= 7 (int8 weight codes), got "
                      "w_bits=", w_bits);
    return Algo::kDot;
  }
  TORCH_CHECK_VALUE(want.empty() || want == "auto",
                    "EXPCUDA_PACKED_ALGO must be auto, bitserial or dot; got '", want, "'");
  return dot_ok && w_bits <= 7 && dot_is_faster(a_bits, w_bits) ? Algo::kDot : Algo::kBitserial;
}

// ============================================================================ bit packing

// row: kw*64 code bytes; out[i*kw + k]: bit b = bit i of byte 64k+b (the weights' plane layout).
// Returns the row's code sum, sum_i 2^i popcount(plane i): T comes from the same pass.
int32_t pack_scalar(const uint8_t* row, int64_t kw, int bits, uint64_t* out) {
  int32_t sum = 0;
  for (int64_t k = 0; k < kw; ++k) {
    for (int i = 0; i < bits; ++i) {
      uint64_t word = 0;
      for (int b = 0; b < 64; ++b) word |= static_cast<uint64_t>((row[64 * k + b] >> i) & 1) << b;
      out[i * kw + k] = word;
      sum += __builtin_popcountll(word) << i;
    }
  }
  return sum;
}

__attribute__((target("avx2,popcnt"))) int32_t pack_avx2(const uint8_t* row, int64_t kw, int bits,
                                                         uint64_t* out) {
  int64_t sum = 0;
  for (int64_t k = 0; k < kw; ++k) {
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 64 * k));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 64 * k + 32));
    for (int i = 0; i < bits; ++i) {
      const __m128i shift = _mm_cvtsi32_si128(7 - i);  // bit i of every byte to its top bit
      const uint32_t a = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_sll_epi16(lo, shift)));
      const uint32_t b = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_sll_epi16(hi, shift)));
      const uint64_t word = a | (static_cast<uint64_t>(b) << 32);
      out[i * kw + k] = word;
      sum += static_cast<int64_t>(_mm_popcnt_u64(word)) << i;
    }
  }
  return static_cast<int32_t>(sum);
}

__attribute__((target("avx512f,avx512bw,popcnt"))) int32_t pack_avx512(const uint8_t* row, int64_t kw, int bits,
                                                                       uint64_t* out) {
  int64_t sum = 0;
  for (int64_t k = 0; k < kw; ++k) {
    const __m512i v = _mm512_loadu_si512(row + 64 * k);
    for (int i = 0; i < bits; ++i) {
      const uint64_t word = _mm512_test_epi8_mask(v, _mm512_set1_epi8(static_cast<char>(1 << i)));
      out[i * kw + k] = word;
      sum += static_cast<int64_t>(_mm_popcnt_u64(word)) << i;
    }
  }
  return static_cast<int32_t>(sum);
}

int32_t pack_row(Isa isa, const uint8_t* row, int64_t kw, int bits, uint64_t* out) {
  switch (isa) {
    case Isa::kVpopcntdq:
    case Isa::kAvx512bw: return pack_avx512(row, kw, bits, out);
    case Isa::kAvx2: return pack_avx2(row, kw, bits, out);
    default: return pack_scalar(row, kw, bits, out);
  }
}

// The code sum of a row of kw*64 bytes, for the VNNI path (which has AVX-512BW).
__attribute__((target("avx512f,avx512bw"))) int32_t row_sum_avx512(const uint8_t* row, int64_t kw) {
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < kw; ++k)
    acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_loadu_si512(row + 64 * k), _mm512_setzero_si512()));
  return static_cast<int32_t>(_mm512_reduce_add_epi64(acc));
}

// ============================================================================ bit-serial tiles

// One tile: 4 rows (row r at x + r*xs, planes [a_bits][kw]) times OBT blocks of 8 filters
// (block b at w + b*ws, [w_bits][kw][8 lanes]); out[r*os + b*8 + l] = S of row r, filter 8b+l.

template <int OBT>
void bits_scalar(const uint64_t* x, int64_t xs, const uint64_t* w, int64_t ws, int ab, int wb,
                 int64_t kw, int32_t* out, int64_t os) {
  for (int r = 0; r < 4; ++r) {
    for (int b = 0; b < OBT; ++b) {
      for (int l = 0; l < 8; ++l) {
        int64_t s = 0;
        for (int i = 0; i < ab; ++i) {
          for (int j = 0; j < wb; ++j) {
            int64_t c = 0;
            for (int64_t k = 0; k < kw; ++k) {
              c += __builtin_popcountll(x[r * xs + i * kw + k] & w[b * ws + (j * kw + k) * 8 + l]);
            }
            s += c << (i + j);
          }
        }
        out[r * os + b * 8 + l] = static_cast<int32_t>(s);
      }
    }
  }
}

// popcount of each byte by two nibble lookups (vpshufb); vpsadbw then sums them per 64-bit lane
__attribute__((target("avx2"), always_inline)) inline __m256i popcnt64_avx2(__m256i v) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i c = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, low)),
                                    _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
  return _mm256_sad_epu8(c, _mm256_setzero_si256());
}

template <int OBT>
__attribute__((target("avx2"))) void bits_avx2(const uint64_t* x, int64_t xs, const uint64_t* w, int64_t ws,
                                               int ab, int wb, int64_t kw, int32_t* out, int64_t os) {
  constexpr int H = 2 * OBT;  // a block of 8 filters is two vectors of 4
  __m256i tot[4][H];
  for (int r = 0; r < 4; ++r)
    for (int h = 0; h < H; ++h) tot[r][h] = _mm256_setzero_si256();
  for (int i = 0; i < ab; ++i) {
    for (int j = 0; j < wb; ++j) {
      __m256i acc[4][H];
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < H; ++h) acc[r][h] = _mm256_setzero_si256();
      for (int64_t k = 0; k < kw; ++k) {
        __m256i wv[H];
        for (int h = 0; h < H; ++h)
          wv[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (h / 2) * ws + (j * kw + k) * 8 + (h % 2) * 4));
        for (int r = 0; r < 4; ++r) {
          const __m256i xb = _mm256_set1_epi64x(static_cast<long long>(x[r * xs + i * kw + k]));
          for (int h = 0; h < H; ++h)
            acc[r][h] = _mm256_add_epi64(acc[r][h], popcnt64_avx2(_mm256_and_si256(xb, wv[h])));
        }
      }
      const __m128i shift = _mm_cvtsi32_si128(i + j);
      for (int r = 0; r < 4; ++r)
        for (int h = 0; h < H; ++h) tot[r][h] = _mm256_add_epi64(tot[r][h], _mm256_sll_epi64(acc[r][h], shift));
    }
  }
  const __m256i evens = _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0);  // the low halves: int64 -> int32
  for (int r = 0; r < 4; ++r)
    for (int h = 0; h < H; ++h)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * os + h * 4),
                       _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(tot[r][h], evens)));
}

__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512i popcnt64_avx512bw(__m512i v) {
  const __m512i lut = _mm512_set4_epi32(0x04030302, 0x03020201, 0x03020201, 0x02010100);
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i c = _mm512_add_epi8(_mm512_shuffle_epi8(lut, _mm512_and_si512(v, low)),
                                    _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), low)));
  return _mm512_sad_epu8(c, _mm512_setzero_si512());
}

__attribute__((target("avx512f,avx512vpopcntdq"), always_inline)) inline __m512i popcnt64_vpopcntdq(__m512i v) {
  return _mm512_popcnt_epi64(v);
}

// The AVX-512 tiles; POPCNT is one of the two popcount functions above (same target set).
// NAME##_1bit: one bit each (the common deployed case), no plane weighting.
#define EXPCUDA_BITS_AVX512(NAME, TARGET, POPCNT)                                                      \
  template <int OBT>                                                                                  \
  __attribute__((target(TARGET))) void NAME(const uint64_t* x, int64_t xs, const uint64_t* w,         \
                                            int64_t ws, int ab, int wb, int64_t kw, int32_t* out,     \
                                            int64_t os) {                                             \
    __m512i tot[4][OBT];                                                                              \
    for (int r = 0; r < 4; ++r)                                                                       \
      for (int b = 0; b < OBT; ++b) tot[r][b] = _mm512_setzero_si512();                               \
    for (int i = 0; i < ab; ++i) {                                                                    \
      for (int j = 0; j < wb; ++j) {                                                                  \
        __m512i acc[4][OBT];                                                                          \
        for (int r = 0; r < 4; ++r)                                                                   \
          for (int b = 0; b < OBT; ++b) acc[r][b] = _mm512_setzero_si512();                           \
        for (int64_t k = 0; k < kw; ++k) {                                                            \
          __m512i wv[OBT];                                                                            \
          for (int b = 0; b < OBT; ++b) wv[b] = _mm512_loadu_si512(w + b * ws + (j * kw + k) * 8);    \
          for (int r = 0; r < 4; ++r) {                                                               \
            const __m512i xb = _mm512_set1_epi64(static_cast<long long>(x[r * xs + i * kw + k]));     \
            for (int b = 0; b < OBT; ++b)                                                             \
              acc[r][b] = _mm512_add_epi64(acc[r][b], POPCNT(_mm512_and_si512(xb, wv[b])));           \
          }                                                                                           \
        }                                                                                             \
        const __m128i shift = _mm_cvtsi32_si128(i + j);                                               \
        for (int r = 0; r < 4; ++r)                                                                   \
          for (int b = 0; b < OBT; ++b)                                                               \
            tot[r][b] = _mm512_add_epi64(tot[r][b], _mm512_sll_epi64(acc[r][b], shift));              \
      }                                                                                               \
    }                                                                                                 \
    for (int r = 0; r < 4; ++r)                                                                       \
      for (int b = 0; b < OBT; ++b)                                                                   \
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * os + b * 8),                         \
                            _mm512_cvtepi64_epi32(tot[r][b]));                                        \
  }                                                                                                   \
  template <int OBT>                                                                                  \
  __attribute__((target(TARGET))) void NAME##_1bit(const uint64_t* x, int64_t xs, const uint64_t* w,  \
                                                   int64_t ws, int, int, int64_t kw, int32_t* out,    \
                                                   int64_t os) {                                      \
    __m512i acc[4][OBT];                                                                              \
    for (int r = 0; r < 4; ++r)                                                                       \
      for (int b = 0; b < OBT; ++b) acc[r][b] = _mm512_setzero_si512();                               \
    for (int64_t k = 0; k < kw; ++k) {                                                                \
      __m512i wv[OBT];                                                                                \
      for (int b = 0; b < OBT; ++b) wv[b] = _mm512_loadu_si512(w + b * ws + k * 8);                   \
      for (int r = 0; r < 4; ++r) {                                                                   \
        const __m512i xb = _mm512_set1_epi64(static_cast<long long>(x[r * xs + k]));                  \
        for (int b = 0; b < OBT; ++b)                                                                 \
          acc[r][b] = _mm512_add_epi64(acc[r][b], POPCNT(_mm512_and_si512(xb, wv[b])));               \
      }                                                                                               \
    }                                                                                                 \
    for (int r = 0; r < 4; ++r)                                                                       \
      for (int b = 0; b < OBT; ++b)                                                                   \
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * os + b * 8),                         \
                            _mm512_cvtepi64_epi32(acc[r][b]));                                        \
  }

EXPCUDA_BITS_AVX512(bits_avx512bw, "avx512f,avx512bw", popcnt64_avx512bw)
EXPCUDA_BITS_AVX512(bits_vpopcntdq, "avx512f,avx512bw,avx512vpopcntdq", popcnt64_vpopcntdq)
#undef EXPCUDA_BITS_AVX512

constexpr int kBitBlocks = 2;  // filter blocks of 8 per bit-serial tile (4 rows x 16 filters)

using BitsTile = void (*)(const uint64_t*, int64_t, const uint64_t*, int64_t, int, int, int64_t, int32_t*,
                          int64_t);

BitsTile bits_tile(Isa isa, bool full, bool one_bit) {
  switch (isa) {
    case Isa::kVpopcntdq:
      if (one_bit) return full ? bits_vpopcntdq_1bit<kBitBlocks> : bits_vpopcntdq_1bit<1>;
      return full ? bits_vpopcntdq<kBitBlocks> : bits_vpopcntdq<1>;
    case Isa::kAvx512bw:
      if (one_bit) return full ? bits_avx512bw_1bit<kBitBlocks> : bits_avx512bw_1bit<1>;
      return full ? bits_avx512bw<kBitBlocks> : bits_avx512bw<1>;
    case Isa::kAvx2: return full ? bits_avx2<kBitBlocks> : bits_avx2<1>;
    default: return full ? bits_scalar<kBitBlocks> : bits_scalar<1>;
  }
}

// ============================================================================ VNNI tiles

// 4 rows of code bytes (row r at x + r*xs) times OBT blocks of 16 filters (block b at w + b*ws,
// [k4][16 lanes] dwords of 4 int8 weight codes); out[r*os + b*16 + l].
template <int OBT>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void dot_vnni(const uint8_t* x, int64_t xs,
                                                                     const int32_t* w, int64_t ws,
                                                                     int64_t k4, int32_t* out, int64_t os) {
  __m512i acc[4][OBT];
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < OBT; ++b) acc[r][b] = _mm512_setzero_si512();
  for (int64_t k = 0; k < k4; ++k) {
    __m512i wv[OBT];
    for (int b = 0; b < OBT; ++b) wv[b] = _mm512_loadu_si512(w + b * ws + k * 16);
    for (int r = 0; r < 4; ++r) {
      int32_t quad;
      std::memcpy(&quad, x + r * xs + 4 * k, 4);
      const __m512i xb = _mm512_set1_epi32(quad);
      for (int b = 0; b < OBT; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], xb, wv[b]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < OBT; ++b) _mm512_storeu_si512(out + r * os + b * 16, acc[r][b]);
}

constexpr int kDotBlocks = 4;  // filter blocks of 16 per VNNI tile (4 rows x 64 filters)

// ============================================================================ the convolution

struct Geometry {
  int64_t n, h, w, c, o, kh, kw, stride, pad, ho, wo;
  int64_t k;    // KH*KW*C codes per gathered row
  int64_t kp;   // k rounded up to 64 bytes
  int64_t kwd;  // kp / 64 words per bit plane
};

// Filter o's codes as one row of kp bytes in the gathered order (tap-major, then channel), for
// the VNNI path (so AVX-512BW is there): 64 channels at a time, each plane's 64 bits a byte mask.
__attribute__((target("avx512f,avx512bw"))) void filter_row(const uint8_t* wp, const Geometry& g,
                                                             int64_t wbits, int64_t o, uint8_t* row) {
  const int64_t cb = (g.c + 7) / 8;
  std::memset(row, 0, g.kp);
  for (int64_t t = 0; t < g.kh * g.kw; ++t) {
    const uint8_t* src = wp + (o * g.kh * g.kw + t) * wbits * cb;
    for (int64_t c0 = 0; c0 < g.c; c0 += 64) {
      const int64_t n = std::min<int64_t>(64, g.c - c0);
      const uint64_t valid = n == 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;  // pad bits: not channels
      __m512i codes = _mm512_setzero_si512();
      for (int64_t j = 0; j < wbits; ++j) {
        uint64_t bits = 0;
        std::memcpy(&bits, src + j * cb + c0 / 8, (n + 7) / 8);
        codes = _mm512_or_si512(codes, _mm512_maskz_mov_epi8(bits & valid, _mm512_set1_epi8(static_cast<char>(1 << j))));
      }
      _mm512_mask_storeu_epi8(row + t * g.c + c0, valid, codes);
    }
  }
}

// The gathered codes of output pixel (n, oy, ox): a row of kp bytes, zero where a tap is out of
// bounds.
void gather_row(const uint8_t* xp, const Geometry& g, int64_t n, int64_t oy, int64_t ox, uint8_t* row) {
  std::memset(row, 0, g.kp);
  const int64_t ix0 = ox * g.stride - g.pad, iy0 = oy * g.stride - g.pad;
  const int64_t lo = std::max<int64_t>(0, -ix0), hi = std::min<int64_t>(g.kw, g.w - ix0);
  if (lo >= hi) return;
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = iy0 + ky;
    if (iy < 0 || iy >= g.h) continue;
    std::memcpy(row + (ky * g.kw + lo) * g.c, xp + (((n * g.h + iy) * g.w + ix0 + lo) * g.c), (hi - lo) * g.c);
  }
}

// ORs the nbits bits of src (little-endian bytes) into the bit string dst from bit pos on.
void put_bits(uint64_t* dst, int64_t pos, const uint8_t* src, int64_t nbits) {
  const int64_t nbytes = (nbits + 7) / 8;
  if (pos % 8 == 0 && nbits % 8 == 0) {  // whole bytes (x86 is little-endian: byte i = bits 8i..)
    uint8_t* to = reinterpret_cast<uint8_t*>(dst) + pos / 8;
    int64_t i = 0;
    for (; i + 8 <= nbytes; i += 8) std::memcpy(to + i, src + i, 8);  // fixed size: inlined, no call
    for (; i < nbytes; ++i) to[i] = src[i];
    return;
  }
  for (int64_t i = 0; i < nbytes; ++i) {
    uint64_t b = src[i];
    if (i == nbytes - 1 && nbits % 8 != 0) b &= (uint64_t{1} << (nbits % 8)) - 1;  // pad bits: not channels
    const int64_t p = pos + 8 * i, word = p >> 6, off = p & 63;
    dst[word] |= b << off;
    if (off > 56 && (b >> (64 - off)) != 0) dst[word + 1] |= b >> (64 - off);
  }
}


std::tuple<Tensor, Tensor> packed_conv2d_cpu(const Tensor& x_codes, const Tensor& w_planes, int64_t channels,
                                             int64_t a_bits, int64_t w_bits, int64_t stride, int64_t padding) {
  check_packed_args(x_codes, w_planes, channels, a_bits, w_bits, stride, padding, c10::DeviceType::CPU);
  const Tensor x = x_codes.contiguous();
  const Tensor wt = w_planes.contiguous();
  Geometry g;
  g.n = x.size(0), g.h = x.size(1), g.w = x.size(2), g.c = channels;
  g.o = wt.size(0), g.kh = wt.size(1), g.kw = wt.size(2), g.stride = stride, g.pad = padding;
  g.ho = (g.h + 2 * padding - g.kh) / stride + 1;
  g.wo = (g.w + 2 * padding - g.kw) / stride + 1;
  g.k = g.kh * g.kw * g.c;
  g.kp = (g.k + 63) / 64 * 64;
  g.kwd = g.kp / 64;
  Tensor s_out = at::empty({g.n, g.ho, g.wo, g.o}, x.options().dtype(at::kInt));
  Tensor t_out = at::empty({g.n, g.ho, g.wo}, x.options().dtype(at::kInt));
  const int64_t m_total = g.n * g.ho * g.wo;
  if (m_total == 0) return {s_out, t_out};

  // the OR of all codes, to check them against a_bits
  const uint8_t* xp = x.data_ptr<uint8_t>();
  std::atomic<int> ored{0};
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    uint8_t any = 0;
    for (int64_t q = begin; q < end; ++q) any |= xp[q];
    ored.fetch_or(any);
  });
  if (ored.load() >= (1 << a_bits)) {
    TORCH_CHECK_VALUE(false, "packed_conv2d: x_codes must be < 2**a_bits = ", 1 << a_bits, " for a_bits=",
                      a_bits, ", got a code ", static_cast<int>(x.max().item<uint8_t>()));
  }

  const Isa isa = pick_isa();
  const Algo algo = pick_algo(isa, a_bits, w_bits);
  const bool dot = algo == Algo::kDot;
  const int ab = static_cast<int>(a_bits), wb = static_cast<int>(w_bits);
  const int64_t lanes = dot ? 16 : 8;
  const int64_t nblocks = (g.o + lanes - 1) / lanes;
  const int64_t k4 = g.kp / 4;
  const int64_t block_words = dot ? k4 * 16 : wb * g.kwd * 8;  // int32 (dot) or uint64 words per block
  // the filters in blocks of `lanes`, each block's words interleaved filter by filter (every
  // word is written: filters past O are zero)
  std::unique_ptr<uint64_t[]> wbits(new uint64_t[dot ? 0 : nblocks * block_words]);
  std::unique_ptr<int32_t[]> wdot(new int32_t[dot ? nblocks * block_words : 0]);
  const uint8_t* wp = wt.data_ptr<uint8_t>();
  const int64_t cb = (g.c + 7) / 8, nplane = wb * g.kwd;
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> rows(dot ? lanes * g.kp : 0);
    std::vector<uint64_t> planes(dot ? 0 : lanes * nplane);
    for (int64_t blk = begin; blk < end; ++blk) {
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t o = blk * lanes + l;
        if (dot) {
          uint8_t* row = rows.data() + l * g.kp;
          if (o < g.o) {
            filter_row(wp, g, w_bits, o, row);
          } else {
            std::memset(row, 0, g.kp);
          }
        } else {  // the planes as they are, tap after tap: no unpacking to codes
          uint64_t* pl = planes.data() + l * nplane;
          std::fill(pl, pl + nplane, 0);
          if (o >= g.o) continue;
          for (int64_t t = 0; t < g.kh * g.kw; ++t)
            for (int64_t j = 0; j < wb; ++j)
              put_bits(pl + j * g.kwd, t * g.c, wp + ((o * g.kh * g.kw + t) * wb + j) * cb, g.c);
        }
      }
      if (dot) {
        int32_t* dst = wdot.get() + blk * block_words;
        for (int64_t k = 0; k < k4; ++k)
          for (int64_t l = 0; l < 16; ++l) std::memcpy(dst + k * 16 + l, rows.data() + l * g.kp + 4 * k, 4);
      } else {
        uint64_t* dst = wbits.get() + blk * block_words;
        for (int64_t q = 0; q < nplane; ++q)
          for (int64_t l = 0; l < 8; ++l) dst[q * 8 + l] = planes[l * nplane + q];
      }
    }
  });

  // Tasks: chunks of kRows output pixels, times groups of filter blocks when there are too few
  // chunks to keep every thread busy (a batch of one, the last layers).
  const int64_t nchunks = (m_total + kRows - 1) / kRows;
  const int64_t tile_blocks = dot ? kDotBlocks : kBitBlocks;
  int64_t group_blocks = std::max<int64_t>(nblocks, 1);
  if (nchunks < 4 * at::get_num_threads()) group_blocks = tile_blocks;
  const int64_t ngroups = std::max<int64_t>(1, (nblocks + group_blocks - 1) / group_blocks);
  int32_t* s_ptr = s_out.data_ptr<int32_t>();
  int32_t* t_ptr = t_out.data_ptr<int32_t>();
  const bool one_bit = ab == 1 && wb == 1;
  const BitsTile bits_full = bits_tile(isa, true, one_bit), bits_one = bits_tile(isa, false, one_bit);

  // Each thread takes the next task from a shared counter: on a machine shared with other work a
  // thread that is slowed down takes fewer tasks instead of holding up the others.
  const int64_t ntasks = nchunks * ngroups;
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), ntasks), 1, [&](int64_t, int64_t) {
    std::vector<uint8_t> rows(kRows * g.kp);
    std::vector<uint64_t> xbits(dot ? 0 : kRows * ab * g.kwd);
    constexpr int64_t kTile = std::max(kBitBlocks * 8, kDotBlocks * 16);  // int32 per tile row
    int32_t tile[4 * kTile];
    int32_t tsum[kRows];
    int64_t gathered = -1;  // the chunk whose rows are in `rows`
    for (int64_t task = next_task++; task < ntasks; task = next_task++) {
      const int64_t chunk = task / ngroups, group = task % ngroups;
      const int64_t m0 = chunk * kRows, nrows = std::min(kRows, m_total - m0);
      const int64_t nrows4 = (nrows + 3) / 4 * 4;
      if (gathered != chunk) {
        int64_t n = m0 / (g.ho * g.wo), oy = m0 / g.wo % g.ho, ox = m0 % g.wo;  // stepped, not divided
        for (int64_t r = 0; r < nrows4; ++r) {
          uint8_t* row = rows.data() + r * g.kp;
          if (r < nrows) {
            gather_row(xp, g, n, oy, ox, row);
            if (++ox == g.wo) {
              ox = 0;
              if (++oy == g.ho) oy = 0, ++n;
            }
          } else {
            std::memset(row, 0, g.kp);
          }
          tsum[r] = dot ? row_sum_avx512(row, g.kwd) : pack_row(isa, row, g.kwd, ab, xbits.data() + r * ab * g.kwd);
        }
        gathered = chunk;
      }
      if (group == 0) std::memcpy(t_ptr + m0, tsum, nrows * sizeof(int32_t));
      const int64_t b_end = std::min(nblocks, (group + 1) * group_blocks);
      for (int64_t b0 = group * group_blocks; b0 < b_end; b0 += tile_blocks) {
        const int64_t nb = std::min(tile_blocks, b_end - b0);
        const int64_t o0 = b0 * lanes, no = std::min(g.o, (b0 + nb) * lanes) - o0;
        for (int64_t r0 = 0; r0 < nrows4; r0 += 4) {
          // whole tiles straight into S, the ragged ones (last filters, last rows) through `tile`
          const int64_t rn = std::min<int64_t>(4, nrows - r0);
          const bool direct = rn == 4 && no == nb * lanes;
          int32_t* out = direct ? s_ptr + (m0 + r0) * g.o + o0 : tile;
          const int64_t os = direct ? g.o : kTile;
          if (dot) {
            const uint8_t* xr = rows.data() + r0 * g.kp;
            const int32_t* w0 = wdot.get() + b0 * block_words;
            if (nb == kDotBlocks) {
              dot_vnni<kDotBlocks>(xr, g.kp, w0, block_words, k4, out, os);
            } else {
              for (int64_t b = 0; b < nb; ++b)
                dot_vnni<1>(xr, g.kp, w0 + b * block_words, block_words, k4, out + b * 16, os);
            }
          } else {
            const uint64_t* xr = xbits.data() + r0 * ab * g.kwd;
            const uint64_t* w0 = wbits.get() + b0 * block_words;
            if (nb == kBitBlocks) {
              bits_full(xr, ab * g.kwd, w0, block_words, ab, wb, g.kwd, out, os);
            } else {
              for (int64_t b = 0; b < nb; ++b)
                bits_one(xr, ab * g.kwd, w0 + b * block_words, block_words, ab, wb, g.kwd, out + b * 8, os);
            }
          }
          if (!direct) {
            for (int64_t r = 0; r < rn; ++r)
              std::memcpy(s_ptr + (m0 + r0 + r) * g.o + o0, tile + r * kTile, no * sizeof(int32_t));
          }
        }
      }
    }
  });
  return {s_out, t_out};
}

// Which ISA and which way packed_conv2d takes for these bit widths now: "<isa> <algo>".
std::string packed_conv2d_path(int64_t a_bits, int64_t w_bits) {
  TORCH_CHECK_VALUE(a_bits >= 1 && a_bits <= 8, "packed_conv2d_path: a_bits must be in 1..8, got ", a_bits);
  TORCH_CHECK_VALUE(w_bits >= 1 && w_bits <= 8, "packed_conv2d_path: w_bits must be in 1..8, got ", w_bits);
  const Isa isa = pick_isa();
  return std::string(isa_name(isa)) + (pick_algo(isa, a_bits, w_bits) == Algo::kDot ? " dot" : " bitserial");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(expcuda_C, m) {
  m.def("packed_conv2d(Tensor x_codes, Tensor w_planes, int channels, int a_bits, int w_bits, int stride,"
        " int padding) -> (Tensor, Tensor)");
  m.def("packed_conv2d_path(int a_bits, int w_bits) -> str", &packed_conv2d_path);
}

TORCH_LIBRARY_IMPL(expcuda_C, CPU, m) {
  m.impl("packed_conv2d", &packed_conv2d_cpu);
}

}  // namespace expcuda

#pragma GCC diagnostic pop
