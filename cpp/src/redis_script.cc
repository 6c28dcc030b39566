// The C++ half of the decision script: what each limit sends to Lua and
// how the values Lua returns become a Decision. The script decides
// admission and keeps the state; the headers' values are recomputed here
// by the memory store's own functions from the state the script found, so
// both stores answer alike by construction.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "rapidlimit/redis_scripts.h"  // generated: kDecideLua, kDecideSha1
#include "redis_internal.h"

namespace rapidlimit::redis {
namespace {

using i128 = __int128;

int64_t Clamp(i128 v, int64_t hi) {
  if (v > hi) return hi;
  if (v < -hi) return -hi;
  return static_cast<int64_t>(v);
}

int64_t FloorModNanos(int64_t a, int64_t b) {
  return a - FloorDivNanos(a, b) * b;
}

// Magnitudes above this are not exact in Lua; they only occur for
// requests that can never be admitted, which stay rejected.
constexpr int64_t kLuaBig = int64_t{1} << 62;

int Code(const Item& item) {
  if (item.incr) return 4;
  switch (item.strategy) {
    case Strategy::kFixedWindow:
      return 0;
    case Strategy::kMovingWindow:
      return 1;
    case Strategy::kSlidingWindowCounter:
      return 2;
    case Strategy::kTokenBucket:
      return 3;
  }
  return 0;
}

int64_t JoinTime(int64_t seconds, int64_t nanos) {
  return Clamp(static_cast<i128>(seconds) * kNanosPerSecond + nanos,
               std::numeric_limits<int64_t>::max());
}

}  // namespace

std::string_view ScriptBody() { return kDecideLua; }
std::string_view ScriptSha1() { return kDecideSha1; }

int64_t FloorDivNanos(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

void AppendDouble(int64_t v, std::string* out) {
  static_assert(std::endian::native == std::endian::little,
                "the script's doubles are little-endian");
  const double d = static_cast<double>(v);
  char bytes[sizeof(double)];
  std::memcpy(bytes, &d, sizeof(d));
  out->append(bytes, sizeof(bytes));
}

bool ReadDoubles(const char* data, size_t n, int64_t* out) {
  for (size_t i = 0; i < n; ++i) {
    double d;
    std::memcpy(&d, data + i * sizeof(double), sizeof(d));
    if (!std::isfinite(d) || std::fabs(d) > 9.2e18) return false;
    out[i] = static_cast<int64_t>(d);
  }
  return true;
}

// A value under a limit's key that has a state's length but numbers no
// state has (infinities, NaN, beyond int64): another application's
// string, read as a state by the script. Its request alone gets the
// policy; a malformed reply would fail every request of the call, whose
// writes the script has made.
constexpr std::string_view kForeignState =
    "a string that is no state this script wrote (numbers out of range)";

bool ReadReplyBlock(std::string_view reply, size_t* pos, size_t items,
                    int64_t now, bool alone, std::vector<int64_t>* values,
                    std::string* error) {
  if (alone && items == 1 &&
      (reply.size() == 3 * sizeof(double) ||
       reply.size() == 4 * sizeof(double))) {
    // A call's only request, its one limit allowed on a value found: the
    // value alone, which spares Redis making a string of the reply (see
    // redis_internal.h). The state is fresh when its expiry (fixed window:
    // count, expiry_s, expiry_ns) or TAT (token bucket: tat_s, tat_ns,
    // ...) has passed, as the script tests it.
    const size_t n = reply.size() / sizeof(double);
    int64_t v[kValuesPerItem] = {1, 0};
    *pos = reply.size();
    if (!ReadDoubles(reply.data(), n, v + 2)) {
      values->assign({0, 0});
      error->assign(kForeignState);
      return true;
    }
    const int64_t end = n == 3 ? JoinTime(v[3], v[4]) : JoinTime(v[2], v[3]);
    v[1] = end <= now;
    values->assign(1, 1);
    values->insert(values->end(), v, v + kValuesPerItem);
    return true;
  }
  values->assign(1, 0);
  size_t at = *pos;
  if (at < reply.size() && static_cast<uint8_t>(reply[at]) == kReplyError) {
    int64_t head[2];  // limit number, message length
    ++at;
    if (reply.size() - at < sizeof(head) ||
        !ReadDoubles(reply.data() + at, 2, head)) {
      return false;
    }
    at += sizeof(head);
    if (head[0] < 1 || static_cast<uint64_t>(head[0]) > items || head[1] < 0 ||
        static_cast<uint64_t>(head[1]) > reply.size() - at) {
      return false;
    }
    values->push_back(head[0] - 1);
    error->assign(reply.data() + at, static_cast<size_t>(head[1]));
    *pos = at + static_cast<size_t>(head[1]);
    return true;
  }
  size_t foreign = 0;  // the first limit whose numbers are out of range
  for (size_t processed = 1;; ++processed) {
    if (processed > items || at >= reply.size()) return false;
    const auto flags = static_cast<uint8_t>(reply[at++]);
    size_t n = 0;
    switch (flags & kReplyKindMask) {
      case kReplyPacked:
        n = 5;
        break;
      case kReplyFound3:
        n = 3;
        break;
      case kReplyFound4:
        n = 4;
        break;
      default:  // kReplyNone: the values of a fresh state mean nothing
        if (!(flags & kReplyFresh)) return false;
        break;
    }
    if (flags & ~(kReplyKindMask | kReplyAllowed | kReplyFresh | kReplyLast)) {
      return false;
    }
    if (reply.size() - at < n * sizeof(double)) return false;
    int64_t v[kValuesPerItem] = {};
    v[0] = (flags & kReplyAllowed) != 0;
    v[1] = (flags & kReplyFresh) != 0;
    if (!ReadDoubles(reply.data() + at, n, v + 2) && foreign == 0) {
      foreign = processed;
    }
    at += n * sizeof(double);
    values->insert(values->end(), v, v + kValuesPerItem);
    if (flags & kReplyLast) {
      *pos = at;
      if (foreign != 0) {
        values->assign({0, static_cast<int64_t>(foreign) - 1});
        error->assign(kForeignState);
        return true;
      }
      (*values)[0] = static_cast<int64_t>(processed);
      return true;
    }
  }
}

void AppendItemArgs(const Item& item, int64_t now, std::string* out) {
  const Limit& l = item.limit;
  const int64_t cost = item.cost;
  int64_t p[5] = {0, 0, 0, 0, 0};
  switch (Code(item)) {
    case 0:
    case 4: {
      const int64_t period = item.incr ? item.incr_period : l.PeriodNanos();
      p[0] = item.incr ? 0 : l.amount;
      p[1] = FloorDivNanos(period, kNanosPerSecond);
      p[2] = FloorModNanos(period, kNanosPerSecond);
      break;
    }
    case 1:
      p[0] = l.amount;
      p[1] = l.PeriodSeconds();
      break;
    case 2: {
      const int64_t period = l.PeriodNanos();
      const int64_t into = FloorModNanos(now, period);
      p[0] = l.amount;
      p[1] = FloorDivNanos(now, period);
      p[2] = period;
      p[3] = period - into;
      p[4] = period / 1'000'000;  // periods are whole seconds
      break;
    }
    case 3: {
      const int64_t a = l.amount;
      p[0] = a;
      if (a > 0) {
        const i128 period = l.PeriodNanos();
        const i128 c = static_cast<i128>(cost) * period;
        const i128 k = static_cast<i128>(l.EffectiveBurst()) * period;
        p[1] = Clamp(c / a, kLuaBig);
        p[2] = static_cast<int64_t>(c % a);
        p[3] = Clamp(k / a, kLuaBig);
        p[4] = static_cast<int64_t>(k % a);
      }
      break;
    }
  }
  AppendDouble(Code(item), out);
  AppendDouble(cost, out);
  for (int64_t v : p) AppendDouble(v, out);
}

Decision InterpretDecision(const Item& item, int64_t now, bool charge,
                           const int64_t* v, PostState* post,
                           bool* script_allowed) {
  const Limit& l = item.limit;
  const bool fresh = v[1] != 0;
  *script_allowed = v[0] != 0;
  Decision d;
  switch (item.strategy) {
    case Strategy::kFixedWindow: {
      CounterState st{JoinTime(v[3], v[4]), v[2]};
      d = ApplyFixedWindow(l, item.cost, now, charge, fresh, &st);
      post->counter = st;
      break;
    }
    case Strategy::kTokenBucket: {
      CounterState st{JoinTime(v[2], v[3]), v[4]};
      d = ApplyTokenBucket(l, item.cost, now, charge, fresh, &st);
      post->counter = st;
      break;
    }
    case Strategy::kSlidingWindowCounter: {
      const int64_t period = l.PeriodNanos();
      SlidingState st;
      st.window = v[2];
      st.current = v[3];
      st.previous = v[4];
      st.expiry_nanos = Clamp((static_cast<i128>(v[2]) + 2) * period,
                              std::numeric_limits<int64_t>::max());
      d = ApplySlidingWindow(l, item.cost, now, charge, fresh, &st);
      post->sliding = st;
      break;
    }
    case Strategy::kMovingWindow: {
      // ApplyMovingWindow's arithmetic on what the script read from the
      // log: the blocking entry, and the entries inside the window.
      const int64_t period = l.PeriodNanos();
      d.limit = l.amount;
      d.allowed = *script_allowed;
      const int64_t in_window = v[4];
      const int64_t oldest = JoinTime(v[5], v[6]);
      d.remaining = std::max<int64_t>(0, l.amount - in_window);
      d.reset_nanos = Clamp(static_cast<i128>(oldest) + period,
                            std::numeric_limits<int64_t>::max());
      if (!d.allowed) {
        const int64_t blocker = JoinTime(v[2], v[3]);
        d.retry_after_nanos =
            item.cost > l.amount
                ? period
                : std::max<int64_t>(
                      1, Clamp(static_cast<i128>(blocker) + period + 1 - now,
                               std::numeric_limits<int64_t>::max()));
        post->moving_blocker = blocker;
      }
      break;
    }
  }
  return d;
}

WindowState InterpretInspect(const Item& item, int64_t now, const int64_t* v) {
  const Limit& l = item.limit;
  const bool fresh = v[1] != 0;
  switch (item.strategy) {
    case Strategy::kFixedWindow:
      return InspectFixedWindow(l, now, fresh,
                                CounterState{JoinTime(v[3], v[4]), v[2]});
    case Strategy::kTokenBucket:
      return InspectTokenBucket(l, now, fresh,
                                CounterState{JoinTime(v[2], v[3]), v[4]});
    case Strategy::kSlidingWindowCounter: {
      SlidingState st;
      st.window = v[2];
      st.current = v[3];
      st.previous = v[4];
      return InspectSlidingWindow(l, now, fresh, st);
    }
    case Strategy::kMovingWindow: {
      WindowState w;
      w.count = v[4];
      w.time_nanos = v[4] > 0 ? JoinTime(v[5], v[6]) : now;
      return w;
    }
  }
  return {};
}

int64_t InterpretIncr(const Item& item, int64_t now, const int64_t* v,
                      int64_t* expiry_at) {
  CounterState st{JoinTime(v[3], v[4]), v[2]};
  const int64_t count =
      IncrCounter(item.cost, item.incr_period, now, v[1] != 0, &st);
  if (expiry_at != nullptr) *expiry_at = st.expiry_nanos;
  return count;
}

}  // namespace rapidlimit::redis
