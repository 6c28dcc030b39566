#include "rapidlimit/algorithms.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace rapidlimit {
namespace {

using i128 = __int128;
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

int64_t Saturate(i128 v) {
  if (v > kInt64Max) return kInt64Max;
  if (v < -kInt64Max) return -kInt64Max;
  return static_cast<int64_t>(v);
}

using internal::SatAdd;

// Floor division for a non-negative numerator and positive denominator is
// plain division; time before the epoch still needs a true floor.
int64_t FloorDiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

int64_t FloorMod(int64_t a, int64_t b) { return a - FloorDiv(a, b) * b; }

}  // namespace

// ---------------------------------------------------------------- MovingLog

MovingLog::~MovingLog() { std::free(ring_); }

int64_t MovingLog::NewestAt(int64_t i) const {
  return ring_[(head_ + size_ - 1 - i) % cap_];
}

void MovingLog::Push(int64_t t, int64_t count, int64_t capacity) {
  if (count <= 0 || capacity <= 0) return;
  if (count >= capacity) {
    // Only the newest `capacity` entries matter, and they are all `t`.
    count = capacity;
    size_ = 0;
    head_ = 0;
  }
  const int64_t wanted = std::min(capacity, size_ + count);
  if (wanted > cap_) {
    // Grow geometrically towards `capacity`, unrolling the ring.
    int64_t new_cap = std::max<int64_t>(4, cap_ * 2);
    new_cap = std::min(capacity, std::max(new_cap, wanted));
    auto* fresh = static_cast<int64_t*>(
        std::malloc(static_cast<size_t>(new_cap) * sizeof(int64_t)));
    if (fresh == nullptr) std::abort();
    for (int64_t i = 0; i < size_; ++i) fresh[i] = ring_[(head_ + i) % cap_];
    std::free(ring_);
    ring_ = fresh;
    cap_ = new_cap;
    head_ = 0;
  }
  for (int64_t i = 0; i < count; ++i) {
    if (size_ == cap_) {
      // Overwrite the oldest.
      ring_[head_] = t;
      head_ = (head_ + 1) % cap_;
    } else {
      ring_[(head_ + size_) % cap_] = t;
      ++size_;
    }
  }
}

int64_t MovingLog::CountSince(int64_t since, int64_t* oldest) const {
  // Entries are ordered oldest to newest: binary search the first in range.
  int64_t lo = 0, hi = size_;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (ring_[(head_ + mid) % cap_] >= since) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  if (lo < size_ && oldest != nullptr) *oldest = ring_[(head_ + lo) % cap_];
  return size_ - lo;
}

// ------------------------------------------------------------- Fixed window
//
// IncrCounter and ApplyFixedWindow are inline in algorithms.h.

WindowState InspectFixedWindow(const Limit&, int64_t now, bool fresh,
                               const CounterState& state) {
  WindowState w;
  w.count = fresh ? 0 : state.value;
  w.time_nanos = fresh ? now : state.expiry_nanos;
  return w;
}

// ------------------------------------------------------------- Token bucket
//
// GCRA kept exact with rationals: the theoretical arrival time (TAT) is
// expiry_nanos + value / amount nanoseconds, value in [0, amount). Each
// token is worth period/amount ns, which is rarely a whole number; keeping
// the remainder means a burst of exactly `burst` hits always fits.

Decision ApplyTokenBucket(const Limit& limit, int64_t cost, int64_t now,
                          bool charge, bool fresh, CounterState* state) {
  Decision d;
  d.limit = limit.amount;
  const int64_t period = limit.PeriodNanos();
  if (limit.amount <= 0) {
    d.reset_nanos = SatAdd(now, period);
    d.retry_after_nanos = period;
    return d;
  }
  // All quantities below are ns * amount, so one token is `period` units.
  const i128 a = limit.amount;
  const i128 capacity = static_cast<i128>(limit.EffectiveBurst()) * period;
  i128 used = 0;  // TAT - now, clamped at 0: an idle bucket is full
  if (!fresh) {
    used = (static_cast<i128>(state->expiry_nanos) - now) * a + state->value;
    if (used < 0) used = 0;
  }
  // A clock behind the one that charged the bucket can find `used` above
  // the capacity. The bucket is then empty, no emptier: a cost of 0 takes
  // nothing and is always allowed, a positive cost is rejected (as GCRA
  // rejects it), `remaining` is 0, and the reset and the retry-after stay
  // true to the TAT as stored, from the caller's `now`. Only an admitted
  // positive cost moves the TAT (a cost of 0 would at most restate it, or
  // pull a TAT from the past up to `now`, which a later clock that is
  // behind would take for a charge).
  const i128 after = used + static_cast<i128>(cost) * period;
  d.allowed = cost == 0 || after <= capacity;
  i128 level = used;
  if (d.allowed && charge && cost > 0) {
    level = after;
    const i128 tat_scaled = static_cast<i128>(now) * a + after;
    state->expiry_nanos = Saturate(tat_scaled / a);
    state->value = static_cast<int64_t>(tat_scaled % a);
  }
  d.remaining = level >= capacity ? 0 : Saturate((capacity - level) / period);
  d.reset_nanos = SatAdd(now, Saturate((level + a - 1) / a));
  if (!d.allowed) {
    // A cost above the burst can never fit; one period is the honest wait.
    d.retry_after_nanos = after - used > capacity
                              ? period
                              : Saturate((after - capacity + a - 1) / a);
  }
  return d;
}

WindowState InspectTokenBucket(const Limit& limit, int64_t now, bool fresh,
                               const CounterState& state) {
  WindowState w;
  w.time_nanos = now;
  if (fresh || limit.amount <= 0) return w;
  const i128 a = limit.amount;
  i128 used = (static_cast<i128>(state.expiry_nanos) - now) * a + state.value;
  if (used <= 0) return w;
  const i128 p = limit.PeriodNanos();
  // At most the burst: a clock behind the one that charged can see more.
  w.count = std::min(Saturate((used + p - 1) / p), limit.EffectiveBurst());
  w.time_nanos = SatAdd(now, Saturate((used + a - 1) / a));
  return w;
}

// --------------------------------------------------- Sliding window counter

namespace {

// Brings the state to the window containing `now` without storing it.
SlidingState Roll(const SlidingState& s, bool fresh, int64_t window) {
  SlidingState r = s;
  if (fresh || s.window > window || s.window < window - 1) {
    r.current = 0;
    r.previous = 0;
  } else if (s.window == window - 1) {
    r.previous = s.current;
    r.current = 0;
  }
  r.window = window;
  return r;
}

// floor(previous * ttl / period): the weighted share of the previous window.
int64_t WeightedPrevious(const SlidingState& s, int64_t ttl, int64_t period) {
  return Saturate(static_cast<i128>(s.previous) * ttl / period);
}

// `limits`' reset: the earliest of the previous window's weight dropping by
// one hit and the current window ending.
int64_t SlidingReset(const SlidingState& s, int64_t now, int64_t period) {
  if (s.previous == 0 && s.current == 0) return now;
  const int64_t into = FloorMod(now, period);
  i128 best = std::numeric_limits<int64_t>::max();
  if (s.previous > 0) {
    // previous_ttl % (period / previous), in exact rationals.
    const i128 ttl = period - into;
    const i128 scaled = (ttl * s.previous) % period;  // ns * previous
    best = scaled / s.previous;
  }
  if (s.current > 0) best = std::min<i128>(best, (2 * period - into) % period);
  return SatAdd(now, static_cast<int64_t>(best));
}

// A clock behind the newest window a key has counts in (another instance
// ahead, or a step back of the clock) counts in that window, as if at its
// start: nothing counted is lost, and the previous window weighs fully.
int64_t EffectiveNow(const SlidingState& s, bool fresh, int64_t now,
                     int64_t period) {
  if (fresh || FloorDiv(now, period) >= s.window) return now;
  return Saturate(static_cast<i128>(s.window) * period);
}

}  // namespace

Decision ApplySlidingWindow(const Limit& limit, int64_t cost, int64_t real_now,
                            bool charge, bool fresh, SlidingState* state) {
  const int64_t period = limit.PeriodNanos();
  const int64_t now = EffectiveNow(*state, fresh, real_now, period);
  const int64_t behind = now - real_now;  // > 0 for a clock behind
  const int64_t window = FloorDiv(now, period);
  SlidingState s = Roll(*state, fresh, window);
  const int64_t into = FloorMod(now, period);
  const int64_t prev_ttl = s.previous == 0 ? 0 : period - into;
  const int64_t weighted =
      SatAdd(WeightedPrevious(s, prev_ttl, period), s.current);
  Decision d;
  d.limit = limit.amount;
  d.allowed = cost <= limit.amount && SatAdd(weighted, cost) <= limit.amount;
  int64_t used = weighted;
  if (d.allowed && charge) {
    s.current = SatAdd(s.current, cost);
    used = SatAdd(weighted, cost);
  }
  if (charge) {
    // Both counters are zero once the window after next begins.
    s.expiry_nanos = Saturate(static_cast<i128>(window + 2) * period);
    *state = s;
  }
  d.remaining = std::max<int64_t>(0, limit.amount - used);
  d.reset_nanos = SlidingReset(s, now, period);
  if (!d.allowed) {
    if (cost > limit.amount) {
      d.retry_after_nanos = period;
    } else {
      // Weight may drop within this window: floor(prev * ttl / P) must fall
      // to `room`, i.e. ttl < (room + 1) * P / prev.
      const int64_t room = limit.amount - s.current - cost;
      if (room >= 0 && s.previous > 0) {
        const i128 target =
            (static_cast<i128>(room + 1) * period + s.previous - 1) /
                s.previous -
            1;  // largest ttl that fits
        d.retry_after_nanos =
            Saturate(std::max<i128>(1, static_cast<i128>(prev_ttl) - target));
      } else {
        // Wait into the next window, where today's count becomes the
        // previous one: need floor(cur * ttl' / P) <= amount - cost.
        const int64_t to_next = period - into;
        const int64_t room_next = limit.amount - cost;
        i128 ttl_fit = period;
        if (s.current > 0) {
          ttl_fit =
              (static_cast<i128>(room_next + 1) * period + s.current - 1) /
                  s.current -
              1;
          ttl_fit = std::min<i128>(ttl_fit, period);
        }
        d.retry_after_nanos = Saturate(to_next + (period - ttl_fit));
      }
    }
    // A duration from the caller's clock.
    d.retry_after_nanos = SatAdd(d.retry_after_nanos, behind);
  }
  return d;
}

WindowState InspectSlidingWindow(const Limit& limit, int64_t real_now,
                                 bool fresh, const SlidingState& state) {
  const int64_t period = limit.PeriodNanos();
  // As ApplySlidingWindow: a clock behind counts at the newest window's
  // start. previous_ttl is the weight's (full there), current_ttl a
  // duration from the caller's clock.
  const int64_t now = EffectiveNow(state, fresh, real_now, period);
  const SlidingState s = Roll(state, fresh, FloorDiv(now, period));
  const int64_t into = FloorMod(now, period);
  WindowState w;
  w.count = s.current;
  w.previous_count = s.previous;
  w.previous_ttl_nanos = s.previous == 0 ? 0 : period - into;
  w.current_ttl_nanos = SatAdd(2 * period - into, now - real_now);
  w.time_nanos = SlidingReset(s, now, period);
  return w;
}

// ------------------------------------------------------------ Moving window

Decision ApplyMovingWindow(const Limit& limit, int64_t cost, int64_t now,
                           bool charge, bool fresh, MovingState* state) {
  const int64_t period = limit.PeriodNanos();
  const int64_t since = now - period;
  if (fresh && charge && state->log != nullptr) state->log->Clear();
  MovingLog* log = fresh ? nullptr : state->log;
  Decision d;
  d.limit = limit.amount;
  d.allowed = cost <= limit.amount;
  int64_t blocker = 0;
  if (d.allowed && log != nullptr && limit.amount - cost < log->size()) {
    // `limits` rejects while the (amount - cost)-th newest entry is inside
    // the window, its boundary included.
    blocker = log->NewestAt(limit.amount - cost);
    d.allowed = blocker < since;
  }
  if (d.allowed && charge && cost > 0) {
    if (state->log == nullptr) state->log = new MovingLog();
    log = state->log;
    // A clock behind the newest entry (an instance behind the others, or a
    // step back) records at that entry's time: the log stays in order and
    // its expiry never moves back, so no entry is dropped early.
    const int64_t t = log->size() > 0 ? std::max(now, log->NewestAt(0)) : now;
    log->Push(t, cost, limit.amount);
    // Void once the newest entry has left the window.
    state->expiry_nanos = SatAdd(t, period + 1);
  }
  // Stats count strictly inside the window, as `limits` does.
  int64_t oldest = now;
  const int64_t in_window =
      log == nullptr ? 0 : log->CountSince(since + 1, &oldest);
  d.remaining = std::max<int64_t>(0, limit.amount - in_window);
  d.reset_nanos = SatAdd(oldest, period);
  if (!d.allowed) {
    d.retry_after_nanos =
        cost > limit.amount ? period
                            : std::max<int64_t>(1, blocker + period + 1 - now);
  }
  return d;
}

WindowState InspectMovingWindow(const Limit& limit, int64_t now, bool fresh,
                                const MovingState& state) {
  WindowState w;
  w.time_nanos = now;
  if (fresh || state.log == nullptr) return w;
  int64_t oldest = now;
  w.count = state.log->CountSince(now - limit.PeriodNanos() + 1, &oldest);
  w.time_nanos = oldest;
  return w;
}

// -------------------------------------------------------------------- Stats

WindowStats StatsFromState(Strategy strategy, const Limit& limit,
                           const WindowState& state, int64_t now) {
  WindowStats stats;
  switch (strategy) {
    case Strategy::kFixedWindow:
      stats.remaining = std::max<int64_t>(0, limit.amount - state.count);
      stats.reset_nanos = state.time_nanos;
      break;
    case Strategy::kMovingWindow:
      stats.remaining = limit.amount - state.count;
      stats.reset_nanos = SatAdd(state.time_nanos, limit.PeriodNanos());
      break;
    case Strategy::kSlidingWindowCounter: {
      const int64_t weighted =
          Saturate(static_cast<i128>(state.previous_count) *
                       state.previous_ttl_nanos / limit.PeriodNanos() +
                   state.count);
      stats.remaining = std::max<int64_t>(0, limit.amount - weighted);
      stats.reset_nanos = state.time_nanos;
      break;
    }
    case Strategy::kTokenBucket:
      stats.remaining =
          std::max<int64_t>(0, limit.EffectiveBurst() - state.count);
      stats.reset_nanos = state.time_nanos;
      break;
  }
  (void)now;
  return stats;
}

}  // namespace rapidlimit
