// SipHash-1-3 with a 128-bit output: a keyed PRF, so that clients who pick
// their own keys cannot aim collisions at each other or at the table.
#ifndef RAPIDLIMIT_SRC_SIPHASH_H_
#define RAPIDLIMIT_SRC_SIPHASH_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace rapidlimit::internal {

struct Hash128 {
  uint64_t lo;
  uint64_t hi;
};

struct SipKey {
  uint64_t k0;
  uint64_t k1;
};

Hash128 SipHash13_128(const SipKey& key, const void* data, size_t len);

// A per-process random key, drawn once.
const SipKey& ProcessSipKey();

// The SipRound of both implementations below.
[[gnu::always_inline]] inline void SipRound(uint64_t& v0, uint64_t& v1,
                                            uint64_t& v2, uint64_t& v3) {
  const auto rotl = [](uint64_t x, int b) {
    return (x << b) | (x >> (64 - b));
  };
  v0 += v1;
  v1 = rotl(v1, 13);
  v1 ^= v0;
  v0 = rotl(v0, 32);
  v2 += v3;
  v3 = rotl(v3, 16);
  v3 ^= v2;
  v0 += v3;
  v3 = rotl(v3, 21);
  v3 ^= v0;
  v2 += v1;
  v1 = rotl(v1, 17);
  v1 ^= v2;
  v2 = rotl(v2, 32);
}

// SipHash13_128 fed in pieces: Update() with the bytes in order, then
// Finish(). The result is SipHash13_128 of the concatenation however the
// bytes are split, so a caller that assembles a key from parts need not
// copy them into one buffer. Copyable: the state after a common prefix can
// be kept and resumed for each key that starts with it. Always inlined: a
// key is a few dozen bytes, and out of line the state goes through memory
// between pieces, which cost a third as much as the rounds themselves.
class SipHasher13 {
 public:
  explicit SipHasher13(const SipKey& key)
      : v0_(key.k0 ^ 0x736f6d6570736575ULL),
        // 0xee: the 128-bit output variant.
        v1_(key.k1 ^ 0x646f72616e646f6dULL ^ 0xee),
        v2_(key.k0 ^ 0x6c7967656e657261ULL),
        v3_(key.k1 ^ 0x7465646279746573ULL) {}

  [[gnu::always_inline]] void Update(const void* data, size_t len) {
    const auto* in = static_cast<const unsigned char*>(data);
    const size_t used = len_ & 7;  // bytes already waiting in tail_
    len_ += len;
    if (used != 0) {
      const size_t take = len < 8 - used ? len : 8 - used;
      tail_ |= LoadPartial(in, take) << (8 * used);
      if (used + take < 8) return;
      Compress(tail_);
      in += take;
      len -= take;
    }
    for (; len >= 8; in += 8, len -= 8) Compress(Load64(in));
    tail_ = LoadPartial(in, len);
  }

  [[gnu::always_inline]] Hash128 Finish() const {
    SipHasher13 s = *this;
    s.Compress((static_cast<uint64_t>(s.len_) << 56) | s.tail_);
    s.v2_ ^= 0xee;
    s.Round();
    s.Round();
    s.Round();
    const uint64_t lo = s.v0_ ^ s.v1_ ^ s.v2_ ^ s.v3_;
    s.v1_ ^= 0xdd;
    s.Round();
    s.Round();
    s.Round();
    return {lo, s.v0_ ^ s.v1_ ^ s.v2_ ^ s.v3_};
  }

 private:
  static uint64_t Load64(const unsigned char* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;  // little-endian hosts only, which is all we build for
  }

  static uint32_t Load32(const unsigned char* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }

  // The first n < 8 bytes at p, little-endian, without reading past them:
  // two overlapping loads instead of a loop (overlapping bytes land on the
  // same bits, so or-ing them is exact).
  [[gnu::always_inline]] static uint64_t LoadPartial(const unsigned char* p,
                                                     size_t n) {
    if (n >= 4) {
      return Load32(p) |
             (static_cast<uint64_t>(Load32(p + n - 4)) << (8 * (n - 4)));
    }
    if (n == 0) return 0;
    return p[0] | (static_cast<uint64_t>(p[n / 2]) << (8 * (n / 2))) |
           (static_cast<uint64_t>(p[n - 1]) << (8 * (n - 1)));
  }

  [[gnu::always_inline]] void Round() { SipRound(v0_, v1_, v2_, v3_); }

  // One message word, c = 1 round.
  [[gnu::always_inline]] void Compress(uint64_t m) {
    v3_ ^= m;
    Round();
    v0_ ^= m;
  }

  uint64_t v0_, v1_, v2_, v3_;
  uint64_t tail_ = 0;  // the last len_ % 8 bytes, not yet compressed
  uint64_t len_ = 0;   // bytes fed so far (only its low 8 bits are hashed)
};

}  // namespace rapidlimit::internal

#endif  // RAPIDLIMIT_SRC_SIPHASH_H_
