// The embedded in-memory store: the default backend.
#ifndef RAPIDLIMIT_MEMORY_STORE_H_
#define RAPIDLIMIT_MEMORY_STORE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "rapidlimit/store.h"

namespace rapidlimit {

struct MemoryStoreOptions {
  // Hard cap on live keys across all strategies. When a shard reaches its
  // share, it first drops expired keys and then the least recently used
  // ones, so a flood of random keys cannot grow memory without bound.
  // Expired keys are dropped (here, by the incremental sweep or when a
  // table grows) only 1 s after their expiry, so that a caller whose clock
  // is up to 1 s behind still reads them, as on Redis.
  size_t max_keys = 1'000'000;
  // Independent lock domains. Rounded up to a power of two; 1 makes the
  // cap and LRU order exact, which tests rely on.
  size_t shards = 64;
};

// Keys are identified by a keyed 128-bit SipHash-1-3 of their bytes, of
// which 96 bits are stored: the key bytes themselves are never kept, so a
// fixed-window key costs the same few dozen bytes however long it is. Two
// keys share state only if those 96 bits collide (about n^2 / 2^97 for n
// keys under a per-process random seed). Thread-safe, one lock per shard.
// Its Decide and Inspect accept fingerprints (Request::has_fingerprint).
std::unique_ptr<Store> NewMemoryStore(const MemoryStoreOptions& options = {});

// The fingerprint a memory store identifies `key` by: SipHash-1-3 (128-bit
// output) under the per-process key, so the same in every memory store of
// the process and in no other process.
KeyFingerprint MemoryKeyFingerprint(std::string_view key);

// Approximate heap bytes held by a memory store's tables (for benchmarks).
size_t MemoryStoreBytes(const Store& store);

}  // namespace rapidlimit

#endif  // RAPIDLIMIT_MEMORY_STORE_H_
