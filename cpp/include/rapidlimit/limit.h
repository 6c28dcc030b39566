// A rate limit ("10 per 2 minutes") and the parser for the rate-limit
// language of the `limits` Python package, which slowapi users write.
#ifndef RAPIDLIMIT_LIMIT_H_
#define RAPIDLIMIT_LIMIT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace rapidlimit {

// The units a limit may be expressed in. Month and year are fixed lengths
// (30 and 360 days), as `limits` defines them, so existing apps keep their
// window sizes.
enum class Granularity : uint8_t {
  kSecond,
  kMinute,
  kHour,
  kDay,
  kMonth,
  kYear,
};

// Lower-case singular name, as `limits` spells it ("minute").
std::string_view GranularityName(Granularity g);
// Length of one unit in seconds. Inline: every decision needs it.
inline int64_t GranularitySeconds(Granularity g) {
  // Static: a plain local array was rebuilt on the stack at every call.
  static constexpr int64_t kSeconds[] = {1,      60,          3600,
                                         86'400, 30 * 86'400, 360 * 86'400};
  return kSeconds[static_cast<uint8_t>(g)];
}

// Bounds that keep window arithmetic inside int64 nanoseconds; larger
// values are parse errors rather than silent wrap-arounds.
constexpr int64_t kMaxAmount = 1'000'000'000'000'000;        // 1e15
constexpr int64_t kMaxPeriodSeconds = 100LL * 360 * 86'400;  // 100 "years"
constexpr size_t kMaxLimitStringLength = 4096;

// An immutable value: `amount` hits per `multiples` units of `granularity`.
// Copyable and cheap; safe to share between threads.
struct Limit {
  int64_t amount = 0;
  int64_t multiples = 1;
  Granularity granularity = Granularity::kSecond;
  // Token bucket only: how many hits may arrive at once. 0 means `amount`.
  int64_t burst = 0;
  // First component of storage keys; `limits` uses "LIMITER".
  std::string namespace_ = "LIMITER";

  // Window length in whole seconds (what `limits` calls get_expiry()).
  int64_t PeriodSeconds() const {
    return multiples * GranularitySeconds(granularity);
  }
  // Saturates instead of wrapping for hand-built limits; parsed ones are
  // bounded by kMaxPeriodSeconds.
  int64_t PeriodNanos() const {
    int64_t seconds, nanos;
    if (__builtin_mul_overflow(multiples, GranularitySeconds(granularity),
                               &seconds) ||
        __builtin_mul_overflow(seconds, int64_t{1'000'000'000}, &nanos)) {
      return multiples < 0 ? INT64_MIN : INT64_MAX;
    }
    return nanos;
  }
  int64_t EffectiveBurst() const { return burst > 0 ? burst : amount; }

  // "5 per 1 minute", the text slowapi puts in 429 bodies.
  std::string ToString() const;
  // The storage key: namespace/id.../amount/multiples/granularity, the
  // layout `limits` uses so that keys are interchangeable with it.
  std::string KeyFor(const std::vector<std::string_view>& identifiers) const;
  // Appends "/amount/multiples/granularity" to `out`.
  void AppendKeySuffix(std::string* out) const;

  bool operator==(const Limit& other) const;
  bool operator!=(const Limit& other) const { return !(*this == other); }
  size_t Hash() const;
};

// Result of parsing: the limits in input order, or an error message in
// the wording `limits` uses ("couldn't parse rate limit string '<s>'" or
// "no granularity matched for <g>").
struct ParseResult {
  std::vector<Limit> limits;
  std::string error;
  bool ok() const { return error.empty(); }
};

// Parses one or more limits separated by ',', ';' or '|'. Accepts exactly
// the strings `limits.parse_many` accepts, with the same meaning.
// Thread-safe; does not cache (callers that parse repeatedly cache).
ParseResult ParseMany(std::string_view text);

// Parses a string and returns its first limit, as `limits.parse` does.
ParseResult ParseOne(std::string_view text);

}  // namespace rapidlimit

#endif  // RAPIDLIMIT_LIMIT_H_
