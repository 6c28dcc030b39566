#include "rapidlimit/clock.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <ctime>

namespace rapidlimit {
namespace {

int64_t Realtime() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * kNanosPerSecond + ts.tv_nsec;
}

// The system clock may extrapolate from the TSC between re-anchors; it must
// stay close to CLOCK_REALTIME through calibration and afterwards. Reads the
// clocks in a busy loop for ~60 ms of real time (no sleeping).
TEST(SystemClockTest, TracksRealtimeWithinAMillisecond) {
  const Clock* clock = SystemClock();
  const int64_t start = Realtime();
  int64_t worst = 0;
  int64_t reads = 0;
  while (Realtime() - start < 60'000'000) {
    const int64_t before = Realtime();
    const int64_t ours = clock->NowNanos();
    const int64_t after = Realtime();
    int64_t off = 0;
    if (ours < before) off = before - ours;
    if (ours > after) off = ours - after;
    worst = std::max(worst, off);
    ++reads;
  }
  EXPECT_GT(reads, 1000);
  EXPECT_LT(worst, 1'000'000) << "worst offset " << worst << " ns";
}

TEST(ManualClockTest, MovesOnlyWhenTold) {
  ManualClock clock(5);
  EXPECT_EQ(clock.NowNanos(), 5);
  clock.Advance(10);
  EXPECT_EQ(clock.NowNanos(), 15);
  clock.Set(-3);
  EXPECT_EQ(clock.NowNanos(), -3);
}

TEST(SecondsTest, RoundTripsBinaryFractionsExactly) {
  for (double t : {0.0, 1.5, 1700000000.015625, 1700000000.25, -1.25,
                   1799999999.999023437}) {
    EXPECT_EQ(NanosToSeconds(SecondsToNanos(t)), t) << t;
  }
  EXPECT_EQ(SecondsToNanos(1.000000001), 1'000'000'001);
  EXPECT_EQ(SecondsToNanos(-0.5), -500'000'000);
}

}  // namespace
}  // namespace rapidlimit
