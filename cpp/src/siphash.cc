#include "siphash.h"

#include <cstring>
#include <random>

namespace rapidlimit::internal {
namespace {

struct State {
  uint64_t v0, v1, v2, v3;
  void Round() { SipRound(v0, v1, v2, v3); }
};

inline uint64_t Load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // little-endian hosts only, which is all we build for
}

}  // namespace

Hash128 SipHash13_128(const SipKey& key, const void* data, size_t len) {
  const auto* in = static_cast<const unsigned char*>(data);
  State s{key.k0 ^ 0x736f6d6570736575ULL, key.k1 ^ 0x646f72616e646f6dULL,
          key.k0 ^ 0x6c7967656e657261ULL, key.k1 ^ 0x7465646279746573ULL};
  s.v1 ^= 0xee;  // the 128-bit output variant
  const unsigned char* end = in + (len & ~size_t{7});
  for (; in != end; in += 8) {
    const uint64_t m = Load64(in);
    s.v3 ^= m;
    s.Round();
    s.v0 ^= m;
  }
  uint64_t b = static_cast<uint64_t>(len) << 56;
  switch (len & 7) {
    case 7:
      b |= static_cast<uint64_t>(in[6]) << 48;
      [[fallthrough]];
    case 6:
      b |= static_cast<uint64_t>(in[5]) << 40;
      [[fallthrough]];
    case 5:
      b |= static_cast<uint64_t>(in[4]) << 32;
      [[fallthrough]];
    case 4:
      b |= static_cast<uint64_t>(in[3]) << 24;
      [[fallthrough]];
    case 3:
      b |= static_cast<uint64_t>(in[2]) << 16;
      [[fallthrough]];
    case 2:
      b |= static_cast<uint64_t>(in[1]) << 8;
      [[fallthrough]];
    case 1:
      b |= static_cast<uint64_t>(in[0]);
      break;
    case 0:
      break;
  }
  s.v3 ^= b;
  s.Round();
  s.v0 ^= b;
  s.v2 ^= 0xee;
  s.Round();
  s.Round();
  s.Round();
  const uint64_t lo = s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
  s.v1 ^= 0xdd;
  s.Round();
  s.Round();
  s.Round();
  const uint64_t hi = s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
  return {lo, hi};
}

const SipKey& ProcessSipKey() {
  static const SipKey key = [] {
    std::random_device rd;
    auto draw = [&rd] {
      return (static_cast<uint64_t>(rd()) << 32) ^ static_cast<uint64_t>(rd());
    };
    return SipKey{draw(), draw()};
  }();
  return key;
}

}  // namespace rapidlimit::internal
