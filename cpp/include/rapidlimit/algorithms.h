// The rate-limit algorithms as pure state transitions, one implementation
// each. A store keeps the state per key and calls these under its lock;
// nothing here allocates except the moving-window log, or knows about
// storage, threads or clocks.
#ifndef RAPIDLIMIT_ALGORITHMS_H_
#define RAPIDLIMIT_ALGORITHMS_H_

#include <algorithm>
#include <cstdint>
#include <limits>

#include "rapidlimit/limit.h"
#include "rapidlimit/store.h"

namespace rapidlimit {

// Fixed window and token bucket both fit in two words.
struct CounterState {
  int64_t expiry_nanos = 0;  // the state is void at or after this time
  int64_t value = 0;         // fixed window: counter; token bucket: TAT
};

struct SlidingState {
  int64_t expiry_nanos = 0;
  int64_t window = 0;  // epoch window index (now / period)
  int64_t current = 0;
  int64_t previous = 0;
};

// Newest-last ring of admission times, holding at most `limit.amount`
// entries: older ones can never decide anything again.
class MovingLog {
 public:
  MovingLog() = default;
  MovingLog(const MovingLog&) = delete;
  MovingLog& operator=(const MovingLog&) = delete;
  ~MovingLog();

  int64_t size() const { return size_; }
  // i = 0 is the newest entry.
  int64_t NewestAt(int64_t i) const;
  // Appends `count` copies of `t`, dropping the oldest beyond `capacity`.
  void Push(int64_t t, int64_t count, int64_t capacity);
  // Entries with time >= since; `oldest` gets the earliest such time.
  int64_t CountSince(int64_t since, int64_t* oldest) const;
  void Clear() { head_ = size_ = 0; }
  size_t HeapBytes() const { return static_cast<size_t>(cap_) * 8; }

 private:
  int64_t* ring_ = nullptr;
  int64_t cap_ = 0;
  int64_t head_ = 0;  // index of the oldest entry
  int64_t size_ = 0;
};

// The moving-window log keeps one 8-byte entry per admitted hit, so its
// limits are bounded: a larger amount is refused up front (use the sliding
// window counter for big quotas) rather than allocating without bound.
constexpr int64_t kMaxMovingWindowAmount = 1 << 20;

struct MovingState {
  int64_t expiry_nanos = 0;
  MovingLog* log = nullptr;  // owned by the store's slot
};

namespace internal {

// a + b, clamped to [-INT64_MAX, INT64_MAX]. The overflow flag rather than
// a 128-bit sum: each fixed-window hit adds twice, and the wide compares
// cost more than the rest of the addition.
inline int64_t SatAdd(int64_t a, int64_t b) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  int64_t sum;
  // Only operands of one sign overflow, so a's sign tells which way.
  if (__builtin_add_overflow(a, b, &sum)) return a < 0 ? -kMax : kMax;
  return sum < -kMax ? -kMax : sum;
}

}  // namespace internal

// `limits`' counter primitive (Storage.incr): adds `amount`, (re)starting
// the `period`-long window when the counter equals what was just added.
// Returns the new count.
inline int64_t IncrCounter(int64_t amount, int64_t period, int64_t now,
                           bool fresh, CounterState* state) {
  const int64_t count = internal::SatAdd(fresh ? 0 : state->value, amount);
  // `limits` (re)starts the window whenever the counter equals the amount
  // just added, which is the first hit of a window.
  if (count == amount || fresh) {
    state->expiry_nanos = internal::SatAdd(now, period);
  }
  state->value = count;
  return count;
}

// Each Apply* evaluates one request at `now`. With `charge` it updates the
// state when the request is admitted (and, for the fixed window, also when
// it is not). `fresh` tells that the state is new or expired and must be
// treated as empty. The returned Decision is complete.
//
// The fixed window is inline, with IncrCounter: it is the commonest
// decision and only a few dozen instructions, which a call and its
// register spills would make half as many again.
inline Decision ApplyFixedWindow(const Limit& limit, int64_t cost, int64_t now,
                                 bool charge, bool fresh, CounterState* state) {
  const int64_t period = limit.PeriodNanos();
  int64_t count = fresh ? 0 : state->value;
  int64_t expiry = fresh ? internal::SatAdd(now, period) : state->expiry_nanos;
  Decision d;
  d.limit = limit.amount;
  if (charge) {
    count = IncrCounter(cost, period, now, fresh, state);
    expiry = state->expiry_nanos;
    d.allowed = count <= limit.amount;
  } else {
    d.allowed = internal::SatAdd(count, cost) <= limit.amount;
  }
  d.remaining = std::max<int64_t>(0, limit.amount - count);
  d.reset_nanos = expiry;
  d.retry_after_nanos = d.allowed ? 0 : std::max<int64_t>(0, expiry - now);
  return d;
}

Decision ApplyTokenBucket(const Limit& limit, int64_t cost, int64_t now,
                          bool charge, bool fresh, CounterState* state);
Decision ApplySlidingWindow(const Limit& limit, int64_t cost, int64_t now,
                            bool charge, bool fresh, SlidingState* state);
Decision ApplyMovingWindow(const Limit& limit, int64_t cost, int64_t now,
                           bool charge, bool fresh, MovingState* state);

WindowState InspectFixedWindow(const Limit& limit, int64_t now, bool fresh,
                               const CounterState& state);
WindowState InspectTokenBucket(const Limit& limit, int64_t now, bool fresh,
                               const CounterState& state);
WindowState InspectSlidingWindow(const Limit& limit, int64_t now, bool fresh,
                                 const SlidingState& state);
WindowState InspectMovingWindow(const Limit& limit, int64_t now, bool fresh,
                                const MovingState& state);

// (reset time, remaining) as `limits`' get_window_stats reports them.
struct WindowStats {
  int64_t reset_nanos = 0;
  int64_t remaining = 0;
};
WindowStats StatsFromState(Strategy strategy, const Limit& limit,
                           const WindowState& state, int64_t now);

}  // namespace rapidlimit

#endif  // RAPIDLIMIT_ALGORITHMS_H_
