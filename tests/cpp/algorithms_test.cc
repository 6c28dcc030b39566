// The rate-limit algorithms as pure state transitions, checked against the
// behaviour of the `limits` package (fixed window, moving window, sliding
// window counter) and against exact GCRA arithmetic (token bucket). Time is
// always passed in; nothing here sleeps.
#include "rapidlimit/algorithms.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "test_util.h"

namespace rapidlimit {
namespace {

using test_util::CounterCell;
using test_util::kMs;
using test_util::kSec;
using test_util::kT0;
using test_util::MakeLimit;
using test_util::MovingCell;
using test_util::SlidingCell;

// Start of the epoch-aligned window of length `period` containing `t`.
int64_t WindowStart(int64_t t, int64_t period) { return t - t % period; }

// ------------------------------------------------------------- Fixed window

TEST(FixedWindowTest, FirstHitOpensTheWindowAndLaterHitsDoNotMoveIt) {
  const Limit l = MakeLimit(3, 10);
  CounterCell c;
  const int64_t t = kT0 + 1500 * kMs;  // not aligned: windows start at hits
  Decision d = c.Fixed(l, 1, t, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.limit, 3);
  EXPECT_EQ(d.remaining, 2);
  EXPECT_EQ(d.reset_nanos, t + 10 * kSec);
  EXPECT_EQ(d.retry_after_nanos, 0);
  EXPECT_EQ(c.state.value, 1);
  EXPECT_EQ(c.state.expiry_nanos, t + 10 * kSec);

  d = c.Fixed(l, 1, t + 4 * kSec, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 1);
  EXPECT_EQ(d.reset_nanos, t + 10 * kSec);

  d = c.Fixed(l, 1, t + 10 * kSec - 1, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.reset_nanos, t + 10 * kSec);

  d = c.Fixed(l, 1, t + 10 * kSec - 1, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.retry_after_nanos, 1);
}

TEST(FixedWindowTest, WindowEndsExactlyAtExpiry) {
  const Limit l = MakeLimit(1, 1);
  CounterCell c;
  ASSERT_TRUE(c.Fixed(l, 1, kT0, true).allowed);
  EXPECT_FALSE(c.Fresh(kT0 + kSec - 1));
  EXPECT_FALSE(c.Fixed(l, 1, kT0 + kSec - 1, true).allowed);
  // limits' MemoryStorage.get drops a counter when expiry <= time.time().
  EXPECT_TRUE(c.Fresh(kT0 + kSec));
  const Decision d = c.Fixed(l, 1, kT0 + kSec, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.reset_nanos, kT0 + 2 * kSec);
  EXPECT_EQ(c.state.value, 1);
}

TEST(FixedWindowTest, RejectedHitsStillCount) {
  const Limit l = MakeLimit(3, 1, Granularity::kMinute);
  CounterCell c;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(c.Fixed(l, 1, kT0 + i, true).allowed);
  for (int i = 0; i < 2; ++i) {
    const Decision d = c.Fixed(l, 1, kT0 + 10 * kSec, true);
    EXPECT_FALSE(d.allowed);
    EXPECT_EQ(d.remaining, 0);
    EXPECT_EQ(d.reset_nanos, kT0 + 60 * kSec);
    EXPECT_EQ(d.retry_after_nanos, 50 * kSec);
  }
  EXPECT_EQ(c.state.value, 5);  // limits' incr counts every hit
  const WindowState w = InspectFixedWindow(l, kT0 + 20 * kSec, false, c.state);
  EXPECT_EQ(w.count, 5);
  EXPECT_EQ(w.time_nanos, kT0 + 60 * kSec);
  const WindowStats s = StatsFromState(Strategy::kFixedWindow, l, w, 0);
  EXPECT_EQ(s.remaining, 0);  // never negative
  EXPECT_EQ(s.reset_nanos, kT0 + 60 * kSec);
}

TEST(FixedWindowTest, TestConsumesNothing) {
  const Limit l = MakeLimit(2, 1);
  CounterCell c;
  Decision d = c.Fixed(l, 1, kT0, false);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 2);
  EXPECT_EQ(d.reset_nanos, kT0 + kSec);  // the window a hit would open
  EXPECT_FALSE(c.exists);
  EXPECT_EQ(c.state.value, 0);
  EXPECT_EQ(c.state.expiry_nanos, 0);

  ASSERT_TRUE(c.Fixed(l, 1, kT0, true).allowed);
  const CounterState before = c.state;
  d = c.Fixed(l, 1, kT0 + 1, false);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 1);
  EXPECT_FALSE(c.Fixed(l, 2, kT0 + 1, false).allowed);  // 1 + 2 > 2
  EXPECT_EQ(c.state.value, before.value);
  EXPECT_EQ(c.state.expiry_nanos, before.expiry_nanos);
}

TEST(FixedWindowTest, CostsAreWeights) {
  const Limit l = MakeLimit(5, 1);
  CounterCell c;
  EXPECT_EQ(c.Fixed(l, 2, kT0, true).remaining, 3);
  EXPECT_EQ(c.Fixed(l, 2, kT0, true).remaining, 1);
  EXPECT_TRUE(c.Fixed(l, 1, kT0, false).allowed);
  EXPECT_FALSE(c.Fixed(l, 2, kT0, false).allowed);
  const Decision d = c.Fixed(l, 2, kT0, true);
  EXPECT_FALSE(d.allowed);  // 6 > 5, and the 2 still count
  EXPECT_EQ(c.state.value, 6);
  EXPECT_FALSE(c.Fixed(l, 1, kT0, true).allowed);
}

TEST(FixedWindowTest, CostAboveAmountIsRejectedButOpensTheWindow) {
  const Limit l = MakeLimit(3, 1);
  CounterCell c;
  const Decision d = c.Fixed(l, 4, kT0, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.reset_nanos, kT0 + kSec);
  EXPECT_EQ(d.retry_after_nanos, kSec);
  EXPECT_EQ(c.state.value, 4);
}

TEST(FixedWindowTest, CostZeroIsAlwaysAllowedAndChargesNothing) {
  const Limit l = MakeLimit(1, 1);
  CounterCell c;
  ASSERT_TRUE(c.Fixed(l, 1, kT0, true).allowed);
  const Decision d = c.Fixed(l, 0, kT0 + 1, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(c.state.value, 1);
  EXPECT_EQ(c.state.expiry_nanos, kT0 + kSec);
}

TEST(IncrCounterTest, MatchesLimitsIncr) {
  CounterState s;
  const int64_t p = 30 * kSec;
  // A fresh counter starts its window.
  EXPECT_EQ(IncrCounter(2, p, kT0, true, &s), 2);
  EXPECT_EQ(s.expiry_nanos, kT0 + p);
  // Later increments keep the expiry.
  EXPECT_EQ(IncrCounter(3, p, kT0 + kSec, false, &s), 5);
  EXPECT_EQ(s.expiry_nanos, kT0 + p);
  // Fresh again: the old value is forgotten.
  EXPECT_EQ(IncrCounter(1, p, kT0 + p, true, &s), 1);
  EXPECT_EQ(s.expiry_nanos, kT0 + 2 * p);
  // limits restarts the expiry whenever the new count equals the amount
  // just added, i.e. when the counter held 0 (after a zero-cost incr).
  CounterState z;
  EXPECT_EQ(IncrCounter(0, p, kT0, true, &z), 0);
  EXPECT_EQ(z.expiry_nanos, kT0 + p);
  EXPECT_EQ(IncrCounter(1, p, kT0 + 5 * kSec, false, &z), 1);
  EXPECT_EQ(z.expiry_nanos, kT0 + 5 * kSec + p);
}

// ------------------------------------------------------------ Moving window

TEST(SatAddTest, ClampsToPlusOrMinusInt64Max) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
  EXPECT_EQ(internal::SatAdd(2, 3), 5);
  EXPECT_EQ(internal::SatAdd(-2, 3), 1);
  EXPECT_EQ(internal::SatAdd(kMax - 1, 1), kMax);
  EXPECT_EQ(internal::SatAdd(kMax, 1), kMax);
  EXPECT_EQ(internal::SatAdd(kMax, kMax), kMax);
  EXPECT_EQ(internal::SatAdd(1, kMax), kMax);
  EXPECT_EQ(internal::SatAdd(kMax, kMin), -1);
  // The lower bound is -INT64_MAX, not INT64_MIN: negation stays exact.
  EXPECT_EQ(internal::SatAdd(-kMax, 0), -kMax);
  EXPECT_EQ(internal::SatAdd(-kMax, -1), -kMax);
  EXPECT_EQ(internal::SatAdd(kMin, 0), -kMax);
  EXPECT_EQ(internal::SatAdd(kMin, 1), -kMax);
  EXPECT_EQ(internal::SatAdd(kMin, 2), kMin + 2);
  EXPECT_EQ(internal::SatAdd(kMin, kMin), -kMax);
  EXPECT_EQ(internal::SatAdd(-1, kMin), -kMax);
}

TEST(MovingWindowTest, AdmitsAmountThenRejectsWithoutTrace) {
  const Limit l = MakeLimit(3, 10);
  MovingCell c;
  for (int i = 0; i < 3; ++i) {
    const Decision d = c.Apply(l, 1, kT0 + i * kSec, true);
    ASSERT_TRUE(d.allowed) << i;
    EXPECT_EQ(d.remaining, 2 - i);
    EXPECT_EQ(d.reset_nanos, kT0 + 10 * kSec);  // oldest + period
    EXPECT_EQ(d.retry_after_nanos, 0);
  }
  const int64_t expiry = c.state.expiry_nanos;
  EXPECT_EQ(expiry, kT0 + 2 * kSec + 10 * kSec + 1);
  for (int i = 0; i < 3; ++i) {
    const Decision d = c.Apply(l, 1, kT0 + 3 * kSec, true);
    EXPECT_FALSE(d.allowed);
    EXPECT_EQ(d.remaining, 0);
    EXPECT_EQ(d.reset_nanos, kT0 + 10 * kSec);
    // The oldest entry leaves the window one ns after now - period.
    EXPECT_EQ(d.retry_after_nanos, 7 * kSec + 1);
  }
  ASSERT_NE(c.state.log, nullptr);
  EXPECT_EQ(c.state.log->size(), 3);
  EXPECT_EQ(c.state.log->NewestAt(0), kT0 + 2 * kSec);
  EXPECT_EQ(c.state.expiry_nanos, expiry);
  EXPECT_TRUE(c.Apply(l, 1, kT0 + 10 * kSec + 1, true).allowed);
}

// limits' acquire_entry rejects while the blocking entry's time is
// >= now - expiry (boundary inside); get_moving_window counts entries
// strictly newer than now - expiry.
TEST(MovingWindowTest, BoundaryQuirksMatchLimits) {
  const Limit l = MakeLimit(1, 1);
  MovingCell c;
  ASSERT_TRUE(c.Apply(l, 1, kT0, true).allowed);
  const int64_t edge = kT0 + kSec;  // entry == now - expiry
  Decision d = c.Apply(l, 1, edge, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after_nanos, 1);
  // ... yet the stats no longer count it.
  EXPECT_EQ(d.remaining, 1);
  EXPECT_EQ(d.reset_nanos, edge + kSec);
  const WindowState w = c.Inspect(l, edge);
  EXPECT_EQ(w.count, 0);
  EXPECT_EQ(w.time_nanos, edge);
  // test() agrees with hit() at the boundary. (limits' test() uses the
  // strict count and would say True here; rapidlimit and its Redis script
  // answer what a hit would.)
  EXPECT_FALSE(c.Apply(l, 1, edge, false).allowed);
  d = c.Apply(l, 1, edge + 1, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.reset_nanos, edge + 1 + kSec);
}

TEST(MovingWindowTest, StatsCountOnlyEntriesStrictlyInsideTheWindow) {
  const Limit l = MakeLimit(3, 10);
  MovingCell c;
  for (int64_t t : {kT0, kT0 + 2 * kSec, kT0 + 4 * kSec}) {
    ASSERT_TRUE(c.Apply(l, 1, t, true).allowed);
  }
  WindowState w = c.Inspect(l, kT0 + 5 * kSec);
  EXPECT_EQ(w.count, 3);
  EXPECT_EQ(w.time_nanos, kT0);
  WindowStats s = StatsFromState(Strategy::kMovingWindow, l, w, kT0 + 5 * kSec);
  EXPECT_EQ(s.remaining, 0);
  EXPECT_EQ(s.reset_nanos, kT0 + 10 * kSec);
  w = c.Inspect(l, kT0 + 10 * kSec);
  EXPECT_EQ(w.count, 2);
  EXPECT_EQ(w.time_nanos, kT0 + 2 * kSec);
  s = StatsFromState(Strategy::kMovingWindow, l, w, kT0 + 10 * kSec);
  EXPECT_EQ(s.remaining, 1);
  EXPECT_EQ(s.reset_nanos, kT0 + 12 * kSec);
  // The stats say one left, but the entry at exactly now - expiry blocks.
  EXPECT_FALSE(c.Apply(l, 1, kT0 + 10 * kSec, true).allowed);
  EXPECT_TRUE(c.Apply(l, 1, kT0 + 10 * kSec + 1, true).allowed);
}

TEST(MovingWindowTest, CostsTakeSeveralEntries) {
  const Limit l = MakeLimit(5, 10);
  MovingCell c;
  Decision d = c.Apply(l, 3, kT0, true);
  ASSERT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 2);
  EXPECT_EQ(c.state.log->size(), 3);
  d = c.Apply(l, 3, kT0 + kSec, true);
  EXPECT_FALSE(d.allowed);
  // The 3rd newest entry (at kT0) must leave the window.
  EXPECT_EQ(d.retry_after_nanos, 9 * kSec + 1);
  EXPECT_EQ(c.state.log->size(), 3);
  EXPECT_TRUE(c.Apply(l, 2, kT0 + kSec, false).allowed);
  d = c.Apply(l, 2, kT0 + kSec, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.reset_nanos, kT0 + 10 * kSec);
  // Newest first the log is now 1s, 1s, 0, 0, 0 (after kT0). A cost of 2
  // needs the entry at index 5 - 2 = 3 (kT0) to leave the window...
  d = c.Apply(l, 2, kT0 + 2 * kSec, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after_nanos, 8 * kSec + 1);
  // ... a cost of 4 the one at index 1 (kT0 + 1s).
  d = c.Apply(l, 4, kT0 + 2 * kSec, true);
  EXPECT_EQ(d.retry_after_nanos, 9 * kSec + 1);
}

TEST(MovingWindowTest, CostAboveAmountAndAmountZero) {
  MovingCell c;
  Decision d = c.Apply(MakeLimit(3, 10), 4, kT0, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 3);
  EXPECT_EQ(d.retry_after_nanos, 10 * kSec);
  EXPECT_EQ(c.state.log, nullptr);  // nothing recorded
  d = c.Apply(MakeLimit(0, 1), 1, kT0, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(c.state.log, nullptr);
}

TEST(MovingWindowTest, CostZeroIsAllowedAndRecordsNothing) {
  const Limit l = MakeLimit(1, 1);
  MovingCell c;
  EXPECT_TRUE(c.Apply(l, 0, kT0, true).allowed);
  EXPECT_EQ(c.state.log, nullptr);
  ASSERT_TRUE(c.Apply(l, 1, kT0, true).allowed);
  EXPECT_TRUE(c.Apply(l, 0, kT0 + 1, true).allowed);
  EXPECT_EQ(c.state.log->size(), 1);
}

TEST(MovingWindowTest, ExpiredLogIsReusedEmpty) {
  const Limit l = MakeLimit(2, 1);
  MovingCell c;
  ASSERT_TRUE(c.Apply(l, 2, kT0, true).allowed);
  MovingLog* log = c.state.log;
  const int64_t later = kT0 + kSec + 1;
  ASSERT_TRUE(c.Fresh(later));
  // A test on an expired log sees an empty window and changes nothing.
  const Decision t = c.Apply(l, 2, later, false);
  EXPECT_TRUE(t.allowed);
  EXPECT_EQ(t.remaining, 2);
  EXPECT_EQ(log->size(), 2);
  ASSERT_TRUE(c.Apply(l, 1, later, true).allowed);
  EXPECT_EQ(c.state.log, log);  // no reallocation
  EXPECT_EQ(log->size(), 1);
  EXPECT_EQ(log->NewestAt(0), later);
  EXPECT_EQ(c.state.expiry_nanos, later + kSec + 1);
}

TEST(MovingWindowTest, LogMemoryIsBoundedByTheLimit) {
  const Limit l = MakeLimit(4, 1);
  MovingCell c;
  int64_t admitted = 0;
  for (int i = 0; i < 1000; ++i) {
    admitted += c.Apply(l, 1 + i % 3, kT0 + i * 100 * kMs, true).allowed;
    ASSERT_LE(c.state.log->size(), 4);
    ASSERT_LE(c.state.log->HeapBytes(), 4u * 8);
  }
  EXPECT_GT(admitted, 100);
  const Limit big = MakeLimit(1000, 1, Granularity::kHour);
  MovingCell b;
  for (int i = 0; i < 5000; ++i) b.Apply(big, 1, kT0 + i, true);
  EXPECT_EQ(b.state.log->size(), 1000);
  EXPECT_LE(b.state.log->HeapBytes(), 1000u * 8);
  // A huge limit does not preallocate.
  const Limit huge = MakeLimit(kMaxAmount, 1, Granularity::kYear);
  MovingCell h;
  ASSERT_TRUE(h.Apply(huge, 1, kT0, true).allowed);
  EXPECT_LE(h.state.log->HeapBytes(), 64u);
}

// Every admission the log makes must equal a brute-force moving window
// that keeps all admitted entries (limits' unbounded list).
TEST(MovingWindowTest, MatchesAnUnboundedLogOnRandomTraffic) {
  std::mt19937_64 rng(1234);
  for (const Limit& l : {MakeLimit(1, 1), MakeLimit(3, 2), MakeLimit(7, 5)}) {
    MovingCell c;
    std::vector<int64_t> all;  // newest first, like limits' events list
    const int64_t period = l.PeriodNanos();
    int64_t now = kT0;
    for (int i = 0; i < 3000; ++i) {
      // Times on a coarse grid hit the boundaries exactly and often.
      now += static_cast<int64_t>(rng() % 5) * (period / 4);
      const int64_t cost = static_cast<int64_t>(rng() % 4);
      const bool charge = rng() % 4 != 0;
      bool expect = cost <= l.amount;
      const size_t idx = static_cast<size_t>(l.amount - cost);
      if (expect && idx < all.size()) expect = all[idx] < now - period;
      const Decision d = c.Apply(l, cost, now, charge);
      ASSERT_EQ(d.allowed, expect) << "step " << i;
      if (d.allowed && charge) all.insert(all.begin(), cost, now);
      int64_t strict = 0;
      for (int64_t t : all) strict += t > now - period;
      EXPECT_EQ(d.remaining, std::max<int64_t>(0, l.amount - strict));
      EXPECT_EQ(c.Inspect(l, now).count, strict);
    }
  }
}

// ---------------------------------------------------------------- MovingLog

TEST(MovingWindowTest, ClockBehindRecordsAtTheNewestEntry) {
  const Limit l = MakeLimit(2, 10);
  MovingCell c;
  // An instance 300 ms ahead, then one behind it.
  ASSERT_TRUE(c.Apply(l, 1, kT0 + 300 * kMs, true).allowed);
  Decision d = c.Apply(l, 1, kT0, true);
  ASSERT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.reset_nanos, kT0 + 300 * kMs + 10 * kSec);
  // The log stays in order and its expiry does not move back.
  EXPECT_EQ(c.state.expiry_nanos, kT0 + 300 * kMs + 10 * kSec + 1);
  const WindowState w = c.Inspect(l, kT0);
  EXPECT_EQ(w.count, 2);
  EXPECT_EQ(w.time_nanos, kT0 + 300 * kMs);
  // Both hits stay in the window until the later one leaves it: the log
  // was not taken for void at kT0 + 10 s + 1.
  d = c.Apply(l, 1, kT0 + 10 * kSec + 100 * kMs, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after_nanos, 200 * kMs + 1);
  EXPECT_TRUE(c.Apply(l, 2, kT0 + 10 * kSec + 300 * kMs + 1, false).allowed);
}

TEST(MovingLogTest, RingKeepsTheNewestEntries) {
  MovingLog log;
  EXPECT_EQ(log.size(), 0);
  EXPECT_EQ(log.HeapBytes(), 0u);
  for (int64_t t = 1; t <= 7; ++t) log.Push(t, 1, 5);
  ASSERT_EQ(log.size(), 5);
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(log.NewestAt(i), 7 - i);
  EXPECT_EQ(log.HeapBytes(), 5u * 8);
  log.Push(8, 2, 5);
  EXPECT_EQ(log.NewestAt(0), 8);
  EXPECT_EQ(log.NewestAt(1), 8);
  EXPECT_EQ(log.NewestAt(2), 7);
  EXPECT_EQ(log.NewestAt(4), 5);
}

TEST(MovingLogTest, PushAtLeastCapacityReplacesEverything) {
  MovingLog log;
  log.Push(1, 2, 4);
  log.Push(9, 10, 4);
  ASSERT_EQ(log.size(), 4);
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(log.NewestAt(i), 9);
  log.Push(10, 0, 4);  // no-op
  log.Push(10, 1, 0);  // no-op
  EXPECT_EQ(log.NewestAt(0), 9);
  log.Clear();
  EXPECT_EQ(log.size(), 0);
  int64_t oldest = -1;
  EXPECT_EQ(log.CountSince(0, &oldest), 0);
  EXPECT_EQ(oldest, -1);  // untouched when nothing is in range
}

TEST(MovingLogTest, GrowsGeometricallyUpToCapacity) {
  MovingLog log;
  log.Push(1, 1, 1000);
  EXPECT_EQ(log.HeapBytes(), 4u * 8);
  for (int i = 0; i < 4; ++i) log.Push(2, 1, 1000);
  EXPECT_EQ(log.HeapBytes(), 8u * 8);
  log.Push(3, 995, 1000);
  EXPECT_EQ(log.size(), 1000);
  EXPECT_EQ(log.HeapBytes(), 1000u * 8);
  EXPECT_EQ(log.NewestAt(999), 1);
  log.Push(4, 1, 1000);
  EXPECT_EQ(log.HeapBytes(), 1000u * 8);
  EXPECT_EQ(log.NewestAt(999), 2);  // the oldest (1) was dropped
}

TEST(MovingLogTest, CountSinceMatchesBruteForceAcrossWrapAround) {
  std::mt19937_64 rng(99);
  for (int64_t cap : {1, 2, 3, 5, 8, 13, 64}) {
    MovingLog log;
    std::vector<int64_t> newest_first;
    int64_t t = 100;
    for (int step = 0; step < 400; ++step) {
      t += static_cast<int64_t>(rng() % 3);
      const int64_t count = 1 + static_cast<int64_t>(rng() % 3);
      log.Push(t, count, cap);
      newest_first.insert(newest_first.begin(), count, t);
      if (static_cast<int64_t>(newest_first.size()) > cap) {
        newest_first.resize(static_cast<size_t>(cap));
      }
      ASSERT_EQ(log.size(), static_cast<int64_t>(newest_first.size()));
      for (size_t i = 0; i < newest_first.size(); ++i) {
        ASSERT_EQ(log.NewestAt(static_cast<int64_t>(i)), newest_first[i]);
      }
      for (int64_t since = t - 6; since <= t + 1; ++since) {
        int64_t expect = 0;
        int64_t expect_oldest = -7;
        for (int64_t e : newest_first) {
          if (e >= since) {
            ++expect;
            expect_oldest = e;
          }
        }
        int64_t oldest = -7;
        ASSERT_EQ(log.CountSince(since, &oldest), expect);
        ASSERT_EQ(oldest, expect_oldest);
      }
    }
  }
}

// --------------------------------------------------- Sliding window counter

TEST(SlidingWindowTest, WindowsAreEpochAlignedAndThePreviousOneIsWeighted) {
  const Limit l = MakeLimit(10, 10);
  const int64_t p = l.PeriodNanos();
  const int64_t w0 = WindowStart(kT0, p);
  SlidingCell c;
  for (int i = 0; i < 10; ++i) {
    const Decision d = c.Apply(l, 1, w0 + 5 * kSec, true);
    ASSERT_TRUE(d.allowed);
    EXPECT_EQ(d.remaining, 9 - i);
  }
  Decision d = c.Apply(l, 1, w0 + 5 * kSec, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(c.state.current, 10);  // a rejected hit adds nothing
  WindowState w = c.Inspect(l, w0 + 5 * kSec);
  EXPECT_EQ(w.count, 10);
  EXPECT_EQ(w.previous_count, 0);
  EXPECT_EQ(w.previous_ttl_nanos, 0);
  EXPECT_EQ(w.current_ttl_nanos, 15 * kSec);
  // The next window starts on the epoch grid, not 10s after the first hit.
  w = c.Inspect(l, w0 + p);
  EXPECT_EQ(w.count, 0);
  EXPECT_EQ(w.previous_count, 10);
  EXPECT_EQ(w.previous_ttl_nanos, p);
  EXPECT_FALSE(c.Apply(l, 1, w0 + p, false).allowed);  // weight 10 * 10/10
  // Halfway through, half of the previous window still counts.
  d = c.Apply(l, 1, w0 + p + 5 * kSec, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 4);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(c.Apply(l, 1, w0 + p + 5 * kSec, true).allowed);
  }
  EXPECT_FALSE(c.Apply(l, 1, w0 + p + 5 * kSec, true).allowed);
  // One ns later the weight 10 * (5s - 1ns) / 10s floors to 4.
  EXPECT_TRUE(c.Apply(l, 1, w0 + p + 5 * kSec + 1, true).allowed);
  // Two windows later everything is gone.
  EXPECT_TRUE(c.Fresh(w0 + 3 * p));
  w = c.Inspect(l, w0 + 3 * p);
  EXPECT_EQ(w.count, 0);
  EXPECT_EQ(w.previous_count, 0);
}

TEST(SlidingWindowTest, WeightedCountIsFloored) {
  const Limit l = MakeLimit(4, 10);
  const int64_t p = l.PeriodNanos();
  const int64_t w0 = WindowStart(kT0, p);
  SlidingCell c;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(c.Apply(l, 1, w0, true).allowed);
  // 3 * 5/10 = 1.5 -> 1 counts; 3 are left.
  const int64_t t = w0 + p + 5 * kSec;
  const WindowState w = c.Inspect(l, t);
  const WindowStats s =
      StatsFromState(Strategy::kSlidingWindowCounter, l, w, t);
  EXPECT_EQ(s.remaining, 3);
  EXPECT_TRUE(c.Apply(l, 3, t, false).allowed);
  EXPECT_FALSE(c.Apply(l, 4, t, false).allowed);
  // Exactly at 2/3 of the way, 3 * (10/3 s) / 10s would be 1 in exact
  // arithmetic, but the ttl is a whole number of ns: 3 * 3333333334 ns
  // is just over 1.
  const int64_t third = w0 + p + p - 3'333'333'334;
  EXPECT_EQ(StatsFromState(Strategy::kSlidingWindowCounter, l,
                           c.Inspect(l, third), third)
                .remaining,
            3);
  EXPECT_EQ(StatsFromState(Strategy::kSlidingWindowCounter, l,
                           c.Inspect(l, third + 1), third + 1)
                .remaining,
            4);
}

TEST(SlidingWindowTest, CostsAndCostAboveAmount) {
  const Limit l = MakeLimit(5, 1);
  const int64_t w0 = WindowStart(kT0, kSec);
  SlidingCell c;
  Decision d = c.Apply(l, 6, w0, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after_nanos, kSec);
  EXPECT_EQ(d.remaining, 5);
  EXPECT_EQ(c.state.current, 0);
  EXPECT_TRUE(c.Apply(l, 5, w0, true).allowed);
  d = c.Apply(l, 1, w0 + 1, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(c.state.current, 5);
  EXPECT_TRUE(c.Apply(l, 0, w0 + 1, true).allowed);
  EXPECT_FALSE(c.Apply(MakeLimit(0, 1), 1, w0, true).allowed);
}

// limits: reset = now + min(prev_ttl % (expiry / prev), cur_ttl % expiry),
// or now when both counters are empty.
TEST(SlidingWindowTest, ResetTimeMatchesLimitsFormula) {
  const Limit l = MakeLimit(100, 10);
  const int64_t p = l.PeriodNanos();
  const int64_t w0 = WindowStart(kT0, p);
  SlidingCell c;
  WindowState w = c.Inspect(l, w0 + 3 * kSec);
  EXPECT_EQ(w.time_nanos, w0 + 3 * kSec);  // empty: now
  ASSERT_TRUE(c.Apply(l, 4, w0 + 1 * kSec, true).allowed);
  // Only the current window: it resets when the window ends.
  Decision d = c.Apply(l, 0, w0 + 3 * kSec, false);
  EXPECT_EQ(d.reset_nanos, w0 + p);
  // Next window, 3s in: prev 4, ttl 7s, 10s/4 = 2.5s, 7 % 2.5 = 2s.
  const int64_t t = w0 + p + 3 * kSec;
  w = c.Inspect(l, t);
  EXPECT_EQ(w.previous_count, 4);
  EXPECT_EQ(w.previous_ttl_nanos, 7 * kSec);
  EXPECT_EQ(w.current_ttl_nanos, 17 * kSec);
  EXPECT_EQ(w.time_nanos, t + 2 * kSec);
  ASSERT_TRUE(c.Apply(l, 1, t, true).allowed);
  // With a current count too: min(2s, 17s % 10s = 7s).
  EXPECT_EQ(c.Inspect(l, t).time_nanos, t + 2 * kSec);
  // Cross-check the formula in doubles at a few awkward points.
  for (int64_t into : {int64_t{1}, 333 * kMs, 2'500'000'001, 9'999'999'999}) {
    const int64_t now = w0 + p + into;
    const WindowState s = c.Inspect(l, now);
    const double expiry = 10.0;
    const double prev_ttl = static_cast<double>(p - into) / kSec;
    const double prev_reset = std::fmod(prev_ttl, expiry / 4);
    const double cur_reset = std::fmod(2 * expiry - into / 1e9, expiry);
    const double expect = std::min(prev_reset, cur_reset);
    EXPECT_NEAR(static_cast<double>(s.time_nanos - now) / kSec, expect, 2e-9)
        << into;
  }
}

TEST(SlidingWindowTest, RejectedHitsAddNothingButRollTheWindow) {
  const Limit l = MakeLimit(2, 1);
  const int64_t w0 = WindowStart(kT0, kSec);
  SlidingCell c;
  ASSERT_TRUE(c.Apply(l, 2, w0 + 100 * kMs, true).allowed);
  ASSERT_FALSE(c.Apply(l, 1, w0 + kSec, true).allowed);  // weight 2
  EXPECT_EQ(c.state.window, w0 / kSec + 1);
  EXPECT_EQ(c.state.previous, 2);
  EXPECT_EQ(c.state.current, 0);
  EXPECT_EQ(c.state.expiry_nanos, w0 + 3 * kSec);
}

TEST(SlidingWindowTest, ClockBehindCountsInTheNewestWindowAtItsStart) {
  const Limit l = MakeLimit(3, 10);
  const int64_t w1 = WindowStart(kT0, 10 * kSec) + 10 * kSec;
  const int64_t w2 = w1 + 10 * kSec;
  SlidingCell c;
  ASSERT_TRUE(c.Apply(l, 2, w1 + 100 * kMs, true).allowed);
  // An instance ahead opens the next window: weight floor(2 * 9.95 / 10).
  ASSERT_TRUE(c.Apply(l, 1, w2 + 50 * kMs, true).allowed);
  ASSERT_EQ(c.state.window, w2 / (10 * kSec));
  // One 100 ms behind, still in the first window: it counts in the
  // newest one at its start (2 + 1 in use), not in an emptied one.
  Decision d = c.Apply(l, 1, w2 - 100 * kMs, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.reset_nanos, w2);
  // One ns into the newest window, from this caller's clock.
  EXPECT_EQ(d.retry_after_nanos, 100 * kMs + 1);
  EXPECT_EQ(c.state.window, w2 / (10 * kSec));
  EXPECT_EQ(c.state.current, 1);
  EXPECT_EQ(c.state.previous, 2);
  EXPECT_EQ(c.state.expiry_nanos, w2 + 20 * kSec);
  const int64_t retry = d.retry_after_nanos;
  d = c.Apply(l, 0, w2 - 100 * kMs, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(c.state.current, 1);
  EXPECT_EQ(c.state.previous, 2);
  const WindowState w = c.Inspect(l, w2 - 100 * kMs);
  EXPECT_EQ(w.count, 1);
  EXPECT_EQ(w.previous_count, 2);
  EXPECT_EQ(w.previous_ttl_nanos, 10 * kSec);
  EXPECT_EQ(w.current_ttl_nanos, 20 * kSec + 100 * kMs);
  EXPECT_EQ(w.time_nanos, w2);
  EXPECT_EQ(
      StatsFromState(Strategy::kSlidingWindowCounter, l, w, w2 - 100 * kMs)
          .remaining,
      0);
  EXPECT_FALSE(c.Apply(l, 1, w2 - 100 * kMs + retry - 1, false).allowed);
  EXPECT_TRUE(c.Apply(l, 1, w2 - 100 * kMs + retry, false).allowed);
}

TEST(SlidingWindowTest, ClockGoingBackLosesNoCounts) {
  // Two clocks 2 s apart around a window boundary, alternating: the one
  // behind counts in the newest window, so the hits of both add up. The
  // first hit (alone in its window) weighs 0 after 1 s of the next window
  // for the clock ahead: 4 admitted, as `limits` admits on one clock.
  const Limit l = MakeLimit(3, 10);
  const int64_t b = WindowStart(kT0, 10 * kSec) + 10 * kSec;
  SlidingCell c;
  int admitted = 0;
  for (int i = 0; i < 10; ++i) {
    const int64_t now = b + (i % 2 == 0 ? -kSec : kSec) + i * kMs;
    admitted += c.Apply(l, 1, now, true).allowed;
  }
  EXPECT_EQ(admitted, 4);
  EXPECT_EQ(c.state.window, b / (10 * kSec));
  EXPECT_EQ(c.state.current, 3);
  EXPECT_EQ(c.state.previous, 1);
}

// ------------------------------------------------------------- Token bucket

TEST(TokenBucketTest, SevenPerThreeSecondsIsExact) {
  const Limit l = MakeLimit(7, 3);
  CounterCell c;
  for (int i = 0; i < 7; ++i) {
    const Decision d = c.Bucket(l, 1, kT0, true);
    ASSERT_TRUE(d.allowed) << i;
    EXPECT_EQ(d.limit, 7);
    EXPECT_EQ(d.remaining, 6 - i);
  }
  Decision d = c.Bucket(l, 1, kT0, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.reset_nanos, kT0 + 3 * kSec);
  // One token is 3e9/7 = 428571428.57 ns; the wait rounds up.
  EXPECT_EQ(d.retry_after_nanos, 428'571'429);
  EXPECT_FALSE(c.Bucket(l, 1, kT0 + 428'571'428, true).allowed);
  d = c.Bucket(l, 1, kT0 + 428'571'429, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_FALSE(c.Bucket(l, 1, kT0 + 428'571'429, true).allowed);
  // The second token arrives at 2 * 3e9/7 = 857142857.14 ns.
  EXPECT_FALSE(c.Bucket(l, 1, kT0 + 857'142'857, false).allowed);
  EXPECT_TRUE(c.Bucket(l, 1, kT0 + 857'142'858, false).allowed);
  // Full again after 3s + 3/7 s.
  EXPECT_EQ(c.Bucket(l, 0, kT0 + kSec, false).reset_nanos,
            kT0 + 3 * kSec + 428'571'429);
}

TEST(TokenBucketTest, SteadyRateHasNoDrift) {
  const Limit l = MakeLimit(7, 3);
  CounterCell c;
  int64_t now = kT0;
  int64_t admitted = 0;
  while (now <= kT0 + 30 * kSec) {
    const Decision d = c.Bucket(l, 1, now, true);
    if (d.allowed) {
      ++admitted;
    } else {
      ASSERT_GT(d.retry_after_nanos, 0);
      now += d.retry_after_nanos;
    }
  }
  // The burst of 7, then one token every 3/7 s: 70 more in 30 s.
  EXPECT_EQ(admitted, 77);
}

TEST(TokenBucketTest, ThousandPerDay) {
  const Limit l = MakeLimit(1000, 1, Granularity::kDay);
  CounterCell c;
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(c.Bucket(l, 1, kT0, true).allowed);
  Decision d = c.Bucket(l, 1, kT0, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after_nanos, 86'400 * kMs);  // 86.4 s
  EXPECT_EQ(d.reset_nanos, kT0 + 86'400 * kSec);
  d = c.Bucket(l, 5, kT0 + 3600 * kSec, false);  // an hour buys 41.67
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 41);
  EXPECT_FALSE(c.Bucket(l, 42, kT0 + 3600 * kSec, false).allowed);
  const WindowState w =
      InspectTokenBucket(l, kT0 + 3600 * kSec, false, c.state);
  EXPECT_EQ(w.count, 959);  // 958.33 in use, rounded up
  EXPECT_EQ(w.time_nanos, kT0 + 86'400 * kSec);
  EXPECT_EQ(StatsFromState(Strategy::kTokenBucket, l, w, 0).remaining, 41);
}

TEST(TokenBucketTest, BurstAboveAmount) {
  const Limit l = MakeLimit(2, 1, Granularity::kSecond, 5);
  EXPECT_EQ(l.EffectiveBurst(), 5);
  CounterCell c;
  for (int i = 0; i < 5; ++i) {
    const Decision d = c.Bucket(l, 1, kT0, true);
    ASSERT_TRUE(d.allowed) << i;
    EXPECT_EQ(d.remaining, 4 - i);
    EXPECT_EQ(d.limit, 2);
  }
  Decision d = c.Bucket(l, 1, kT0, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after_nanos, 500 * kMs);
  EXPECT_EQ(d.reset_nanos, kT0 + 2500 * kMs);
  // After 1 s two tokens came back (count in use 3).
  WindowState w = InspectTokenBucket(l, kT0 + kSec, false, c.state);
  EXPECT_EQ(w.count, 3);
  EXPECT_EQ(StatsFromState(Strategy::kTokenBucket, l, w, 0).remaining, 2);
  EXPECT_TRUE(c.Bucket(l, 2, kT0 + kSec, true).allowed);
  EXPECT_FALSE(c.Bucket(l, 1, kT0 + kSec, true).allowed);
  // A cost above the burst can never fit: the honest wait is one period.
  d = c.Bucket(l, 6, kT0 + 100 * kSec, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after_nanos, kSec);
  EXPECT_TRUE(c.Bucket(l, 5, kT0 + 100 * kSec, true).allowed);
}

// A burst of exactly `burst` hits fits from a full bucket, for rates whose
// token is not a whole number of ns; the bucket is full again at the
// decision's reset time (and not 2 ns before it).
TEST(TokenBucketTest, FullBurstAlwaysFitsWithAwkwardRates) {
  const Limit limits[] = {
      MakeLimit(7, 3),
      MakeLimit(3, 1),
      MakeLimit(3, 1, Granularity::kSecond, 2),
      MakeLimit(1000, 1, Granularity::kDay),
      MakeLimit(2, 1, Granularity::kSecond, 5),
      MakeLimit(7, 1, Granularity::kMinute, 11),
      MakeLimit(999'999'937, 1, Granularity::kSecond),
      MakeLimit(13, 7, Granularity::kHour, 1),
      MakeLimit(1, 1, Granularity::kYear),
  };
  for (const Limit& l : limits) {
    SCOPED_TRACE(l.amount);
    const int64_t burst = l.EffectiveBurst();
    CounterCell c;
    int64_t now = kT0 + 123;
    for (int round = 0; round < 3; ++round) {
      Decision last;
      if (burst <= 1000) {
        for (int64_t i = 0; i < burst; ++i) {
          last = c.Bucket(l, 1, now, true);
          ASSERT_TRUE(last.allowed) << "round " << round << " hit " << i;
        }
      } else {
        last = c.Bucket(l, burst, now, true);
        ASSERT_TRUE(last.allowed) << "round " << round;
      }
      EXPECT_EQ(last.remaining, 0);
      const Decision rejected = c.Bucket(l, 1, now, true);
      EXPECT_FALSE(rejected.allowed);
      EXPECT_EQ(rejected.remaining, 0);
      const int64_t full = last.reset_nanos;
      EXPECT_GT(full, now);
      EXPECT_FALSE(c.Bucket(l, burst, full - 2, false).allowed);
      EXPECT_TRUE(c.Bucket(l, burst, full, false).allowed);
      now = full + round;  // the next round starts from a full bucket
    }
  }
}

TEST(TokenBucketTest, TestConsumesNothingAndCostZeroIsFree) {
  const Limit l = MakeLimit(2, 1);
  CounterCell c;
  EXPECT_TRUE(c.Bucket(l, 2, kT0, false).allowed);
  EXPECT_FALSE(c.exists);
  ASSERT_TRUE(c.Bucket(l, 2, kT0, true).allowed);
  const CounterState before = c.state;
  EXPECT_FALSE(c.Bucket(l, 1, kT0, false).allowed);
  EXPECT_TRUE(c.Bucket(l, 0, kT0, true).allowed);
  EXPECT_EQ(c.state.expiry_nanos, before.expiry_nanos);
  EXPECT_EQ(c.state.value, before.value);
  // Fresh: nothing in use, the bucket is full now.
  const WindowState w = InspectTokenBucket(l, kT0, true, c.state);
  EXPECT_EQ(w.count, 0);
  EXPECT_EQ(w.time_nanos, kT0);
  EXPECT_EQ(StatsFromState(Strategy::kTokenBucket, l, w, kT0).remaining, 2);
  const Decision fresh = ApplyTokenBucket(l, 1, kT0, false, true, &c.state);
  EXPECT_EQ(fresh.remaining, 2);
  EXPECT_EQ(fresh.reset_nanos, kT0);
}

TEST(TokenBucketTest, SubSecondRetryTimes) {
  const Limit l = MakeLimit(10, 1);
  CounterCell c;
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(c.Bucket(l, 1, kT0, true).allowed);
  Decision d = c.Bucket(l, 1, kT0 + 30 * kMs, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.retry_after_nanos, 70 * kMs);
  d = c.Bucket(l, 3, kT0 + 30 * kMs, true);
  EXPECT_EQ(d.retry_after_nanos, 270 * kMs);
}

TEST(TokenBucketTest, ClockBehindFindsTheBucketEmptyNeverBelow) {
  // Another instance, 500 ms ahead, emptied the bucket: seen from here the
  // TAT is 1.5 s away, more than the 1 s capacity.
  const Limit l = MakeLimit(10, 1);
  CounterCell c;
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(c.Bucket(l, 1, kT0 + 500 * kMs, true).allowed);
  }
  const CounterState before = c.state;
  Decision d = c.Bucket(l, 1, kT0, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.reset_nanos, kT0 + 1500 * kMs);  // the TAT, absolute
  // From this caller's clock: the TAT less the capacity, plus one token.
  EXPECT_EQ(d.retry_after_nanos, 600 * kMs);
  // A cost of 0 takes nothing: allowed, and the state is unchanged.
  d = c.Bucket(l, 0, kT0, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.reset_nanos, kT0 + 1500 * kMs);
  EXPECT_TRUE(c.Bucket(l, 0, kT0, false).allowed);
  EXPECT_EQ(c.state.expiry_nanos, before.expiry_nanos);
  EXPECT_EQ(c.state.value, before.value);
  const WindowState w = InspectTokenBucket(l, kT0, false, c.state);
  EXPECT_EQ(w.count, 10);
  EXPECT_EQ(w.time_nanos, kT0 + 1500 * kMs);
  EXPECT_EQ(StatsFromState(Strategy::kTokenBucket, l, w, kT0).remaining, 0);
  // Once this clock reaches TAT - capacity + one token, one fits.
  EXPECT_FALSE(c.Bucket(l, 1, kT0 + 600 * kMs - 1, false).allowed);
  EXPECT_TRUE(c.Bucket(l, 1, kT0 + 600 * kMs, false).allowed);
}

TEST(TokenBucketTest, CostZeroDoesNotMoveAnOldTatToNow) {
  // An idle bucket's TAT is in the past; a cost of 0 must leave it there,
  // or a clock a little behind would take it for a charge.
  const Limit l = MakeLimit(10, 1);
  CounterCell c;
  ASSERT_TRUE(c.Bucket(l, 1, kT0, true).allowed);  // TAT kT0 + 100 ms
  const CounterState before = c.state;
  EXPECT_TRUE(c.Bucket(l, 0, kT0 + kSec, true).allowed);
  EXPECT_EQ(c.state.expiry_nanos, before.expiry_nanos);
  EXPECT_EQ(c.state.value, before.value);
  const Decision d = c.Bucket(l, 10, kT0 + 900 * kMs, true);
  EXPECT_TRUE(d.allowed);  // the full burst: nothing in use
  EXPECT_EQ(d.remaining, 0);
}

TEST(TokenBucketTest, AmountZeroAllowsNothing) {
  CounterCell c;
  const Limit l = MakeLimit(0, 1, Granularity::kMinute);
  const Decision d = c.Bucket(l, 1, kT0, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.retry_after_nanos, 60 * kSec);
  EXPECT_FALSE(c.exists);
  EXPECT_EQ(InspectTokenBucket(l, kT0, false, c.state).count, 0);
}

TEST(AmountZeroTest, EveryStrategyRejects) {
  const Limit l = MakeLimit(0, 1);
  CounterCell f;
  EXPECT_FALSE(f.Fixed(l, 1, kT0, true).allowed);
  EXPECT_FALSE(f.Fixed(l, 1, kT0, false).allowed);
  SlidingCell s;
  EXPECT_FALSE(s.Apply(l, 1, kT0, true).allowed);
  EXPECT_FALSE(s.Apply(l, 1, kT0, false).allowed);
  MovingCell m;
  EXPECT_FALSE(m.Apply(l, 1, kT0, true).allowed);
  EXPECT_FALSE(m.Apply(l, 1, kT0, false).allowed);
  CounterCell b;
  EXPECT_FALSE(b.Bucket(l, 1, kT0, true).allowed);
}

TEST(ExtremeValuesTest, LargestLimitsDoNotOverflow) {
  const Limit l = MakeLimit(kMaxAmount, kMaxPeriodSeconds);
  ASSERT_EQ(l.PeriodSeconds(), kMaxPeriodSeconds);
  CounterCell f;
  Decision d = f.Fixed(l, kMaxAmount, kT0, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.reset_nanos, kT0 + l.PeriodNanos());
  EXPECT_FALSE(f.Fixed(l, kMaxAmount, kT0, true).allowed);
  CounterCell b;
  d = b.Bucket(l, kMaxAmount, kT0, true);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.reset_nanos, kT0 + l.PeriodNanos());
  d = b.Bucket(l, 1, kT0, true);
  EXPECT_FALSE(d.allowed);
  EXPECT_GT(d.retry_after_nanos, 0);
  SlidingCell s;
  EXPECT_TRUE(s.Apply(l, kMaxAmount, kT0, true).allowed);
  // The next window, at its start: the previous one weighs in fully.
  d = s.Apply(l, 1, l.PeriodNanos(), true);
  EXPECT_FALSE(d.allowed);
  EXPECT_GT(d.retry_after_nanos, 0);
  MovingCell m;
  EXPECT_TRUE(m.Apply(l, 3, kT0, true).allowed);
  EXPECT_EQ(m.state.log->size(), 3);
}

// ------------------------------------------- retry_after is exact (property)

// For every rejection of an affordable request, waiting retry_after must
// be enough and (within the stated rounding) necessary, with no other
// traffic in between. Checked by evaluating (charge=false) on the state the
// rejection left.
TEST(RetryAfterTest, IsTightForEveryStrategy) {
  std::mt19937_64 rng(4242);
  const Limit limits[] = {MakeLimit(3, 1), MakeLimit(5, 10), MakeLimit(7, 3),
                          MakeLimit(2, 1, Granularity::kSecond, 5),
                          MakeLimit(10, 1, Granularity::kMinute)};
  int checked = 0;
  for (const Limit& l : limits) {
    const int64_t p = l.PeriodNanos();
    CounterCell fixed;
    CounterCell bucket;
    SlidingCell sliding;
    MovingCell moving;
    std::vector<int64_t> moving_all;  // newest first
    int64_t now = kT0;
    for (int i = 0; i < 2000; ++i) {
      now += static_cast<int64_t>(rng() % (p / 3));
      if (rng() % 7 == 0) now += static_cast<int64_t>(rng() % 4) * (p / 4);
      const int64_t cost =
          1 + static_cast<int64_t>(rng() % std::min<int64_t>(l.amount, 3));
      SCOPED_TRACE(::testing::Message() << l.amount << " step " << i);

      Decision d = fixed.Fixed(l, cost, now, true);
      if (!d.allowed) {
        const int64_t r = d.retry_after_nanos;
        ASSERT_GT(r, 0);
        EXPECT_TRUE(fixed.Fixed(l, cost, now + r, false).allowed);
        EXPECT_FALSE(fixed.Fixed(l, cost, now + r - 1, false).allowed);
        ++checked;
      }

      d = sliding.Apply(l, cost, now, true);
      if (!d.allowed) {
        const int64_t r = d.retry_after_nanos;
        ASSERT_GT(r, 0);
        EXPECT_TRUE(sliding.Apply(l, cost, now + r, false).allowed);
        if (r > 1) {
          EXPECT_FALSE(sliding.Apply(l, cost, now + r - 1, false).allowed);
        }
        ++checked;
      }

      d = bucket.Bucket(l, cost, now, true);
      if (!d.allowed) {
        const int64_t r = d.retry_after_nanos;
        ASSERT_GT(r, 0);
        EXPECT_TRUE(bucket.Bucket(l, cost, now + r, false).allowed);
        if (r > 1 && bucket.Bucket(l, cost, now + r - 1, false).allowed) {
          // Known rounding: the state is void at floor(TAT) (the memory
          // store and the Redis script agree), so a request may pass less
          // than 1 ns before its exact time, i.e. one tick before
          // now + retry_after. Never earlier than that.
          EXPECT_EQ(bucket.state.expiry_nanos, now + r - 1);
          EXPECT_NE(bucket.state.value, 0);
        }
        if (r > 2) {
          EXPECT_FALSE(bucket.Bucket(l, cost, now + r - 2, false).allowed);
        }
        ++checked;
      }

      d = moving.Apply(l, cost, now, true);
      if (d.allowed) {
        moving_all.insert(moving_all.begin(), cost, now);
      } else {
        // Must wait until the blocking entry is strictly older than
        // now + r - period; check with the unbounded list.
        const int64_t r = d.retry_after_nanos;
        const int64_t blocker =
            moving_all[static_cast<size_t>(l.amount - cost)];
        EXPECT_EQ(now + r - p, blocker + 1);
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 1000);
}

}  // namespace
}  // namespace rapidlimit
