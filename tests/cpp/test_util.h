// Helpers shared by the algorithm and store tests: limits, time constants,
// and per-key "cells" that drive the pure Apply*/Inspect* functions the way
// the memory store does (a state is fresh when absent or expired).
#ifndef RAPIDLIMIT_TESTS_CPP_TEST_UTIL_H_
#define RAPIDLIMIT_TESTS_CPP_TEST_UTIL_H_

#include <cstdint>

#include "rapidlimit/algorithms.h"
#include "rapidlimit/clock.h"
#include "rapidlimit/limit.h"
#include "rapidlimit/store.h"

namespace rapidlimit::test_util {

constexpr int64_t kSec = kNanosPerSecond;
constexpr int64_t kMs = 1'000'000;
// An arbitrary, realistic epoch time (2023-11-14T22:13:20Z) on a whole
// second, so that epoch-aligned windows are easy to reason about.
constexpr int64_t kT0 = 1'700'000'000 * kSec;

inline Limit MakeLimit(int64_t amount, int64_t multiples = 1,
                       Granularity g = Granularity::kSecond,
                       int64_t burst = 0) {
  Limit l;
  l.amount = amount;
  l.multiples = multiples;
  l.granularity = g;
  l.burst = burst;
  return l;
}

// Fixed window or token bucket state for one key, as the store keeps it.
struct CounterCell {
  CounterState state;
  bool exists = false;

  bool Fresh(int64_t now) const { return !exists || state.expiry_nanos <= now; }
  Decision Fixed(const Limit& l, int64_t cost, int64_t now, bool charge) {
    const Decision d =
        ApplyFixedWindow(l, cost, now, charge, Fresh(now), &state);
    exists = exists || charge;
    return d;
  }
  Decision Bucket(const Limit& l, int64_t cost, int64_t now, bool charge) {
    const Decision d =
        ApplyTokenBucket(l, cost, now, charge, Fresh(now), &state);
    exists = exists || (charge && d.allowed);
    return d;
  }
};

struct SlidingCell {
  SlidingState state;
  bool exists = false;

  bool Fresh(int64_t now) const { return !exists || state.expiry_nanos <= now; }
  Decision Apply(const Limit& l, int64_t cost, int64_t now, bool charge) {
    const Decision d =
        ApplySlidingWindow(l, cost, now, charge, Fresh(now), &state);
    exists = exists || charge;
    return d;
  }
  WindowState Inspect(const Limit& l, int64_t now) const {
    return InspectSlidingWindow(l, now, Fresh(now), state);
  }
};

// Owns the moving-window log like the store's slot does.
struct MovingCell {
  MovingState state;

  MovingCell() = default;
  MovingCell(const MovingCell&) = delete;
  MovingCell& operator=(const MovingCell&) = delete;
  ~MovingCell() { delete state.log; }

  bool Fresh(int64_t now) const {
    return state.log == nullptr || state.expiry_nanos <= now;
  }
  Decision Apply(const Limit& l, int64_t cost, int64_t now, bool charge) {
    return ApplyMovingWindow(l, cost, now, charge, Fresh(now), &state);
  }
  WindowState Inspect(const Limit& l, int64_t now) const {
    return InspectMovingWindow(l, now, Fresh(now), state);
  }
};

}  // namespace rapidlimit::test_util

#endif  // RAPIDLIMIT_TESTS_CPP_TEST_UTIL_H_
