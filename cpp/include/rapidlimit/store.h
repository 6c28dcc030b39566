// The storage interface every backend implements, and the values a rate
// limit decision returns.
#ifndef RAPIDLIMIT_STORE_H_
#define RAPIDLIMIT_STORE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "rapidlimit/limit.h"

namespace rapidlimit {

enum class Strategy : uint8_t {
  // `limits`' fixed window: the window opens at the first hit and every
  // hit, rejected or not, increments the counter.
  kFixedWindow,
  // An exact log of the last `amount` admitted hits; rejected hits leave
  // no trace.
  kMovingWindow,
  // `limits`' sliding window counter: epoch-aligned windows, the previous
  // one weighted by how much of it still overlaps the moving window.
  kSlidingWindowCounter,
  // GCRA: `amount` per period, bursts up to Limit::EffectiveBurst().
  kTokenBucket,
};

// Every strategy, in declaration order.
inline constexpr Strategy kStrategies[] = {
    Strategy::kFixedWindow, Strategy::kMovingWindow,
    Strategy::kSlidingWindowCounter, Strategy::kTokenBucket};

// "fixed-window", "moving-window", "sliding-window-counter", "token-bucket".
std::string_view StrategyName(Strategy s);
// Inverse of StrategyName; nullopt for an unknown name.
std::optional<Strategy> StrategyFromName(std::string_view name);

// A 128-bit keyed hash of a key's bytes: how the memory store identifies
// keys (MemoryKeyFingerprint in memory_store.h).
struct KeyFingerprint {
  uint64_t lo = 0;
  uint64_t hi = 0;
};

// One question to a store: may `key` spend `cost` of `limit` now?
// `limit` and the bytes of `key` are borrowed for the duration of the call.
struct Request {
  Strategy strategy = Strategy::kFixedWindow;
  const Limit* limit = nullptr;
  std::string_view key;
  int64_t cost = 1;
  // Only for a store whose AcceptsFingerprints() is true: when set, it
  // reads `fingerprint` (which must be the key's) instead of hashing
  // `key`, which may then be empty. Lets a caller that assembles keys from
  // parts hash the parts and never build the key.
  bool has_fingerprint = false;
  KeyFingerprint fingerprint;
};

// Where a decision came from. The memory store always answers kStore; a
// remote store (Redis) may answer without its backend.
enum class DecisionSource : uint8_t {
  kStore,       // the store's shared state
  kCache,       // in-process cache of a key known to be blocked until later
  kFallback,    // backend unavailable: decided by an in-process fallback store
  kFailOpen,    // backend unavailable: allowed by policy
  kFailClosed,  // backend unavailable: rejected by policy (HTTP 503)
};

// The full answer, with everything response headers and 429 bodies need.
struct Decision {
  bool allowed = false;
  int64_t limit = 0;              // the limit's amount
  int64_t remaining = 0;          // hits left in the current window, >= 0
  int64_t reset_nanos = 0;        // epoch ns at which the window resets
  int64_t retry_after_nanos = 0;  // 0 when allowed
  DecisionSource source = DecisionSource::kStore;
};

// Completion of Store::DecideAsync: `decisions[0..written)` as Decide would
// have written them, and Decide's return value. The array is valid only
// during the call.
using DecideCallback = void (*)(void* context, const Decision* decisions,
                                size_t written, size_t first_reject);

enum class Mode : uint8_t {
  kHit,   // consume; stop at the first rejection
  kTest,  // consume nothing; evaluate every request
};

// Strategy-specific view of one key's state, without consuming anything.
// Fields a strategy does not use are 0.
struct WindowState {
  // Fixed window: the counter. Moving window: hits inside the window.
  // Sliding window counter: hits in the current epoch window.
  // Token bucket: tokens in use (amount - available, rounded up).
  int64_t count = 0;
  // Fixed window: expiry of the counter, or `now` if there is none.
  // Moving window: oldest hit inside the window, or `now`.
  // Token bucket: when the bucket is full again.
  int64_t time_nanos = 0;
  // Sliding window counter only.
  int64_t previous_count = 0;
  int64_t previous_ttl_nanos = 0;
  int64_t current_ttl_nanos = 0;
};

// A backend that applies rate-limit algorithms atomically per key.
// Implementations are thread-safe: any number of threads may call any
// method concurrently. Time is always passed in, never read, so a store is
// deterministic under test.
class Store {
 public:
  virtual ~Store() = default;

  // Decides `n` requests in order at time `now_nanos`, writing `out[0..n)`.
  // kHit charges each request; at the first rejection it stops, so later
  // requests are neither charged nor written. kTest charges nothing and
  // writes all. Returns the index of the first rejected request, or `n`.
  virtual size_t Decide(const Request* requests, size_t n, int64_t now_nanos,
                        Mode mode, Decision* out) = 0;

  // Decide without waiting: `done(context, ...)` is called exactly once,
  // on the calling thread before DecideAsync returns or later on a store
  // thread; it must not block. Requests are copied before DecideAsync
  // returns. The default runs Decide synchronously.
  virtual void DecideAsync(const Request* requests, size_t n, int64_t now_nanos,
                           Mode mode, DecideCallback done, void* context);

  // The raw state behind `request.key` for `request.strategy`.
  virtual WindowState Inspect(const Request& request, int64_t now_nanos) = 0;

  // Adds `amount` to a plain counter that expires `expiry_nanos` after it
  // was created (`limits`' Storage.incr). Returns the new value and, when
  // `expiry_at` is non-null, the expiry. Shares state with kFixedWindow.
  virtual int64_t Incr(std::string_view key, int64_t expiry_nanos,
                       int64_t amount, int64_t now_nanos,
                       int64_t* expiry_at) = 0;

  // Forgets `key` for `strategy`. Returns whether it existed.
  virtual bool Clear(Strategy strategy, std::string_view key) = 0;

  // Forgets everything. Returns the number of keys dropped.
  virtual size_t Reset() = 0;

  // Number of live keys (expired keys may be counted until swept).
  virtual size_t Size() const = 0;

  // Clear, Reset and Size that also say whether the store reached all of
  // its state: a store kept elsewhere (Redis) can fail part way, and then
  // returns false with a result that covers only what it reached (what it
  // keeps in process, such as caches, is cleared either way). Callers that
  // must not take a partial answer for a whole one (an administrator's
  // reset) use these. In-process stores always succeed.
  virtual bool TryClear(Strategy strategy, std::string_view key,
                        bool* existed) {
    *existed = Clear(strategy, key);
    return true;
  }
  // TryClear of `key` under strategies[0..n) at once (one command on
  // Redis); `*cleared` counts the states that existed.
  virtual bool TryClearMany(const Strategy* strategies, size_t n,
                            std::string_view key, size_t* cleared) {
    *cleared = 0;
    bool ok = true;
    for (size_t i = 0; i < n; ++i) {
      bool existed = false;
      ok = TryClear(strategies[i], key, &existed) && ok;
      *cleared += existed ? 1 : 0;
    }
    return ok;
  }
  virtual bool TryReset(size_t* dropped) {
    *dropped = Reset();
    return true;
  }
  virtual bool TrySize(size_t* size) const {
    *size = Size();
    return true;
  }

  // Whether Decide and Inspect honour Request::has_fingerprint. Constant
  // for a store's lifetime.
  virtual bool AcceptsFingerprints() const { return false; }
};

inline void Store::DecideAsync(const Request* requests, size_t n,
                               int64_t now_nanos, Mode mode,
                               DecideCallback done, void* context) {
  std::vector<Decision> out(n);
  const size_t first_reject = Decide(requests, n, now_nanos, mode, out.data());
  const size_t written =
      (mode == Mode::kHit && first_reject < n) ? first_reject + 1 : n;
  done(context, out.data(), written, first_reject);
}

}  // namespace rapidlimit

#endif  // RAPIDLIMIT_STORE_H_
