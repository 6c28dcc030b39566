#include "rapidlimit/clock.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>

#if defined(__x86_64__)
#include <cpuid.h>
#include <x86intrin.h>
#endif

namespace rapidlimit {
namespace {

int64_t RealtimeNanos() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * kNanosPerSecond + ts.tv_nsec;
}

#if defined(__x86_64__)

// clock_gettime costs ~45 ns on some VMs, a third of a whole in-memory
// decision. Where the kernel itself trusts the TSC, we extrapolate
// CLOCK_REALTIME from it and re-anchor every millisecond, so the result
// stays within a microsecond of clock_gettime and follows its steps.
class TscClock {
 public:
  static constexpr int64_t kResyncNanos = 1'000'000;      // 1 ms
  static constexpr int64_t kCalibrateNanos = 20'000'000;  // 20 ms
  static constexpr int kRateBits = 32;

  // Constant: a global needs no guard on each read, as a function-local
  // static would. Whether the TSC is usable is decided at the first read.
  constexpr TscClock() = default;

  int64_t Now() {
    if (mode_.load(std::memory_order_relaxed) != kTsc) return NowWithoutTsc();
    const uint64_t tsc = __rdtsc();
    const uint64_t seq = seq_.load(std::memory_order_acquire);
    const uint64_t anchor_tsc = anchor_tsc_.load(std::memory_order_relaxed);
    const int64_t anchor_ns = anchor_ns_.load(std::memory_order_relaxed);
    const uint64_t ns_per_tick = ns_per_tick_.load(std::memory_order_relaxed);
    const uint64_t max_ticks = max_ticks_.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    // Unsigned: a TSC behind the anchor wraps to a huge count and resyncs.
    // max_ticks is 0 until the rate is calibrated.
    const uint64_t ticks = tsc - anchor_tsc;
    if ((seq & 1) == 0 && seq == seq_.load(std::memory_order_relaxed) &&
        ticks < max_ticks) {
      // Fixed point rather than doubles: the int-float conversions and the
      // multiply were a fifth of a memory hit's clock read.
      const auto ns = static_cast<int64_t>(
          (static_cast<unsigned __int128>(ticks) * ns_per_tick) >> kRateBits);
      return anchor_ns + ns;
    }
    return Resync();
  }

 private:
  static bool Detect() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    // Invariant TSC: constant rate across P-, C- and T-states.
    if (!__get_cpuid(0x80000007, &eax, &ebx, &ecx, &edx) ||
        (edx & (1u << 8)) == 0) {
      return false;
    }
    // The kernel checks the TSC's synchronisation across CPUs and drops it
    // as its clocksource when it misbehaves; follow its judgement.
    std::FILE* f = std::fopen(
        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        "r");
    if (f == nullptr) return false;
    char name[32] = {0};
    const bool ok = std::fgets(name, sizeof(name), f) != nullptr &&
                    std::strncmp(name, "tsc", 3) == 0 &&
                    (name[3] == '\n' || name[3] == '\0');
    std::fclose(f);
    return ok;
  }

  // The first read decides (racing threads all decide the same); later
  // ones only come here when the TSC is not usable.
  // Out of line: inlined, their register saves burdened every read.
  [[gnu::noinline, gnu::cold]] int64_t NowWithoutTsc() {
    Mode mode = mode_.load(std::memory_order_relaxed);
    if (mode == kUndecided) {
      mode = Detect() ? kTsc : kRealtime;
      mode_.store(mode, std::memory_order_relaxed);
    }
    return mode == kTsc ? Resync() : RealtimeNanos();
  }

  // Reads the real clock and, if no other thread is doing so, re-anchors.
  [[gnu::noinline, gnu::cold]] int64_t Resync() {
    const int64_t ns = RealtimeNanos();
    const uint64_t tsc = __rdtsc();
    uint64_t seq = seq_.load(std::memory_order_relaxed);
    if ((seq & 1) != 0 || !seq_.compare_exchange_strong(
                              seq, seq + 1, std::memory_order_acquire)) {
      return ns;  // another thread is re-anchoring
    }
    // A reader that sees any of the stores below must also see the odd
    // seq_ (the seqlock's writer side): the CAS's acquire alone lets them
    // become visible before it under the C++ model (x86 does not reorder
    // stores, so this costs no instruction there).
    std::atomic_thread_fence(std::memory_order_release);
    if (origin_ns_ == 0) {  // the first anchor
      origin_tsc_ = tsc;
      origin_ns_ = ns;
    }
    // The rate comes from the longest span seen, so it only gets better.
    const int64_t span_ns = ns - origin_ns_;
    double rate = 0;
    if (span_ns >= kCalibrateNanos && tsc > origin_tsc_) {
      rate =
          static_cast<double>(span_ns) / static_cast<double>(tsc - origin_tsc_);
    }
    // Ticks are extrapolated until they would reach kResyncNanos; a rate
    // beyond what fixed point holds (no real TSC is that slow) never is.
    uint64_t ns_per_tick = 0;
    uint64_t max_ticks = 0;
    if (rate > 0 && rate < 1024) {
      ns_per_tick = static_cast<uint64_t>(std::ldexp(rate, kRateBits));
      max_ticks =
          static_cast<uint64_t>(static_cast<double>(kResyncNanos) / rate);
    }
    anchor_tsc_.store(tsc, std::memory_order_relaxed);
    anchor_ns_.store(ns, std::memory_order_relaxed);
    ns_per_tick_.store(ns_per_tick, std::memory_order_relaxed);
    max_ticks_.store(max_ticks, std::memory_order_relaxed);
    seq_.store(seq + 2, std::memory_order_release);
    return ns;
  }

  enum Mode : uint8_t { kUndecided, kTsc, kRealtime };
  std::atomic<Mode> mode_{kUndecided};
  // Where calibration started; written by the first Resync, and only ever
  // read by the thread holding the odd seq_.
  uint64_t origin_tsc_ = 0;
  int64_t origin_ns_ = 0;
  std::atomic<uint64_t> seq_{0};  // odd while the anchor is being written
  std::atomic<uint64_t> anchor_tsc_{0};
  std::atomic<int64_t> anchor_ns_{0};
  // Nanoseconds per tick in fixed point (kRateBits fraction bits), and how
  // many ticks after the anchor that stays valid; both 0 until calibrated.
  std::atomic<uint64_t> ns_per_tick_{0};
  std::atomic<uint64_t> max_ticks_{0};
};

constinit TscClock g_tsc;

int64_t ReadSystemClock() { return g_tsc.Now(); }

#else

int64_t ReadSystemClock() { return RealtimeNanos(); }

#endif

class RealtimeClock final : public Clock {
 public:
  int64_t NowNanos() const override { return ReadSystemClock(); }
};

}  // namespace

const Clock* SystemClock() {
  static const RealtimeClock clock;
  return &clock;
}

int64_t SystemNowNanos() { return ReadSystemClock(); }

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
