// SipHash-1-3 with a 128-bit output: a keyed PRF, so that clients who pick
// their own keys cannot aim collisions at each other or at the table.
#ifndef RAPIDLIMIT_SRC_SIPHASH_H_
#define RAPIDLIMIT_SRC_SIPHASH_H_

#include <cstddef>
#include <cstdint>

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

}  // namespace rapidlimit::internal

#endif  // RAPIDLIMIT_SRC_SIPHASH_H_
