#include "rapidlimit/clock.h"

#include <cmath>
#include <ctime>

namespace rapidlimit {
namespace {

class RealtimeClock final : public Clock {
 public:
  int64_t NowNanos() const override {
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return static_cast<int64_t>(ts.tv_sec) * kNanosPerSecond + ts.tv_nsec;
  }
};

}  // namespace

const Clock* SystemClock() {
  static const RealtimeClock clock;
  return &clock;
}

int64_t SecondsToNanos(double seconds) {
  const double whole = std::floor(seconds);
  const int64_t frac =
      std::llround((seconds - whole) * static_cast<double>(kNanosPerSecond));
  return static_cast<int64_t>(whole) * kNanosPerSecond + frac;
}

double NanosToSeconds(int64_t nanos) {
  int64_t whole = nanos / kNanosPerSecond;
  int64_t frac = nanos % kNanosPerSecond;
  if (frac < 0) {
    frac += kNanosPerSecond;
    --whole;
  }
  return static_cast<double>(whole) +
         static_cast<double>(frac) / static_cast<double>(kNanosPerSecond);
}

}  // namespace rapidlimit
