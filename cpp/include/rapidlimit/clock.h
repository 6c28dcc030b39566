// Time source for the core. Every time value in rapidlimit is an int64
// count of nanoseconds since the Unix epoch, so that window arithmetic is
// exact and tests can drive time without sleeping.
#ifndef RAPIDLIMIT_CLOCK_H_
#define RAPIDLIMIT_CLOCK_H_

#include <atomic>
#include <cstdint>

namespace rapidlimit {

constexpr int64_t kNanosPerSecond = 1'000'000'000;

// Abstract clock. Implementations must be thread-safe.
class Clock {
 public:
  virtual ~Clock() = default;
  // Nanoseconds since the Unix epoch.
  virtual int64_t NowNanos() const = 0;
};

// The process-wide wall clock (CLOCK_REALTIME, matching Python's
// time.time()). Never null; owned by the library, never delete it.
const Clock* SystemClock();
// SystemClock()->NowNanos() without the virtual call: the clock read of
// every decision that is not given a time.
int64_t SystemNowNanos();

// A clock that only moves when told to. For tests and for callers that
// supply their own time (the Python layer passes time.time()).
class ManualClock final : public Clock {
 public:
  explicit ManualClock(int64_t now_nanos = 0) : now_(now_nanos) {}
  int64_t NowNanos() const override {
    return now_.load(std::memory_order_relaxed);
  }
  void Set(int64_t now_nanos) {
    now_.store(now_nanos, std::memory_order_relaxed);
  }
  void Advance(int64_t nanos) {
    now_.fetch_add(nanos, std::memory_order_relaxed);
  }

 private:
  std::atomic<int64_t> now_;
};

// Converts epoch seconds as a double (Python's time.time()) to nanoseconds.
// Splitting integer and fractional parts keeps every double whose fraction
// is a whole number of nanoseconds exact in both directions.
int64_t SecondsToNanos(double seconds);
double NanosToSeconds(int64_t nanos);

}  // namespace rapidlimit

#endif  // RAPIDLIMIT_CLOCK_H_
