// SipHash-1-3 with a 128-bit output: a keyed PRF, so that clients who pick
// their own keys cannot aim collisions at each other or at the table.
#ifndef RAPIDLIMIT_SRC_SIPHASH_H_
#define RAPIDLIMIT_SRC_SIPHASH_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

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

// The constant last bytes of a family of messages (a limit's key suffix),
// split in advance into SipHash message words for each of the 8 byte
// offsets at which they can start: the bytes before them vary in length,
// and assembling the words byte by byte at every hash cost more than the
// rounds they feed. Immutable once built, so any thread may read it.
class SipSuffix {
 public:
  SipSuffix() : SipSuffix(nullptr, 0) {}
  SipSuffix(const void* data, size_t len)
      : len_(len), stride_(len / 8 + 2), words_(8 * stride_, 0) {
    const auto* in = static_cast<const unsigned char*>(data);
    for (size_t offset = 0; offset < 8; ++offset) {
      uint64_t* w = &words_[offset * stride_];
      for (size_t i = 0; i < len; ++i) {
        const size_t pos = offset + i;
        w[pos / 8] |= static_cast<uint64_t>(in[i]) << (8 * (pos % 8));
      }
    }
  }

  size_t size() const { return len_; }

  // The suffix's words when it starts `offset` (< 8) bytes into a word:
  // (offset + size()) / 8 complete words, then the last, partial one (0
  // when there is none). Word 0 leaves its low `offset` bytes zero.
  const uint64_t* WordsAt(size_t offset) const {
    return &words_[offset * stride_];
  }

 private:
  size_t len_;
  size_t stride_;  // room for the (7 + len) / 8 + 1 words of any offset
  std::vector<uint64_t> words_;
};

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
    if (len < 8) {
      tail_ = LoadPartial(in, len);
      return;
    }
    const unsigned char* const end = in + len;
    for (; len >= 8; in += 8, len -= 8) Compress(Load64(in));
    // At least 8 bytes were left, so the last ones come in one load
    // ending at the piece's end, shifted down: no byte-wise assembly.
    tail_ = len == 0 ? 0 : Load64(end - 8) >> (64 - 8 * len);
  }

  // Update(suffix's bytes) then Finish(), with the suffix's words already
  // assembled: FinishWith(SipSuffix(p, n)) == Update(p, n), Finish().
  [[gnu::always_inline]] Hash128 FinishWith(const SipSuffix& suffix) const {
    SipHasher13 s = *this;
    const size_t offset = s.len_ & 7;
    const uint64_t* w = suffix.WordsAt(offset);
    const size_t full = (offset + suffix.size()) / 8;
    // The pending bytes occupy the low `offset` bytes, where w[0] has none.
    uint64_t m = s.tail_ | w[0];
    for (size_t k = 0; k < full; ++k) {
      s.Compress(m);
      m = w[k + 1];
    }
    s.len_ += suffix.size();
    s.tail_ = m;
    return s.Finish();
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
