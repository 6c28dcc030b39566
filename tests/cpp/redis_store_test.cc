// The Redis store against a real redis-server (skipped only when
// redis-server is not in PATH or the build has no hiredis).
#include "rapidlimit/redis_store.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "rapidlimit/clock.h"
#include "rapidlimit/limit.h"
#include "rapidlimit/memory_store.h"

#ifdef RAPIDLIMIT_HAVE_HIREDIS
#include "redis_internal.h"
#include "redis_server.h"

namespace rapidlimit {
namespace {

using testing::RedisServer;
constexpr int64_t kSec = kNanosPerSecond;
constexpr int64_t kMs = 1'000'000;
// An arbitrary epoch time with a sub-second part.
constexpr int64_t kT0 = 1'700'000'000LL * kSec + 123'456'789;

Limit L(const char* text, int64_t burst = 0) {
  ParseResult p = ParseOne(text);
  EXPECT_TRUE(p.ok()) << text;
  Limit l = p.limits.at(0);
  l.burst = burst;
  return l;
}

class RedisStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (testing::FindRedisServer().empty()) {
      GTEST_SKIP() << "redis-server not found in PATH";
    }
    std::string error;
    ASSERT_TRUE(server_.Start(0, &error)) << error;
  }

  RedisStoreOptions Options(
      RedisFailurePolicy policy = RedisFailurePolicy::kFailClosed) const {
    RedisStoreOptions o;
    std::string error;
    EXPECT_TRUE(ParseRedisUri(server_.Uri(), &o, &error)) << error;
    o.on_error = policy;
    o.command_timeout_nanos = 150 * kMs;
    o.connect_timeout_nanos = 300 * kMs;
    o.reconnect_min_nanos = 10 * kMs;
    o.reconnect_max_nanos = 100 * kMs;
    return o;
  }

  // For the comparisons with the memory store: a reply later than the
  // 150 ms of Options() gets the fail-closed policy, which the comparison
  // reports as a wrong decision. The sanitizers' slowdown on a loaded CI
  // machine reached it (a decision with retry_after 1 s).
  RedisStoreOptions CompareOptions() const {
    RedisStoreOptions o = Options();
    o.command_timeout_nanos = 5 * kSec;
    return o;
  }

  std::unique_ptr<RedisStore> Make(const RedisStoreOptions& o) {
    std::string error;
    auto store = NewRedisStore(o, &error);
    EXPECT_NE(store, nullptr) << error;
    return store;
  }

  // A store whose every decision goes to Redis (no blocked-key cache), for
  // comparisons with the memory store.
  std::unique_ptr<RedisStore> MakeUncached() {
    RedisStoreOptions o = CompareOptions();
    o.blocked_cache = false;
    return Make(o);
  }

  // A store on `silent`, which accepts and never answers: its first
  // connect (here) timed out; the I/O thread's next one, waiting
  // `connect_timeout` for a reply, has arrived when this returns.
  std::unique_ptr<RedisStore> MakeSilent(testing::SilentServer& silent,
                                         int64_t connect_timeout) {
    RedisStoreOptions o = Options(RedisFailurePolicy::kFailOpen);
    o.port = silent.port();
    o.connect_timeout_nanos = connect_timeout;
    o.reconnect_min_nanos = kMs;
    o.reconnect_max_nanos = kMs;
    auto store = Make(o);
    silent.Drain();
    EXPECT_TRUE(silent.Accept(std::chrono::milliseconds(2000)));
    return store;
  }

  // A store whose connection is up and script loaded (one hit of `l`
  // done), with a timeout that a loaded machine does not reach.
  std::unique_ptr<RedisStore> MakeConnected(const Limit& l,
                                            size_t pool_size = 1) {
    RedisStoreOptions o = Options();
    o.command_timeout_nanos = 2 * kSec;
    o.pool_size = pool_size;
    auto store = Make(o);
    EXPECT_TRUE(Hit(*store, Strategy::kFixedWindow, l, "warm", kT0).allowed);
    return store;
  }

  static Decision Hit(Store& s, Strategy strategy, const Limit& l,
                      const std::string& key, int64_t now, int64_t cost = 1) {
    Request r{strategy, &l, key, cost};
    Decision d;
    s.Decide(&r, 1, now, Mode::kHit, &d);
    return d;
  }

  // Waits until the store answers from Redis again.
  static bool WaitRecovered(Store& s, std::chrono::milliseconds limit) {
    const Limit l = L("1000000 per second");
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
      const Decision d = Hit(s, Strategy::kFixedWindow, l, "probe", kT0);
      if (d.source == DecisionSource::kStore) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  RedisServer server_;
};

void ExpectSame(const Decision& a, const Decision& b, const std::string& ctx) {
  EXPECT_EQ(a.allowed, b.allowed) << ctx;
  EXPECT_EQ(a.limit, b.limit) << ctx;
  EXPECT_EQ(a.remaining, b.remaining) << ctx;
  EXPECT_EQ(a.reset_nanos, b.reset_nanos) << ctx;
  EXPECT_EQ(a.retry_after_nanos, b.retry_after_nanos) << ctx;
}

void ExpectSame(const WindowState& a, const WindowState& b,
                const std::string& ctx) {
  EXPECT_EQ(a.count, b.count) << ctx;
  EXPECT_EQ(a.time_nanos, b.time_nanos) << ctx;
  EXPECT_EQ(a.previous_count, b.previous_count) << ctx;
  EXPECT_EQ(a.previous_ttl_nanos, b.previous_ttl_nanos) << ctx;
  EXPECT_EQ(a.current_ttl_nanos, b.current_ttl_nanos) << ctx;
}

// ------------------------------------------------- same semantics as memory

struct Mix {
  const char* name;
  std::vector<Strategy> strategies;
};

// Drives a memory store and a Redis store through the same random calls
// (batches of several limits, hits and tests, costs 0..3 and large ones,
// time steps from 1 ns to several periods) and compares every answer.
void CompareWithMemory(Store& redis, uint64_t seed,
                       const std::vector<Strategy>& strategies,
                       bool compare_inspect, int steps) {
  // RAPIDLIMIT_REDIS_FUZZ=N multiplies the steps (long local runs).
  if (const char* scale = std::getenv("RAPIDLIMIT_REDIS_FUZZ")) {
    steps *= std::max(1, std::atoi(scale));
  }
  auto memory = NewMemoryStore();
  const std::vector<Limit> limits = {
      L("3 per second"),    L("5 per 2 seconds"),    L("4/10 seconds"),
      L("5 per second", 2), L("7 per 3 seconds", 3), L("10000 per hour"),
      L("1 per second"),    L("2 per day"),          L("1000000 per minute")};
  const std::vector<std::string> keys = {"LIMITER/a/x", "LIMITER/b/x",
                                         "LIMITER/a/y"};
  std::mt19937_64 rng(seed);
  int64_t now = kT0;
  for (int step = 0; step < steps; ++step) {
    const std::string ctx =
        "seed " + std::to_string(seed) + " step " + std::to_string(step);
    switch (rng() % 9) {
      case 0:
        now += 1;
        break;
      case 8:
        // A clock a little behind (a step back of the system clock, or an
        // instance behind the others sharing Redis).
        now -= static_cast<int64_t>(rng() % (300 * kMs));
        break;
      case 1:
        now += static_cast<int64_t>(rng() % (400 * kMs));
        break;
      case 2:
        now += static_cast<int64_t>(rng() % (3 * kSec));
        break;
      case 3:
        now += static_cast<int64_t>(rng() % 1000) * kMs;
        break;
      default:
        break;
    }
    const size_t n = 1 + rng() % 3;
    std::vector<Request> reqs(n);
    std::vector<std::string> req_keys(n);
    for (size_t i = 0; i < n; ++i) {
      // Keys name their limit, as real keys do ("LIMITER/id/5/1/minute").
      const size_t li = rng() % limits.size();
      const Limit& l = limits[li];
      req_keys[i] = keys[rng() % keys.size()] + "/" + std::to_string(li);
      reqs[i].strategy = strategies[rng() % strategies.size()];
      reqs[i].limit = &l;
      reqs[i].key = req_keys[i];
      const uint64_t c = rng() % 20;
      reqs[i].cost = c < 2 ? 0 : c < 17 ? 1 : c < 19 ? 3 : 4000;
    }
    const int what = static_cast<int>(rng() % 10);
    if (what < 7) {
      const Mode mode = what < 6 ? Mode::kHit : Mode::kTest;
      std::vector<Decision> a(n), b(n);
      const size_t ra = memory->Decide(reqs.data(), n, now, mode, a.data());
      const size_t rb = redis.Decide(reqs.data(), n, now, mode, b.data());
      ASSERT_EQ(ra, rb) << ctx;
      const size_t written = (mode == Mode::kHit && ra < n) ? ra + 1 : n;
      for (size_t i = 0; i < written; ++i) {
        ExpectSame(a[i], b[i],
                   ctx + " request " + std::to_string(i) + " " +
                       std::string(StrategyName(reqs[i].strategy)));
        EXPECT_NE(b[i].source, DecisionSource::kFailClosed) << ctx;
      }
    } else if (what < 9) {
      if (compare_inspect) {
        ExpectSame(
            memory->Inspect(reqs[0], now), redis.Inspect(reqs[0], now),
            ctx + " inspect " + std::string(StrategyName(reqs[0].strategy)));
      }
    } else if (compare_inspect) {
      int64_t ea = 0, eb = 0;
      const int64_t period = static_cast<int64_t>(rng() % 3) * kSec + 7;
      EXPECT_EQ(memory->Incr(req_keys[0], period, 2, now, &ea),
                redis.Incr(req_keys[0], period, 2, now, &eb))
          << ctx;
      EXPECT_EQ(ea, eb) << ctx;
    }
    if (::testing::Test::HasFailure()) return;
  }
}

TEST_F(RedisStoreTest, SameSemanticsAsMemoryPerStrategy) {
  for (Strategy s : {Strategy::kFixedWindow, Strategy::kMovingWindow,
                     Strategy::kSlidingWindowCounter, Strategy::kTokenBucket}) {
    SCOPED_TRACE(std::string(StrategyName(s)));
    RedisStoreOptions o = CompareOptions();
    o.blocked_cache = false;
    auto store = Make(o);
    for (uint64_t seed = 1; seed <= 3; ++seed) {
      store->Reset();
      CompareWithMemory(*store, seed * 7919 + static_cast<uint64_t>(s), {s},
                        true, 400);
      if (HasFailure()) return;
    }
    EXPECT_EQ(store->Stats().mismatches, 0u);
    EXPECT_EQ(store->Stats().fail_closed, 0u);
  }
}

TEST_F(RedisStoreTest, SameSemanticsMixedBatches) {
  RedisStoreOptions o = CompareOptions();
  o.blocked_cache = false;
  auto store = Make(o);
  CompareWithMemory(*store, 42,
                    {Strategy::kFixedWindow, Strategy::kMovingWindow,
                     Strategy::kSlidingWindowCounter, Strategy::kTokenBucket},
                    true, 800);
  EXPECT_EQ(store->Stats().mismatches, 0u);
}

// One call of a boundary test below: at `at`, the first limit costing
// `cost`.
struct BoundaryHit {
  int64_t at;
  int64_t cost = 1;
};

// Sends the limits r[0..n) through a fresh memory store and `redis` at each
// hit, compares the first limit's decisions and returns Redis's admissions
// of it. The random comparison above meets these boundaries rarely or never.
std::vector<bool> AdmissionsLikeMemory(RedisStore& redis, Request* r, size_t n,
                                       const std::vector<BoundaryHit>& hits) {
  auto memory = NewMemoryStore();
  std::vector<bool> allowed;
  for (const BoundaryHit& h : hits) {
    r[0].cost = h.cost;
    Decision a[2], b[2];
    EXPECT_EQ(memory->Decide(r, n, h.at, Mode::kHit, a),
              redis.Decide(r, n, h.at, Mode::kHit, b));
    ExpectSame(
        a[0], b[0],
        "at " + std::to_string(h.at) + " cost " + std::to_string(h.cost));
    allowed.push_back(b[0].allowed);
  }
  EXPECT_EQ(redis.Stats().mismatches, 0u);
  return allowed;
}

// The same for one limit of `strategy` on `key`.
std::vector<bool> AdmissionsLikeMemory(RedisStore& redis, Strategy strategy,
                                       const Limit& limit, std::string_view key,
                                       const std::vector<BoundaryHit>& hits) {
  Request r;
  r.strategy = strategy;
  r.limit = &limit;
  r.key = key;
  return AdmissionsLikeMemory(redis, &r, 1, hits);
}

// A hit whose theoretical arrival time (TAT) crosses into the next second
// stores it carried into the seconds: a hit later in that second, before
// the TAT, must still find the bucket partly used.
TEST_F(RedisStoreTest, TokenBucketTatCarriedIntoTheNextSecond) {
  auto store = MakeUncached();
  const int64_t s0 = (kT0 / kSec + 1) * kSec;
  // .5: a fresh bucket (TAT .833); .6: TAT 1.167, past the second; 1.05:
  // before that TAT (TAT 1.5); 1.06: what 1.05 left.
  EXPECT_EQ(AdmissionsLikeMemory(*store, Strategy::kTokenBucket,
                                 L("3 per second"), "LIMITER/tb/carry",
                                 {{s0 + 500 * kMs},
                                  {s0 + 600 * kMs},
                                  {s0 + 1050 * kMs},
                                  {s0 + 1060 * kMs}}),
            (std::vector<bool>{true, true, true, true}));
}

// A bucket filled exactly to its burst in whole nanoseconds, but past it
// by a fraction of one: refused, as in memory. With 7 per 3 seconds and a
// burst of 3 the interval is 428,571,428 + 4/7 ns; the fourth hit leaves
// the TAT at 4 intervals (a fraction of 2/7) and the fifth, 857,142,857 ns
// after the first, would take the level to the burst's 1,285,714,285 ns
// with 6/7 against the burst's 5/7.
TEST_F(RedisStoreTest, TokenBucketRefusesAFractionPastTheBurst) {
  auto store = MakeUncached();
  const Limit l = L("7 per 3 seconds", 3);
  const Limit wide = L("1000 per hour");
  // Alone (the script's shortcut), then with a second limit after it (the
  // script's general loop).
  for (size_t n : {1, 2}) {
    SCOPED_TRACE(std::to_string(n) + " limit(s)");
    Request r[2];
    const std::string key = "LIMITER/tb/fraction/" + std::to_string(n);
    r[0].strategy = Strategy::kTokenBucket;
    r[0].limit = &l;
    r[0].key = key;
    r[1].limit = &wide;
    r[1].key = "LIMITER/fw/wide";
    EXPECT_EQ(
        AdmissionsLikeMemory(
            *store, r, n,
            {{kT0}, {kT0}, {kT0}, {kT0 + 428'571'429}, {kT0 + 857'142'857}}),
        (std::vector<bool>{true, true, true, true, false}));
  }
}

// The sliding window weighs the previous window's count exactly, also where
// the product of count and time passes 2^53 and doubles would round: here
// 67,489 * 1,280,208,626,591 ns is one less than 1,000 days in ns, so the
// weighted count is 999, which the third hit's room of 999 just admits
// (a double product rounds up to 1,000 days and refuses it).
TEST_F(RedisStoreTest, SlidingWindowWeighsExactlyPastDoublePrecision) {
  auto store = MakeUncached();
  const int64_t day = 86'400 * kSec;
  const int64_t pttl = 1'280'208'626'591;  // time left of the current day
  const int64_t late = (kT0 / day + 2) * day - pttl;
  EXPECT_EQ(AdmissionsLikeMemory(
                *store, Strategy::kSlidingWindowCounter, L("1000000 per day"),
                "LIMITER/sw/exact",
                {{late - day, 67'489}, {late, 999'000}, {late}, {late}}),
            (std::vector<bool>{true, true, true, false}));
}

// A moving window's entries leave it one period after they were made, to
// the nanosecond: at exactly one period the blocker still counts, one
// nanosecond later it does not, and the log is void from its last entry
// plus a period plus 1 ns on.
TEST_F(RedisStoreTest, MovingWindowEdgesToTheNanosecond) {
  auto store = MakeUncached();
  const int64_t t = kT0;
  EXPECT_EQ(AdmissionsLikeMemory(*store, Strategy::kMovingWindow,
                                 L("2 per second"), "LIMITER/mw/edges",
                                 {{t},
                                  {t},
                                  {t + kSec},
                                  {t + kSec + 1},
                                  {t + 2 * kSec + 1},
                                  {t + 2 * kSec + 2},
                                  {t + 2 * kSec + 2}}),
            (std::vector<bool>{true, true, false, true, true, true, false}));
}

// A clock behind the sliding window's newest window (an instance behind
// the others) counts in that window as at its start: the previous
// window's count weighs in full, not by the time left of the caller's own
// window.
TEST_F(RedisStoreTest, SlidingWindowClockBehindCountsInTheNewestWindow) {
  auto store = MakeUncached();
  const int64_t w = (kT0 / kSec + 2) * kSec;  // a window's start
  std::vector<BoundaryHit> hits(5, {w - 500 * kMs});
  // 4 of the 5 weigh in at w + 0.1 s: 5 more fit.
  hits.insert(hits.end(), 5, {w + 100 * kMs});
  // 5 weighed in full + 5 + 1 > 10 (by the time left of the caller's own
  // window, 0.05 s, the 5 would weigh nothing).
  hits.push_back({w - 50 * kMs});
  std::vector<bool> expected(10, true);
  expected.push_back(false);
  EXPECT_EQ(AdmissionsLikeMemory(*store, Strategy::kSlidingWindowCounter,
                                 L("10 per second"), "LIMITER/sw/behind", hits),
            expected);
  // A previous count of 1 weighs 1 there too (in the caller's own window it
  // would weigh less than 1, that is 0).
  EXPECT_EQ(
      AdmissionsLikeMemory(*store, Strategy::kSlidingWindowCounter,
                           L("2 per second"), "LIMITER/sw/behind-one",
                           {{w - 500 * kMs}, {w + 900 * kMs}, {w - 50 * kMs}}),
      (std::vector<bool>{true, true, false}));
}

// A test (Mode::kTest) evaluates every limit of the request, also those
// after one that would refuse it, and writes nothing.
TEST_F(RedisStoreTest, TestModeEvaluatesEveryLimitAfterARefusal) {
  auto store = MakeUncached();
  auto memory = NewMemoryStore();
  const Limit one = L("1 per minute"), ten = L("10 per minute");
  Request r[2];
  r[0].limit = &one;
  r[0].key = "LIMITER/test/one";
  r[1].limit = &ten;
  r[1].key = "LIMITER/test/ten";
  for (Strategy s : {Strategy::kFixedWindow, Strategy::kMovingWindow,
                     Strategy::kSlidingWindowCounter, Strategy::kTokenBucket}) {
    SCOPED_TRACE(std::string(StrategyName(s)));
    r[0].strategy = r[1].strategy = s;
    {
      // The second limit charged once, the first used up.
      Decision a[2], b[2];
      ASSERT_EQ(memory->Decide(r, 2, kT0, Mode::kHit, a),
                store->Decide(r, 2, kT0, Mode::kHit, b));
    }
    for (Mode m : {Mode::kTest, Mode::kTest, Mode::kHit}) {
      Decision a[2], b[2];  // fresh: nothing left from an earlier call
      // Both answer 0: the request stops being admitted at its first limit.
      ASSERT_EQ(memory->Decide(r, 2, kT0 + kSec, m, a), 0u);
      ASSERT_EQ(store->Decide(r, 2, kT0 + kSec, m, b), 0u);
      EXPECT_FALSE(b[0].allowed);
      ExpectSame(a[0], b[0], "first limit");
      if (m == Mode::kTest) {
        EXPECT_TRUE(b[1].allowed);
        EXPECT_EQ(b[1].remaining, 9);
        ExpectSame(a[1], b[1], "second limit");
      }
    }
    store->Reset();
    memory->Reset();
  }
}

TEST_F(RedisStoreTest, SameDecisionsWithBlockedKeyCache) {
  // With the cache on, decisions are the same; only the fixed window's
  // counter (visible to Inspect) stops counting rejected hits.
  auto store = Make(CompareOptions());
  CompareWithMemory(*store, 99,
                    {Strategy::kFixedWindow, Strategy::kMovingWindow,
                     Strategy::kSlidingWindowCounter, Strategy::kTokenBucket},
                    false, 800);
  EXPECT_GT(store->Stats().cache_hits, 0u);
  EXPECT_EQ(store->Stats().mismatches, 0u);
}

TEST_F(RedisStoreTest, MovingWindowLimitChangeKeepsNewestEntries) {
  // limits' acquire_entry may use one key with different amounts; the log
  // then keeps its newest entries up to the new amount.
  auto store = Make(Options());
  const Limit five = L("5 per minute"), three = L("3 per minute"),
              eight = L("8 per minute");
  int64_t now = kT0;
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(
        Hit(*store, Strategy::kMovingWindow, five, "k", now += kMs).allowed);
  }
  Decision d = Hit(*store, Strategy::kMovingWindow, three, "k", now += kMs);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  for (int i = 0; i < 4; ++i) {
    d = Hit(*store, Strategy::kMovingWindow, eight, "k", now += kMs);
    EXPECT_TRUE(d.allowed) << i;
  }
  d = Hit(*store, Strategy::kMovingWindow, eight, "k", now += kMs);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.reset_nanos, kT0 + kMs + 60 * kSec);
  const Request r{Strategy::kMovingWindow, &eight, "k", 1};
  EXPECT_EQ(store->Inspect(r, now).count, 8);
  EXPECT_EQ(store->Stats().mismatches, 0u);
}

// The doubles of a state the script stored (little-endian).
std::vector<double> StoredDoubles(const std::string& value) {
  std::vector<double> out(value.size() / sizeof(double));
  std::memcpy(out.data(), value.data(), out.size() * sizeof(double));
  return out;
}

TEST_F(RedisStoreTest, KeysOutliveTheirStateBySlack) {
  // TTLs only collect garbage, but must never drop live state: after every
  // write, PTTL >= (end of the key's state - now) + slack.
  RedisStoreOptions o = Options();
  o.blocked_cache = false;
  auto store = Make(o);
  const int64_t slack_ms = o.ttl_slack_nanos / kMs;
  const Limit limits[] = {L("5 per second"), L("20 per 3 seconds"),
                          L("3 per minute", 2)};
  std::mt19937_64 rng(7);
  int64_t now = SystemClock()->NowNanos();
  for (int step = 0; step < 300; ++step) {
    now += static_cast<int64_t>(rng() % (300 * kMs));
    const Limit& l = limits[rng() % 3];
    for (Strategy s :
         {Strategy::kFixedWindow, Strategy::kMovingWindow,
          Strategy::kSlidingWindowCounter, Strategy::kTokenBucket}) {
      const std::string key = "LIMITER/ttl/" + std::to_string(l.amount);
      Hit(*store, s, l, key, now, 1 + static_cast<int64_t>(rng() % 2));
      const Request r{s, &l, key, 1};
      const WindowState w = store->Inspect(r, now);
      int64_t end = 0;  // when the state is void
      switch (s) {
        case Strategy::kFixedWindow:
        case Strategy::kTokenBucket:
          end = w.time_nanos;
          break;
        case Strategy::kSlidingWindowCounter:
          end = now + w.current_ttl_nanos;
          break;
        case Strategy::kMovingWindow:
          end = now + l.PeriodNanos() + 1;  // at most: newest is <= now
          break;
      }
      // Every strategy's state outlives a hit (a state Inspect could not
      // read comes back empty).
      ASSERT_GT(end, now) << StrategyName(s) << " step " << step;
      const testing::Reply pttl =
          server_.Command({"PTTL", store->RedisKey(s, key)});
      ASSERT_EQ(pttl.type, REDIS_REPLY_INTEGER);
      EXPECT_GE(pttl.integer + 50, (end - now) / kMs + slack_ms)
          << StrategyName(s) << " step " << step;
      EXPECT_LT(pttl.integer, 3 * 60'000 + 10'000) << StrategyName(s);
      if (s != Strategy::kMovingWindow) {
        // Writes within a window rewrite the leading values in place: the
        // layout (3 or 4 doubles) must not change.
        const testing::Reply len =
            server_.Command({"STRLEN", store->RedisKey(s, key)});
        EXPECT_EQ(len.integer, s == Strategy::kFixedWindow ? 24 : 32)
            << StrategyName(s) << " step " << step;
      }
      if (s == Strategy::kTokenBucket || s == Strategy::kSlidingWindowCounter) {
        // Their fourth value is the horizon, the caller-time second up to
        // which the TTL keeps the key; a write that would outlive it renews
        // the TTL. Redis' own clock hardly moves in this test, so PTTL
        // above cannot tell a renewal from none: the horizon can.
        const std::vector<double> v = StoredDoubles(
            server_.Command({"GET", store->RedisKey(s, key)}).str);
        ASSERT_EQ(v.size(), 4u) << StrategyName(s);
        EXPECT_GE(static_cast<int64_t>(v[3]) * kSec, end)
            << StrategyName(s) << " step " << step;
      }
    }
    if (HasFailure()) return;
  }
}

// --------------------------------------------------------- one round trip

TEST_F(RedisStoreTest, OneCommandPerDecisionWithSeveralLimits) {
  auto store = Make(Options());
  const Limit a = L("100 per second"), b = L("1000 per minute"),
              c = L("10000 per hour");
  ASSERT_TRUE(server_.Command({"CONFIG", "RESETSTAT"}).ok());
  for (int i = 0; i < 25; ++i) {
    const std::string key = "LIMITER/client" + std::to_string(i % 3) + "/r";
    Request reqs[3] = {{Strategy::kFixedWindow, &a, key, 1},
                       {Strategy::kSlidingWindowCounter, &b, key, 1},
                       {Strategy::kTokenBucket, &c, key, 1}};
    Decision out[3];
    EXPECT_EQ(store->Decide(reqs, 3, kT0 + i * kMs, Mode::kHit, out), 3u);
    EXPECT_EQ(out[2].remaining, 10000 - 1 - i / 3);
  }
  // commandstats also counts the commands scripts run (get, set,
  // setrange): the client's own commands are the EVALSHAs, one per
  // decision.
  const auto calls = server_.CommandCalls();
  EXPECT_EQ(calls.at("evalsha"), 25);
  EXPECT_EQ(calls.count("eval"), 0u);
  EXPECT_EQ(calls.at("get"), 75);  // 3 limits per script call
  for (const auto& [name, count] : calls) {
    EXPECT_TRUE(name == "evalsha" || name == "get" || name == "set" ||
                name == "setrange" || name == "config|resetstat")
        << name << " " << count;
  }
}

TEST_F(RedisStoreTest, ScriptReloadAfterScriptFlush) {
  auto store = Make(Options());
  const Limit l = L("10 per minute");
  EXPECT_TRUE(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).allowed);
  ASSERT_TRUE(server_.Command({"SCRIPT", "FLUSH"}).ok());
  const Decision d = Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + 1);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.source, DecisionSource::kStore);
  EXPECT_EQ(d.remaining, 8);
  EXPECT_EQ(store->Stats().script_reloads, 1u);
  ASSERT_TRUE(server_.Command({"CONFIG", "RESETSTAT"}).ok());
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + 2).remaining, 7);
  EXPECT_EQ(server_.CommandCalls().count("eval"), 0u);  // back to EVALSHA
}

TEST_F(RedisStoreTest, EvalWhenEvalshaIsRefused) {
  ASSERT_TRUE(server_
                  .Command({"ACL", "SETUSER", "limited", "on", ">pw", "~*",
                            "+@all", "-evalsha"})
                  .ok());
  RedisStoreOptions o = Options();
  o.username = "limited";
  o.password = "pw";
  auto store = Make(o);
  const Limit l = L("2 per minute");
  EXPECT_TRUE(Hit(*store, Strategy::kMovingWindow, l, "k", kT0).allowed);
  EXPECT_TRUE(Hit(*store, Strategy::kMovingWindow, l, "k", kT0 + 1).allowed);
  const Decision d = Hit(*store, Strategy::kMovingWindow, l, "k", kT0 + 2);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.source, DecisionSource::kStore);
  EXPECT_GE(server_.CommandCalls()["eval"], 3);
}

TEST_F(RedisStoreTest, WrongPasswordAppliesPolicy) {
  ASSERT_TRUE(
      server_.Command({"ACL", "SETUSER", "u2", "on", ">right", "~*", "+@all"})
          .ok());
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailOpen);
  o.username = "u2";
  o.password = "wrong";
  auto store = Make(o);
  EXPECT_FALSE(store->Connected());
  const Decision d =
      Hit(*store, Strategy::kFixedWindow, L("1 per minute"), "k", kT0);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.source, DecisionSource::kFailOpen);
}

TEST_F(RedisStoreTest, UserWithoutPasswordAuthenticates) {
  ASSERT_TRUE(
      server_.Command({"ACL", "SETUSER", "np", "on", "nopass", "~*", "+@all"})
          .ok());
  RedisStoreOptions o;
  std::string error;
  ASSERT_TRUE(ParseRedisUri(
      "redis://np@127.0.0.1:" + std::to_string(server_.port()), &o, &error))
      << error;
  auto store = Make(o);
  ASSERT_TRUE(store->Connected());
  EXPECT_EQ(
      Hit(*store, Strategy::kFixedWindow, L("1 per minute"), "k", kT0).source,
      DecisionSource::kStore);
  const testing::Reply clients = server_.Command({"CLIENT", "LIST"});
  EXPECT_NE(clients.str.find("user=np "), std::string::npos) << clients.str;
}

TEST_F(RedisStoreTest, ConnectionClosedWhileIdleIsNoOutage) {
  // Redis closes the idle connection (its `timeout`, CLIENT KILL, a
  // proxy) and the next request comes before the I/O thread has replaced
  // it: the request waits for the new connection instead of getting the
  // policy. Idle past the lane's 20 ms check, as such connections are.
  auto store = Make(Options(RedisFailurePolicy::kFailClosed));
  ASSERT_TRUE(store->Connected());
  const Limit l = L("1000 per minute");
  for (int i = 0; i < 30; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
    ASSERT_TRUE(server_.Command({"CLIENT", "KILL", "TYPE", "normal"}).ok());
    const Decision d = Hit(*store, Strategy::kFixedWindow, l, "k", kT0);
    ASSERT_EQ(d.source, DecisionSource::kStore) << "request " << i;
    EXPECT_EQ(d.remaining, 1000 - (i + 1));
  }
}

TEST_F(RedisStoreTest, UnixSocketAndDatabase) {
  RedisStoreOptions o;
  std::string error;
  ASSERT_TRUE(ParseRedisUri("redis+unix://" + server_.unix_path() + "?db=3", &o,
                            &error))
      << error;
  auto store = Make(o);
  ASSERT_TRUE(store->Connected());
  EXPECT_TRUE(
      Hit(*store, Strategy::kTokenBucket, L("5/second"), "k", kT0).allowed);
  const testing::Reply info = server_.Command({"INFO", "keyspace"});
  EXPECT_NE(info.str.find("db3:keys=1"), std::string::npos) << info.str;
}

TEST_F(RedisStoreTest, KeysCarryHashTagAndPrefix) {
  RedisStoreOptions o = Options();
  o.key_prefix = "app:";
  auto store = Make(o);
  EXPECT_EQ(
      store->RedisKey(Strategy::kFixedWindow, "LIMITER/1.2.3.4/r/5/1/minute"),
      "app:fw:{1.2.3.4}LIMITER/1.2.3.4/r/5/1/minute");
  Hit(*store, Strategy::kFixedWindow, L("5/minute"), "LIMITER/1.2.3.4/r", kT0);
  const testing::Reply keys = server_.Command({"KEYS", "*"});
  ASSERT_EQ(keys.elements.size(), 1u);
  EXPECT_EQ(keys.elements[0].str, "app:fw:{1.2.3.4}LIMITER/1.2.3.4/r");
}

// ------------------------------------------------- admin: incr/clear/reset

TEST_F(RedisStoreTest, IncrClearResetSize) {
  auto store = Make(Options());
  int64_t expiry = 0;
  EXPECT_EQ(store->Incr("LIMITER/k", 10 * kSec, 3, kT0, &expiry), 3);
  EXPECT_EQ(expiry, kT0 + 10 * kSec);
  EXPECT_EQ(store->Incr("LIMITER/k", 10 * kSec, 2, kT0 + kSec, &expiry), 5);
  EXPECT_EQ(expiry, kT0 + 10 * kSec);
  const Limit l = L("1 per 10 seconds");
  Request r{Strategy::kFixedWindow, &l, "LIMITER/k", 0};
  EXPECT_EQ(store->Inspect(r, kT0 + kSec).count, 5);
  Hit(*store, Strategy::kMovingWindow, l, "LIMITER/m", kT0);
  Hit(*store, Strategy::kTokenBucket, l, "LIMITER/t", kT0);
  EXPECT_EQ(store->Size(), 3u);
  EXPECT_TRUE(store->Clear(Strategy::kFixedWindow, "LIMITER/k"));
  EXPECT_FALSE(store->Clear(Strategy::kFixedWindow, "LIMITER/k"));
  EXPECT_EQ(store->Inspect(r, kT0 + kSec).count, 0);
  server_.Command({"SET", "unrelated", "1"});
  // Under the prefix and matching the scan's pattern, but no strategy's
  // ("tw:" is no code): neither counted nor removed.
  const std::string key = store->RedisKey(Strategy::kTokenBucket, "LIMITER/t");
  const std::string alien = key.substr(0, key.find("tb:{")) + "tw:{t}t";
  ASSERT_TRUE(server_.Command({"SET", alien, "1"}).ok());
  server_.Command({"CONFIG", "RESETSTAT"});
  EXPECT_EQ(store->Size(), 2u);
  // One scan of the keyspace for every strategy (a page: under 1,000 keys).
  EXPECT_EQ(server_.CommandCalls()["scan"], 1);
  EXPECT_EQ(store->Reset(), 2u);
  EXPECT_EQ(server_.CommandCalls()["scan"], 2);
  EXPECT_EQ(store->Size(), 0u);
  EXPECT_EQ(server_.Command({"GET", "unrelated"}).str, "1");
  EXPECT_EQ(server_.Command({"GET", alien}).str, "1");
}

TEST_F(RedisStoreTest, AdminCallsSayWhenRedisDidNotAnswer) {
  // An administrator's reset must not pass for done when Redis did not
  // answer; the in-process state (blocked-key cache, fallback) is cleared
  // whatever happens.
  auto store = Make(Options(RedisFailurePolicy::kFallback));
  const Limit l = L("1 per minute");
  EXPECT_TRUE(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).allowed);
  EXPECT_FALSE(Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + 1).allowed);
  size_t n = 0;
  bool existed = false;
  EXPECT_TRUE(store->TrySize(&n));
  EXPECT_EQ(n, 1u);
  EXPECT_TRUE(store->TryClear(Strategy::kFixedWindow, "nothing", &existed));
  EXPECT_FALSE(existed);
  server_.Kill();
  // Counted in the fallback, and cached as blocked there.
  EXPECT_TRUE(Hit(*store, Strategy::kFixedWindow, l, "f", kT0).allowed);
  EXPECT_FALSE(Hit(*store, Strategy::kFixedWindow, l, "f", kT0 + 1).allowed);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(store->TrySize(&n));
  EXPECT_FALSE(store->TryClear(Strategy::kFixedWindow, "k", &existed));
  EXPECT_FALSE(existed);
  EXPECT_FALSE(store->TryReset(&n));
  EXPECT_EQ(n, 0u);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  // The fallback's counts went with the reset.
  const Decision d = Hit(*store, Strategy::kFixedWindow, l, "f", kT0 + 2);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.source, DecisionSource::kFallback);
}

// ---------------------------------------------------------- concurrency

TEST_F(RedisStoreTest, ExactAdmissionAcrossThreadsAndConnections) {
  RedisStoreOptions o = Options();
  o.pool_size = 3;
  o.command_timeout_nanos = 2 * kSec;
  auto store = Make(o);
  auto other = Make(o);  // a second "app instance"
  const Limit l = L("500 per hour");
  std::atomic<int> allowed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      Store& s = t % 2 == 0 ? static_cast<Store&>(*store) : *other;
      for (int i = 0; i < 100; ++i) {
        if (Hit(s, Strategy::kFixedWindow, l, "LIMITER/one", kT0 + i).allowed) {
          allowed.fetch_add(1);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(allowed.load(), 500);
}

struct AsyncWait {
  std::mutex mu;
  std::condition_variable cv;
  int pending = 0;
  int allowed = 0;
  std::vector<DecisionSource> sources;
};

void AsyncDone(void* ctx, const Decision* d, size_t written, size_t) {
  auto* w = static_cast<AsyncWait*>(ctx);
  std::lock_guard<std::mutex> lock(w->mu);
  if (written > 0 && d[written - 1].allowed) ++w->allowed;
  if (written > 0) w->sources.push_back(d[written - 1].source);
  if (--w->pending == 0) w->cv.notify_all();
}

// Queues a deferred fixed-window hit of `key` at kT0, one more answer for
// `w` to wait for.
void DeferHit(RedisStore& store, const Limit& l, const std::string& key,
              AsyncWait* w) {
  {
    std::lock_guard<std::mutex> lock(w->mu);
    ++w->pending;
  }
  Request r{Strategy::kFixedWindow, &l, key, 1};
  store.DecideAsyncDeferred(&r, 1, kT0, Mode::kHit, &AsyncDone, w);
}

// Waits up to `limit` for `w`'s requests. On a timeout `store` is closed
// first, which completes the requests left: their callbacks must run
// while what they write to (on the test's stack) still exists.
bool WaitAll(AsyncWait& w, RedisStore& store, std::chrono::seconds limit) {
  {
    std::unique_lock<std::mutex> lock(w.mu);
    if (w.cv.wait_for(lock, limit, [&] { return w.pending == 0; })) {
      return true;
    }
  }
  store.Close();
  return false;
}

TEST_F(RedisStoreTest, AsyncDecisionsArePipelined) {
  RedisStoreOptions o = Options();
  o.command_timeout_nanos = 2 * kSec;
  auto store = Make(o);
  const Limit l = L("300 per hour"), wide = L("100000 per hour");
  AsyncWait w;
  const int kThreads = 4, kEach = 250;
  w.pending = kThreads * kEach;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kEach; ++i) {
        Request reqs[2] = {
            {Strategy::kSlidingWindowCounter, &wide, "LIMITER/a", 1},
            {Strategy::kMovingWindow, &l, "LIMITER/a", 1}};
        store->DecideAsync(reqs, 2, kT0 + i, Mode::kHit, &AsyncDone, &w);
      }
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(20)));
  EXPECT_EQ(w.allowed, 300);
  const RedisStoreStats s = store->Stats();
  // Every request is one script call: its first limit is never blocked,
  // so it goes to Redis even when the cache answers for the second. How
  // often the cache does depends on how many rejections came back while
  // requests were still being queued: none when the threads queue faster
  // than Redis answers, hundreds when they are slowed (a loaded machine).
  // The calls were batched into writes.
  EXPECT_EQ(s.calls, 1000u);
  EXPECT_LT(s.writes, s.calls);
  EXPECT_EQ(s.fail_closed, 0u);
}

// One request's answer, filled by its completion.
struct Slot {
  AsyncWait* wait = nullptr;
  std::vector<Decision> decisions;
  size_t first_reject = 0;
};

void SlotDone(void* ctx, const Decision* d, size_t written,
              size_t first_reject) {
  auto* slot = static_cast<Slot*>(ctx);
  slot->decisions.assign(d, d + written);
  slot->first_reject = first_reject;
  std::lock_guard<std::mutex> lock(slot->wait->mu);
  if (--slot->wait->pending == 0) slot->wait->cv.notify_all();
}

TEST_F(RedisStoreTest, RequestsQueuedTogetherShareScriptCallsWithSameAnswers) {
  // Requests queued at once leave in shared script calls (several requests,
  // several limits each, hits and tests, on overlapping keys); every answer
  // must be the one the memory store gives for the same sequence.
  RedisStoreOptions o = Options();
  o.command_timeout_nanos = 5 * kSec;
  o.blocked_cache = false;
  auto store = Make(o);
  auto memory = NewMemoryStore();
  const std::vector<Limit> limits = {L("3 per second"), L("5 per 2 seconds"),
                                     L("4 per 10 seconds", 2),
                                     L("10000 per hour")};
  const std::vector<Strategy> strategies = {
      Strategy::kFixedWindow, Strategy::kMovingWindow,
      Strategy::kSlidingWindowCounter, Strategy::kTokenBucket};
  std::mt19937_64 rng(7);
  const int kRequests = 600;
  std::vector<std::vector<std::string>> keys(kRequests);
  std::vector<std::vector<Request>> reqs(kRequests);
  std::vector<Mode> modes(kRequests);
  std::vector<int64_t> times(kRequests);
  std::vector<Slot> slots(kRequests);
  AsyncWait w;
  w.pending = kRequests;
  int64_t now = kT0;
  for (int r = 0; r < kRequests; ++r) {
    now += static_cast<int64_t>(rng() % (150 * kMs));
    times[r] = now;
    modes[r] = rng() % 8 == 0 ? Mode::kTest : Mode::kHit;
    const size_t n = 1 + rng() % 3;
    keys[r].resize(n);
    reqs[r].resize(n);
    for (size_t i = 0; i < n; ++i) {
      const size_t li = rng() % limits.size();
      keys[r][i] =
          "LIMITER/c" + std::to_string(rng() % 3) + "/" + std::to_string(li);
      reqs[r][i] = {strategies[rng() % strategies.size()], &limits[li],
                    keys[r][i], static_cast<int64_t>(rng() % 4 == 0 ? 2 : 1)};
    }
    slots[r].wait = &w;
    store->DecideAsyncDeferred(reqs[r].data(), n, now, modes[r], &SlotDone,
                               &slots[r]);
  }
  store->Flush();
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(30)));
  for (int r = 0; r < kRequests; ++r) {
    const size_t n = reqs[r].size();
    std::vector<Decision> want(n);
    const size_t first =
        memory->Decide(reqs[r].data(), n, times[r], modes[r], want.data());
    const std::string ctx = "request " + std::to_string(r);
    ASSERT_EQ(slots[r].first_reject, first) << ctx;
    const size_t written =
        (modes[r] == Mode::kHit && first < n) ? first + 1 : n;
    ASSERT_EQ(slots[r].decisions.size(), written) << ctx;
    for (size_t i = 0; i < written; ++i) {
      ExpectSame(want[i], slots[r].decisions[i],
                 ctx + " limit " + std::to_string(i));
      EXPECT_EQ(slots[r].decisions[i].source, DecisionSource::kStore) << ctx;
    }
    if (HasFailure()) return;
  }
  // Each bucket's TTL was renewed within the shared calls whenever a TAT
  // reached the stored horizon (see KeysOutliveTheirStateBySlack): the TAT
  // stored is before the horizon, in whole seconds.
  int buckets = 0;
  for (size_t li = 0; li < limits.size(); ++li) {
    for (int c = 0; c < 3; ++c) {
      const std::string k =
          "LIMITER/c" + std::to_string(c) + "/" + std::to_string(li);
      const std::string value =
          server_.Command({"GET", store->RedisKey(Strategy::kTokenBucket, k)})
              .str;
      if (value.empty()) continue;
      const std::vector<double> v = StoredDoubles(value);
      ASSERT_EQ(v.size(), 4u) << k;
      EXPECT_LT(v[0], v[3]) << k;  // (tat_s, tat_ns, tat_frac, horizon_s)
      ++buckets;
    }
  }
  EXPECT_GE(buckets, 6);
  const RedisStoreStats s = store->Stats();
  EXPECT_EQ(s.calls, static_cast<uint64_t>(kRequests));
  EXPECT_LT(s.scripts, s.calls / 4);  // shared calls, not one per request
  EXPECT_EQ(s.mismatches, 0u);
  EXPECT_EQ(s.errors, 0u);
}

TEST_F(RedisStoreTest, BucketsHitInSharedCallsRenewTheirTtl) {
  // A token-bucket hit alone in its request but in a call shared with
  // others takes the script's fast path for such requests; one whose TAT
  // reaches the stored horizon must renew the key's TTL there too, as a
  // lone call does (KeysOutliveTheirStateBySlack): the horizon moves on.
  RedisStoreOptions o = Options();
  o.command_timeout_nanos = 5 * kSec;
  o.blocked_cache = false;
  auto store = Make(o);
  const Limit l = L("20 per second");  // 2 s of horizon at a time
  const int kRequests = 200;           // 10 per second for 20 s
  const Request req{Strategy::kTokenBucket, &l, "LIMITER/renew", 1};
  std::vector<Slot> slots(kRequests);
  AsyncWait w;
  w.pending = kRequests;
  for (int r = 0; r < kRequests; ++r) {
    slots[r].wait = &w;
    store->DecideAsyncDeferred(&req, 1, kT0 + r * 100 * kMs, Mode::kHit,
                               &SlotDone, &slots[r]);
  }
  store->Flush();
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(30)));
  for (const Slot& s : slots) {
    ASSERT_EQ(s.decisions.size(), 1u);
    EXPECT_TRUE(s.decisions[0].allowed);
  }
  EXPECT_LT(store->Stats().scripts, kRequests / 4);
  const std::vector<double> v =
      StoredDoubles(server_
                        .Command({"GET", store->RedisKey(Strategy::kTokenBucket,
                                                         "LIMITER/renew")})
                        .str);
  ASSERT_EQ(v.size(), 4u);  // (tat_s, tat_ns, tat_frac, horizon_s)
  EXPECT_EQ(static_cast<int64_t>(v[0]) * kSec + static_cast<int64_t>(v[1]),
            kT0 + 199 * 100 * kMs + 50 * kMs);
  EXPECT_LT(v[0], v[3]);
}

TEST_F(RedisStoreTest, RefusedKeyGetsThePolicyAloneInItsScriptCall) {
  // A key holding another type of value (an application's list under the
  // same name, a key_prefix shared with the application) makes Redis
  // refuse the script's reads of it. Queued with innocent requests in one
  // script call, the request it belongs to must get the failure policy
  // alone and write nothing; the others are decided and counted once (a
  // Lua error stopped the whole call: every request got the policy, and
  // the writes made for those before the bad one stayed in Redis).
  const Limit l = L("10 per minute");
  for (RedisFailurePolicy policy :
       {RedisFailurePolicy::kFailClosed, RedisFailurePolicy::kFallback,
        RedisFailurePolicy::kFailOpen}) {
    const std::string name(RedisFailurePolicyName(policy));
    SCOPED_TRACE(name);
    RedisStoreOptions o = Options(policy);
    o.command_timeout_nanos = 5 * kSec;
    o.blocked_cache = false;
    o.key_prefix = name + ":";
    auto store = Make(o);
    const auto key = [&](Strategy s, const std::string& k) {
      return store->RedisKey(s, k);
    };
    const auto get = [&](Strategy s, const std::string& k) {
      return server_.Command({"GET", key(s, k)});
    };
    // Every strategy, each against another type of value, and a string the
    // script did not write.
    const std::vector<std::vector<std::string>> foreign = {
        {"LPUSH", key(Strategy::kFixedWindow, "LIMITER/bad-fw"), "x"},
        {"ZADD", key(Strategy::kMovingWindow, "LIMITER/bad-mw"), "1", "x"},
        {"HSET", key(Strategy::kSlidingWindowCounter, "LIMITER/bad-sw"), "f",
         "x"},
        {"SADD", key(Strategy::kTokenBucket, "LIMITER/bad-tb"), "x"},
        {"SET", key(Strategy::kFixedWindow, "LIMITER/bad-str"), "hello"},
        // Strings as long as a moving window's log, with no ring's header:
        // read as one, '0's were an empty log to write over, 'x's an offset
        // GETRANGE refused (a Lua error for the whole call).
        {"SET", key(Strategy::kMovingWindow, "LIMITER/bad-mw0"),
         std::string(100, '0')},
        {"SET", key(Strategy::kMovingWindow, "LIMITER/bad-mwx"),
         std::string(100, 'x')}};
    for (const auto& argv : foreign) ASSERT_TRUE(server_.Command(argv).ok());
    // A ring's header (base, head, size, cap, expiry, horizon; a log live
    // at now) with the rest not a ring's: its entries missing, the string
    // ending at the header or within them, which read as a ring was a Lua
    // error (unpack of a short GETRANGE) once written to; a base out of
    // range, which made the TTL a number PEXPIRE refused.
    const auto ring = [](double base, double head, double size,
                         int64_t entries) {
      const double now_s = static_cast<double>(kT0 / kSec);
      std::string v;
      for (double d :
           {base, head, size, 10.0, now_s + 1000, 0.0, now_s + 2000}) {
        v.append(reinterpret_cast<const char*>(&d), sizeof(d));
      }
      return v + std::string(static_cast<size_t>(entries) * 8, '\0');
    };
    const double base = static_cast<double>(kT0 / kSec);
    const std::vector<std::pair<std::string, std::string>> rings = {
        {"LIMITER/bad-mw-cut", ring(base, 0, 3, 0)},
        {"LIMITER/bad-mw-short", ring(base, 5, 10, 6)},
        {"LIMITER/bad-mw-base", ring(1e300, 0, 1, 1)}};
    for (const auto& [k, v] : rings) {
      ASSERT_TRUE(
          server_.Command({"SET", key(Strategy::kMovingWindow, k), v}).ok());
    }
    // Values of a state's length whose numbers made a write's TTL one
    // Redis refuses (a Lua error for the whole call): a live bucket's TAT
    // ns of -1e18 (a negative PX when the TTL is renewed; with a horizon
    // ahead the fast path wrote over the value instead), a sliding window's
    // index 1e20 (a PX beyond what Redis reads as an integer).
    const auto doubles = [](std::initializer_list<double> ds) {
      std::string v;
      for (double d : ds) v.append(reinterpret_cast<const char*>(&d), 8);
      return v;
    };
    const std::vector<std::tuple<Strategy, std::string, std::string>> numbers =
        {{Strategy::kTokenBucket, "LIMITER/bad-tb-ns",
          doubles({base + 1, -1e18, 0, 0})},
         {Strategy::kTokenBucket, "LIMITER/bad-tb-hs",
          doubles({base + 1, -1e18, 0, base + 1e6})},
         {Strategy::kSlidingWindowCounter, "LIMITER/bad-sw-ahead",
          doubles({1e20, 1, 0, 0})}};
    for (const auto& [s, k, v] : numbers) {
      ASSERT_TRUE(server_.Command({"SET", key(s, k), v}).ok());
    }
    EXPECT_TRUE(Hit(*store, Strategy::kFixedWindow, l, "warm", kT0).allowed);

    // Alone in their calls.
    const std::vector<std::pair<Strategy, std::string>> alone = {
        {Strategy::kFixedWindow, "LIMITER/bad-fw"},
        {Strategy::kTokenBucket, "LIMITER/bad-tb-ns"},
        {Strategy::kTokenBucket, "LIMITER/bad-tb-hs"},
        {Strategy::kSlidingWindowCounter, "LIMITER/bad-sw-ahead"}};
    for (const auto& [s, k] : alone) {
      SCOPED_TRACE(k);
      EXPECT_NE(Hit(*store, s, l, k, kT0).source, DecisionSource::kStore);
    }
    EXPECT_EQ(store->Stats().errors, alone.size());

    struct Req {
      std::vector<std::pair<Strategy, std::string>> limits;
      bool bad;
      Mode mode = Mode::kHit;
    };
    const std::vector<Req> spec = {
        {{{Strategy::kFixedWindow, "LIMITER/fw"}}, false},
        {{{Strategy::kFixedWindow, "LIMITER/bad-fw"}}, true},
        {{{Strategy::kMovingWindow, "LIMITER/mw"}}, false},
        {{{Strategy::kMovingWindow, "LIMITER/bad-mw"}}, true},
        {{{Strategy::kSlidingWindowCounter, "LIMITER/sw"}}, false},
        {{{Strategy::kSlidingWindowCounter, "LIMITER/bad-sw"}}, true},
        {{{Strategy::kTokenBucket, "LIMITER/tb"}}, false},
        {{{Strategy::kTokenBucket, "LIMITER/bad-tb"}}, true},
        // Several limits: a refused second key leaves the first uncounted.
        {{{Strategy::kFixedWindow, "LIMITER/first-fw"},
          {Strategy::kSlidingWindowCounter, "LIMITER/bad-sw"}},
         true},
        {{{Strategy::kTokenBucket, "LIMITER/first-tb"},
          {Strategy::kMovingWindow, "LIMITER/first-mw"},
          {Strategy::kFixedWindow, "LIMITER/bad-str"}},
         true},
        {{{Strategy::kFixedWindow, "LIMITER/fw2"},
          {Strategy::kMovingWindow, "LIMITER/mw2"}},
         false},
        {{{Strategy::kMovingWindow, "LIMITER/bad-mw0"}}, true},
        {{{Strategy::kFixedWindow, "LIMITER/first-fw2"},
          {Strategy::kMovingWindow, "LIMITER/bad-mwx"}},
         true},
        {{{Strategy::kFixedWindow, "LIMITER/fw"}}, false},
        // Rings with a header and not the rest: alone, and after a limit
        // of the request it leaves uncounted.
        {{{Strategy::kMovingWindow, "LIMITER/bad-mw-cut"}}, true},
        {{{Strategy::kFixedWindow, "LIMITER/first-fw3"},
          {Strategy::kMovingWindow, "LIMITER/bad-mw-short"}},
         true},
        {{{Strategy::kMovingWindow, "LIMITER/first-mw3"},
          {Strategy::kMovingWindow, "LIMITER/bad-mw-base"}},
         true},
        {{{Strategy::kMovingWindow, "LIMITER/bad-mw-short"}}, true},
        {{{Strategy::kMovingWindow, "LIMITER/bad-mw-base"}}, true},
        {{{Strategy::kFixedWindow, "LIMITER/fw"},
          {Strategy::kTokenBucket, "LIMITER/bad-tb"}},
         true,
         Mode::kTest},
        {{{Strategy::kSlidingWindowCounter, "LIMITER/sw"},
          {Strategy::kTokenBucket, "LIMITER/tb"}},
         false,
         Mode::kTest},
        // Numbers no state has: alone, after a limit of the request they
        // leave uncounted, and in a test.
        {{{Strategy::kTokenBucket, "LIMITER/bad-tb-ns"}}, true},
        {{{Strategy::kTokenBucket, "LIMITER/bad-tb-hs"}}, true},
        {{{Strategy::kSlidingWindowCounter, "LIMITER/bad-sw-ahead"}}, true},
        {{{Strategy::kFixedWindow, "LIMITER/first-fw4"},
          {Strategy::kTokenBucket, "LIMITER/bad-tb-ns"}},
         true},
        {{{Strategy::kTokenBucket, "LIMITER/first-tb2"},
          {Strategy::kTokenBucket, "LIMITER/bad-tb-hs"}},
         true},
        {{{Strategy::kTokenBucket, "LIMITER/first-tb3"},
          {Strategy::kSlidingWindowCounter, "LIMITER/bad-sw-ahead"}},
         true},
        {{{Strategy::kFixedWindow, "LIMITER/fw"},
          {Strategy::kSlidingWindowCounter, "LIMITER/bad-sw-ahead"}},
         true,
         Mode::kTest},
        {{{Strategy::kFixedWindow, "LIMITER/fw"}}, false},
    };
    const size_t n = spec.size();
    std::vector<std::vector<Request>> reqs(n);
    for (size_t r = 0; r < n; ++r) {
      for (const auto& [strategy, k] : spec[r].limits) {
        reqs[r].push_back({strategy, &l, k, 1});
      }
    }
    std::vector<Slot> slots(n);
    AsyncWait w;
    w.pending = static_cast<int>(n);
    const RedisStoreStats before = store->Stats();
    for (size_t r = 0; r < n; ++r) {
      slots[r].wait = &w;
      store->DecideAsyncDeferred(reqs[r].data(), reqs[r].size(), kT0 + kMs,
                                 spec[r].mode, &SlotDone, &slots[r]);
    }
    store->Flush();
    ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(30)));
    const RedisStoreStats after = store->Stats();
    ASSERT_EQ(after.scripts - before.scripts, 1u);  // all in one call
    int refused = 0;
    for (size_t r = 0; r < n; ++r) {
      SCOPED_TRACE("request " + std::to_string(r));
      const std::vector<Decision>& d = slots[r].decisions;
      ASSERT_FALSE(d.empty());
      if (!spec[r].bad) {
        EXPECT_EQ(d.size(), reqs[r].size());
        for (const Decision& one : d) {
          EXPECT_TRUE(one.allowed);
          EXPECT_EQ(one.source, DecisionSource::kStore);
        }
        continue;
      }
      ++refused;
      switch (policy) {
        case RedisFailurePolicy::kFailClosed:
          EXPECT_FALSE(d.back().allowed);
          EXPECT_EQ(d.back().source, DecisionSource::kFailClosed);
          break;
        case RedisFailurePolicy::kFallback:
          // Counted once, in memory (the keys hit alone before, and a
          // key of an earlier refused request was counted there).
          EXPECT_TRUE(d.back().allowed);
          EXPECT_EQ(d.back().source, DecisionSource::kFallback);
          if (spec[r].mode == Mode::kHit) {
            const std::string& k = spec[r].limits[0].second;
            int64_t before = 0;
            for (const auto& one : alone) before += one.second == k;
            for (size_t e = 0; e < r; ++e) {
              if (!spec[e].bad || spec[e].mode != Mode::kHit) continue;
              for (const auto& limit : spec[e].limits) {
                before += limit.second == k;
              }
            }
            EXPECT_EQ(d[0].remaining, 9 - before);
          }
          break;
        case RedisFailurePolicy::kFailOpen:
          EXPECT_TRUE(d.back().allowed);
          EXPECT_EQ(d.back().source, DecisionSource::kFailOpen);
          break;
      }
    }
    EXPECT_EQ(after.errors - before.errors, static_cast<uint64_t>(refused));
    EXPECT_EQ(after.mismatches, 0u);

    // Counted once each, in Redis: "fw" by three requests.
    const auto stored = [&](Strategy s, const std::string& k) {
      return StoredDoubles(get(s, k).str);
    };
    EXPECT_EQ(stored(Strategy::kFixedWindow, "LIMITER/fw").at(0), 3);
    EXPECT_EQ(stored(Strategy::kFixedWindow, "LIMITER/fw2").at(0), 1);
    // The moving window's header: base, head, size ...
    EXPECT_EQ(stored(Strategy::kMovingWindow, "LIMITER/mw").at(2), 1);
    EXPECT_EQ(stored(Strategy::kMovingWindow, "LIMITER/mw2").at(2), 1);
    // The sliding window: window, current, previous, horizon.
    EXPECT_EQ(stored(Strategy::kSlidingWindowCounter, "LIMITER/sw").at(1), 1);
    // The token bucket's TAT: one token (6 s) after now.
    const std::vector<double> tat =
        stored(Strategy::kTokenBucket, "LIMITER/tb");
    ASSERT_GE(tat.size(), 2u);
    EXPECT_EQ(
        static_cast<int64_t>(tat[0]) * kSec + static_cast<int64_t>(tat[1]),
        kT0 + kMs + 6 * kSec);
    // Nothing of the refused requests, their good keys included.
    const auto type = [&](Strategy s, const std::string& k) {
      return server_.Command({"TYPE", key(s, k)}).str;
    };
    EXPECT_EQ(type(Strategy::kFixedWindow, "LIMITER/first-fw"), "none");
    EXPECT_EQ(type(Strategy::kTokenBucket, "LIMITER/first-tb"), "none");
    EXPECT_EQ(type(Strategy::kMovingWindow, "LIMITER/first-mw"), "none");
    EXPECT_EQ(type(Strategy::kFixedWindow, "LIMITER/first-fw2"), "none");
    EXPECT_EQ(type(Strategy::kFixedWindow, "LIMITER/first-fw3"), "none");
    EXPECT_EQ(type(Strategy::kMovingWindow, "LIMITER/first-mw3"), "none");
    EXPECT_EQ(type(Strategy::kFixedWindow, "LIMITER/first-fw4"), "none");
    EXPECT_EQ(type(Strategy::kTokenBucket, "LIMITER/first-tb2"), "none");
    EXPECT_EQ(type(Strategy::kTokenBucket, "LIMITER/first-tb3"), "none");
    // The foreign values are as the application left them.
    const std::string list = key(Strategy::kFixedWindow, "LIMITER/bad-fw");
    EXPECT_EQ(server_.Command({"LLEN", list}).integer, 1);
    EXPECT_EQ(type(Strategy::kMovingWindow, "LIMITER/bad-mw"), "zset");
    EXPECT_EQ(type(Strategy::kSlidingWindowCounter, "LIMITER/bad-sw"), "hash");
    EXPECT_EQ(type(Strategy::kTokenBucket, "LIMITER/bad-tb"), "set");
    EXPECT_EQ(get(Strategy::kFixedWindow, "LIMITER/bad-str").str, "hello");
    for (const char* k : {"LIMITER/bad-mw0", "LIMITER/bad-mwx"}) {
      SCOPED_TRACE(k);
      const char fill = k[std::strlen(k) - 1] == '0' ? '0' : 'x';
      EXPECT_EQ(get(Strategy::kMovingWindow, k).str, std::string(100, fill));
      EXPECT_EQ(
          server_.Command({"TTL", key(Strategy::kMovingWindow, k)}).integer,
          -1);
    }
    for (const auto& [k, v] : rings) {
      SCOPED_TRACE(k);
      EXPECT_EQ(get(Strategy::kMovingWindow, k).str, v);
      EXPECT_EQ(
          server_.Command({"TTL", key(Strategy::kMovingWindow, k)}).integer,
          -1);
    }
    for (const auto& [s, k, v] : numbers) {
      SCOPED_TRACE(k);
      EXPECT_EQ(get(s, k).str, v);
      EXPECT_EQ(server_.Command({"TTL", key(s, k)}).integer, -1);
    }
    store->Close();
  }
}

TEST_F(RedisStoreTest, ForeignStringOfAStatesLengthGetsThePolicyAlone) {
  // 24 bytes of an application's text under a fixed window's key have a
  // state's length: the script reads them as one (and writes its count
  // over the first 8), and its reply carries numbers no state has (about
  // 1e190), which failed the whole call's reply after the script had
  // counted the other requests.
  const Limit l = L("10 per minute");
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailClosed);
  o.command_timeout_nanos = 5 * kSec;
  o.blocked_cache = false;
  auto store = Make(o);
  const std::string text = "abcdefghijklmnopqrstuvwx";
  ASSERT_TRUE(
      server_
          .Command(
              {"SET", store->RedisKey(Strategy::kFixedWindow, "text"), text})
          .ok());
  // Alone in its call (the reply is the bare value).
  const Decision alone = Hit(*store, Strategy::kFixedWindow, l, "text", kT0);
  EXPECT_EQ(alone.source, DecisionSource::kFailClosed);
  EXPECT_NE(RedisStore::LastError().find("no state"), std::string::npos)
      << RedisStore::LastError();
  // Between two innocent requests in one call.
  const std::vector<std::string> keys = {"a", "text", "b"};
  std::vector<Request> reqs;
  for (const std::string& k : keys) {
    reqs.push_back({Strategy::kFixedWindow, &l, k, 1});
  }
  std::vector<Slot> slots(keys.size());
  AsyncWait w;
  w.pending = static_cast<int>(keys.size());
  const RedisStoreStats before = store->Stats();
  for (size_t r = 0; r < keys.size(); ++r) {
    slots[r].wait = &w;
    store->DecideAsyncDeferred(&reqs[r], 1, kT0, Mode::kHit, &SlotDone,
                               &slots[r]);
  }
  store->Flush();
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(30)));
  ASSERT_EQ(store->Stats().scripts - before.scripts, 1u);
  for (size_t r = 0; r < keys.size(); ++r) {
    SCOPED_TRACE(keys[r]);
    ASSERT_EQ(slots[r].decisions.size(), 1u);
    const Decision& d = slots[r].decisions[0];
    if (keys[r] == "text") {
      EXPECT_EQ(d.source, DecisionSource::kFailClosed);
    } else {
      EXPECT_EQ(d.source, DecisionSource::kStore);
      EXPECT_TRUE(d.allowed);
      EXPECT_EQ(d.remaining, 9);
    }
  }
}

TEST_F(RedisStoreTest, RefusedKeyIsLoggedAndKnownToTheCaller) {
  RedisStoreOptions o = Options();
  o.command_timeout_nanos = 5 * kSec;
  std::mutex mu;
  std::vector<std::string> logged;
  o.log = [&](RedisLogLevel level, const std::string& message) {
    std::lock_guard<std::mutex> lock(mu);
    if (level == RedisLogLevel::kError) logged.push_back(message);
  };
  auto store = Make(o);
  const std::string bad = store->RedisKey(Strategy::kFixedWindow, "LIMITER/l");
  ASSERT_TRUE(server_.Command({"LPUSH", bad, "x"}).ok());
  const Limit l = L("5 per minute");
  const Decision d = Hit(*store, Strategy::kFixedWindow, l, "LIMITER/l", kT0);
  EXPECT_EQ(d.source, DecisionSource::kFailClosed);
  EXPECT_EQ(RedisStore::LastSource(), DecisionSource::kFailClosed);
  const std::string error = RedisStore::LastError();
  EXPECT_NE(error.find("WRONGTYPE"), std::string::npos) << error;
  EXPECT_NE(error.find(bad), std::string::npos) << error;
  // The limits adapter's incr and reads take the same way.
  int64_t expiry = 0;
  EXPECT_EQ(store->Incr("LIMITER/l", 10 * kSec, 1, kT0, &expiry),
            std::numeric_limits<int64_t>::max());
  EXPECT_EQ(RedisStore::LastSource(), DecisionSource::kFailClosed);
  EXPECT_EQ(RedisStore::LastError(), error);
  const Request r{Strategy::kFixedWindow, &l, "LIMITER/l", 1};
  EXPECT_EQ(store->Inspect(r, kT0).count, 0);
  EXPECT_EQ(RedisStore::LastError(), error);
  EXPECT_EQ(store->Stats().errors, 3u);
  EXPECT_EQ(store->Stats().disconnects, 0u);
  EXPECT_EQ(server_.Command({"LLEN", bad}).integer, 1);
  // A policy answer without a reply has no error to tell.
  store->Close();
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "LIMITER/x", kT0).source,
            DecisionSource::kFailClosed);
  EXPECT_EQ(RedisStore::LastError(), "");
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_GE(logged.size(), 3u);
  EXPECT_NE(logged[0].find("WRONGTYPE"), std::string::npos) << logged[0];
  EXPECT_NE(logged[0].find(bad), std::string::npos) << logged[0];
  EXPECT_NE(logged[0].find("fail-closed policy"), std::string::npos)
      << logged[0];
}

TEST_F(RedisStoreTest, ScriptErrorAppliesThePolicyToEveryRequestOfTheCall) {
  // A Lua error still stops the script for every request of its call.
  // Here Redis refuses a write to a key the script's ACL user may only
  // read: its read succeeded, so no value the script could refuse beforehand
  // explains it (a moving window's log with entries missing did, before the
  // script read the entries before writing).
  ASSERT_TRUE(server_
                  .Command({"ACL", "SETUSER", "ro", "on", "nopass", "+@all",
                            "~*LIMITER/ok*", "%R~*LIMITER/bad*"})
                  .ok());
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailOpen);
  std::string error;
  ASSERT_TRUE(ParseRedisUri(
      "redis://ro@127.0.0.1:" + std::to_string(server_.port()), &o, &error))
      << error;
  o.command_timeout_nanos = 5 * kSec;
  o.blocked_cache = false;
  auto store = Make(o);
  const Limit l = L("1 per minute");
  const Decision alone =
      Hit(*store, Strategy::kMovingWindow, l, "LIMITER/bad", kT0);
  EXPECT_TRUE(alone.allowed);
  EXPECT_EQ(alone.source, DecisionSource::kFailOpen);
  EXPECT_EQ(store->Stats().errors, 1u);
  const int kRequests = 40;
  std::vector<std::string> keys(kRequests);
  std::vector<Request> reqs(kRequests);
  std::vector<Slot> slots(kRequests);
  AsyncWait w;
  w.pending = kRequests;
  for (int r = 0; r < kRequests; ++r) {
    keys[r] =
        r == kRequests / 2 ? "LIMITER/bad" : "LIMITER/ok" + std::to_string(r);
    reqs[r] = {Strategy::kMovingWindow, &l, keys[r], 1};
    slots[r].wait = &w;
    store->DecideAsyncDeferred(&reqs[r], 1, kT0, Mode::kHit, &SlotDone,
                               &slots[r]);
  }
  store->Flush();
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(30)));
  int policy = 0;
  for (int r = 0; r < kRequests; ++r) {
    ASSERT_EQ(slots[r].decisions.size(), 1u);
    const Decision& d = slots[r].decisions[0];
    EXPECT_TRUE(d.allowed) << r;  // 1 per minute, each key once
    if (d.source == DecisionSource::kFailOpen) ++policy;
  }
  EXPECT_EQ(slots[kRequests / 2].decisions[0].source,
            DecisionSource::kFailOpen);
  const RedisStoreStats s = store->Stats();
  EXPECT_LT(s.scripts, s.calls);  // some requests did share calls
  EXPECT_GT(policy, 1);           // the bad request's call-mates
  EXPECT_LT(policy, kRequests);   // but not the requests of other calls
  EXPECT_EQ(s.errors, 2u);        // one per failed script call
}

TEST_F(RedisStoreTest, DeferredDecisionsWaitForFlushAndShareOneScript) {
  const Limit l = L("1000 per minute");
  auto store = MakeConnected(l);
  const RedisStoreStats before = store->Stats();
  AsyncWait w;
  const int kOps = 5;
  // Redis is idle: still nothing leaves before Flush (an early start of
  // the first would split the batch, and the split would persist).
  for (int i = 0; i < kOps; ++i) {
    DeferHit(*store, l, "LIMITER/idle" + std::to_string(i), &w);
  }
  const auto start = std::chrono::steady_clock::now();
  store->Flush();
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(10)));
  // Flush wakes the I/O thread at once, not its periodic wake-up.
  EXPECT_LT(std::chrono::steady_clock::now() - start,
            std::chrono::milliseconds(900));
  EXPECT_EQ(w.allowed, kOps);
  const RedisStoreStats after = store->Stats();
  EXPECT_EQ(after.writes - before.writes, 1u);
  EXPECT_EQ(after.scripts - before.scripts, 1u);
}

// The answer of one single call (DecideOneDeferred, InspectDeferred,
// IncrDeferred) made by `call(done, context)`, after a Flush. On a timeout
// `store` is closed first, which completes the call: its callback must
// run while `w` (on this stack) still exists.
struct SingleWait {
  std::mutex mu;
  std::condition_variable cv;
  int calls = 0;
  std::thread::id thread;
  RedisStore::SingleAnswer answer;
};

void SingleDone(void* ctx, const RedisStore::SingleAnswer& a) {
  auto* w = static_cast<SingleWait*>(ctx);
  std::lock_guard<std::mutex> lock(w->mu);
  ++w->calls;
  w->thread = std::this_thread::get_id();
  w->answer = a;
  w->cv.notify_all();
}

template <typename Call>
RedisStore::SingleAnswer Single(RedisStore& store, Call call,
                                bool* inline_answer = nullptr) {
  SingleWait w;
  call(&SingleDone, &w);
  {
    std::lock_guard<std::mutex> lock(w.mu);
    if (inline_answer != nullptr) *inline_answer = w.calls == 1;
  }
  store.Flush();
  std::unique_lock<std::mutex> lock(w.mu);
  if (!w.cv.wait_for(lock, std::chrono::seconds(10),
                     [&] { return w.calls > 0; })) {
    lock.unlock();
    store.Close();
    lock.lock();
    w.cv.wait(lock, [&] { return w.calls > 0; });
    ADD_FAILURE() << "no answer within 10 s";
  }
  EXPECT_EQ(w.calls, 1);
  return w.answer;
}

TEST_F(RedisStoreTest, SingleCallsDeferredAnswerAsTheSyncCalls) {
  // The limits adapter's calls from an event loop: the same answers as
  // the blocking calls on a key with the same history.
  auto store = MakeConnected(L("1 per second"));
  RedisStore& rs = *store;
  RedisStoreOptions no_cache = Options();
  no_cache.blocked_cache = false;
  auto uncached = Make(no_cache);  // reads Redis
  int64_t sync_expiry = 0;
  for (int i = 0; i < 3; ++i) {
    const int64_t now = kT0 + i * kSec;
    const auto a = Single(rs, [&](auto done, void* ctx) {
      rs.IncrDeferred("LIMITER/ia", 10 * kSec, i + 1, now, done, ctx);
    });
    EXPECT_EQ(a.count,
              rs.Incr("LIMITER/ib", 10 * kSec, i + 1, now, &sync_expiry));
    EXPECT_EQ(a.count, (i + 1) * (i + 2) / 2);
    EXPECT_EQ(a.expiry_at_nanos, sync_expiry);
    EXPECT_EQ(a.source, DecisionSource::kStore);
    EXPECT_TRUE(a.error.empty());
  }
  const Limit l = L("2 per minute");
  for (Strategy s : {Strategy::kFixedWindow, Strategy::kMovingWindow,
                     Strategy::kSlidingWindowCounter, Strategy::kTokenBucket}) {
    const std::string name(StrategyName(s));
    const std::string ka = "LIMITER/a-" + name;
    const std::string kb = "LIMITER/b-" + name;
    for (int i = 0; i < 3; ++i) {
      const int64_t now = kT0 + i * kMs;
      bool inline_answer = true;
      const auto a = Single(
          rs,
          [&](auto done, void* ctx) {
            rs.DecideOneDeferred({s, &l, ka, 1}, now, done, ctx);
          },
          &inline_answer);
      EXPECT_FALSE(inline_answer) << name;  // Redis answers, after Flush
      ExpectSame(a.decision, Hit(rs, s, l, kb, now), name);
      EXPECT_EQ(a.decision.allowed, i < 2) << name;
      EXPECT_EQ(a.source, DecisionSource::kStore) << name;
      // A sliding window's state after the decision, as a read gets it;
      // the blocking DecideOne's answer is the same.
      const bool sliding = s == Strategy::kSlidingWindowCounter;
      EXPECT_EQ(a.has_window, sliding) << name;
      const RedisStore::SingleAnswer c =
          rs.DecideOne({s, &l, "LIMITER/c-" + name, 1}, now);
      ExpectSame(c.decision, a.decision, name);
      EXPECT_EQ(c.has_window, sliding) << name;
      if (sliding) {
        ExpectSame(a.window, uncached->Inspect({s, &l, ka, 1}, now), name);
        ExpectSame(c.window, a.window, name);
      }
    }
    // Over its limit: the blocked-key cache answers before the call
    // returns, without Redis.
    const RedisStoreStats before = rs.Stats();
    bool inline_answer = false;
    const auto cached = Single(
        rs,
        [&](auto done, void* ctx) {
          rs.DecideOneDeferred({s, &l, ka, 1}, kT0 + 3 * kMs, done, ctx);
        },
        &inline_answer);
    EXPECT_TRUE(inline_answer) << name;
    EXPECT_FALSE(cached.decision.allowed) << name;
    EXPECT_EQ(cached.source, DecisionSource::kCache) << name;
    EXPECT_EQ(rs.Stats().calls, before.calls) << name;
    const int64_t later = kT0 + 30 * kSec;
    const auto w = Single(rs, [&](auto done, void* ctx) {
      rs.InspectDeferred({s, &l, ka, 1}, later, done, ctx);
    });
    ExpectSame(w.window, rs.Inspect({s, &l, kb, 1}, later), name);
    EXPECT_GT(w.window.count, 0) << name;
    // A moving or sliding window over its limit is read from the blocked-key
    // cache (BlockedCache::Read), the same state as Redis's.
    const bool cached_read =
        s == Strategy::kMovingWindow || s == Strategy::kSlidingWindowCounter;
    EXPECT_EQ(w.source,
              cached_read ? DecisionSource::kCache : DecisionSource::kStore)
        << name;
    EXPECT_EQ(RedisStore::LastSource(), w.source) << name;  // sync Inspect's
    ExpectSame(w.window, uncached->Inspect({s, &l, ka, 1}, later), name);
    // Another limit's read of the key is Redis's.
    const Limit other = L("2 per hour");
    rs.Inspect({s, &other, ka, 1}, later);
    EXPECT_EQ(RedisStore::LastSource(), DecisionSource::kStore) << name;
  }
}

// limits.aio's clear and check from an event loop: a key's states under
// every strategy go in one DEL (their keys share a slot), a PING checks
// the connection; Redis's answer, never a policy's.
TEST_F(RedisStoreTest, ClearAndPingDeferred) {
  const Limit l = L("1 per minute");
  auto store = MakeConnected(l);
  RedisStore& rs = *store;
  const Strategy all[] = {Strategy::kFixedWindow, Strategy::kMovingWindow,
                          Strategy::kSlidingWindowCounter,
                          Strategy::kTokenBucket};
  for (Strategy s : {Strategy::kFixedWindow, Strategy::kTokenBucket}) {
    ASSERT_TRUE(Hit(rs, s, l, "LIMITER/c", kT0).allowed);
    // Over the limit: the blocked-key cache knows the key too.
    ASSERT_EQ(Hit(rs, s, l, "LIMITER/c", kT0).source, DecisionSource::kStore);
    ASSERT_EQ(Hit(rs, s, l, "LIMITER/c", kT0).source, DecisionSource::kCache);
  }
  server_.Command({"CONFIG", "RESETSTAT"});
  const auto cleared = Single(rs, [&](auto done, void* ctx) {
    rs.ClearDeferred(all, 4, "LIMITER/c", done, ctx);
  });
  EXPECT_TRUE(cleared.answered);
  EXPECT_EQ(cleared.count, 2);
  EXPECT_EQ(server_.CommandCalls()["del"], 1);
  for (Strategy s : {Strategy::kFixedWindow, Strategy::kTokenBucket}) {
    const Decision d = Hit(rs, s, l, "LIMITER/c", kT0);
    EXPECT_TRUE(d.allowed) << StrategyName(s);
    EXPECT_EQ(d.source, DecisionSource::kStore) << StrategyName(s);
  }
  const auto again = Single(rs, [&](auto done, void* ctx) {
    rs.ClearDeferred(all + 1, 1, "LIMITER/c", done, ctx);
  });
  EXPECT_TRUE(again.answered);
  EXPECT_EQ(again.count, 0);  // no moving window under that key
  const auto pong =
      Single(rs, [&](auto done, void* ctx) { rs.PingDeferred(done, ctx); });
  EXPECT_TRUE(pong.answered);
  // Redis refusing the command is no answer, and says why.
  server_.Command({"ACL", "SETUSER", "default", "-del"});
  const auto refused = Single(rs, [&](auto done, void* ctx) {
    rs.ClearDeferred(all, 4, "LIMITER/c", done, ctx);
  });
  server_.Command({"ACL", "SETUSER", "default", "+del"});
  EXPECT_FALSE(refused.answered);
  EXPECT_NE(refused.error.find("NOPERM"), std::string::npos) << refused.error;
  server_.Kill();
  const auto down = Single(rs, [&](auto done, void* ctx) {
    rs.ClearDeferred(all, 4, "LIMITER/c", done, ctx);
  });
  EXPECT_FALSE(down.answered);
  EXPECT_FALSE(Single(rs, [&](auto done, void* ctx) {
                 rs.PingDeferred(done, ctx);
               }).answered);
}

// limits.aio's reset from an event loop: ForgetInProcess, then SCAN pages
// and an UNLINK per page, as TryReset does them blocking.
TEST_F(RedisStoreTest, ResetInDeferredSteps) {
  const Limit l = L("1 per minute");
  auto store = MakeConnected(l);
  RedisStore& rs = *store;
  RedisStoreOptions other_options = Options(RedisFailurePolicy::kFailClosed);
  other_options.key_prefix = "other:";
  auto other = Make(other_options);
  constexpr int kKeys = 1200;  // more than one page (COUNT 1000)
  for (int i = 0; i < kKeys; ++i) {
    ASSERT_TRUE(Hit(rs, Strategy::kFixedWindow, l, "k" + std::to_string(i), kT0)
                    .allowed);
  }
  for (Strategy s : {Strategy::kMovingWindow, Strategy::kTokenBucket}) {
    ASSERT_TRUE(Hit(rs, s, l, "k0", kT0).allowed);
  }
  ASSERT_TRUE(Hit(*other, Strategy::kFixedWindow, l, "k0", kT0).allowed);
  Hit(rs, Strategy::kFixedWindow, l, "k0", kT0);
  ASSERT_EQ(Hit(rs, Strategy::kFixedWindow, l, "k0", kT0).source,
            DecisionSource::kCache);
  rs.ForgetInProcess();
  EXPECT_EQ(Hit(rs, Strategy::kFixedWindow, l, "k0", kT0).source,
            DecisionSource::kStore);
  // Keys under the prefix that are no strategy's, one of them matching the
  // scan's pattern ("tw:" is no code): a reset leaves them.
  const std::string fixed_key = rs.RedisKey(Strategy::kFixedWindow, "k");
  const std::string prefix = fixed_key.substr(0, fixed_key.find("fw:{"));
  const std::string aliens[] = {prefix + "tw:{k}k", prefix + "fw-k"};
  for (const std::string& alien : aliens) {
    ASSERT_TRUE(server_.Command({"SET", alien, "x"}).ok());
  }
  // Each strategy's keys start with the prefix, its code and '{'.
  std::vector<std::string> starts;
  for (Strategy s : kStrategies) {
    const std::string any = rs.RedisKey(s, "k");
    starts.push_back(any.substr(0, any.find('{') + 1));
  }
  server_.Command({"CONFIG", "RESETSTAT"});
  size_t pages = 0;
  long long unlinks = 0;
  int64_t dropped = 0;
  std::set<std::string> seen;
  std::string cursor = "0";
  do {
    const auto page = Single(
        rs, [&](auto done, void* ctx) { rs.ScanDeferred(cursor, done, ctx); });
    ASSERT_TRUE(page.answered);
    ++pages;
    cursor = page.cursor;
    for (const std::string& k : page.keys) {
      bool ours = false;
      for (const std::string& start : starts) {
        ours = ours || k.rfind(start, 0) == 0;
      }
      EXPECT_TRUE(ours) << k;
      seen.insert(k);
    }
    if (page.keys.empty()) continue;
    const auto unlinked = Single(rs, [&](auto done, void* ctx) {
      rs.UnlinkDeferred(page.keys, done, ctx);
    });
    ASSERT_TRUE(unlinked.answered);
    ++unlinks;
    dropped += unlinked.count;
  } while (cursor != "0");
  // With MakeConnected's "warm" key, the moving window's and the bucket's.
  EXPECT_EQ(seen.size(), kKeys + 3u);
  EXPECT_EQ(dropped, kKeys + 3);
  // The keyspace once for every strategy: 1,206 keys in two pages of
  // COUNT 1000, three should Redis be rehashing (a scan per strategy
  // takes at least five).
  EXPECT_GE(pages, 2u);
  EXPECT_LE(pages, 3u);
  auto calls = server_.CommandCalls();
  EXPECT_EQ(calls["scan"], static_cast<long long>(pages));
  EXPECT_EQ(calls["unlink"], unlinks);  // one per page with keys
  EXPECT_GE(unlinks, 2);
  for (const std::string& alien : aliens) {
    EXPECT_EQ(server_.Command({"EXISTS", alien}).integer, 1) << alien;
  }
  size_t left = 0;
  ASSERT_TRUE(other->TrySize(&left));
  EXPECT_EQ(left, 1u);
  ASSERT_TRUE(rs.TrySize(&left));
  EXPECT_EQ(left, 0u);
  server_.Kill();
  const auto down = Single(
      rs, [&](auto done, void* ctx) { rs.ScanDeferred("0", done, ctx); });
  EXPECT_FALSE(down.answered);
  EXPECT_FALSE(Single(rs, [&](auto done, void* ctx) {
                 rs.UnlinkDeferred({"k"}, done, ctx);
               }).answered);
}

TEST_F(RedisStoreTest, SingleCallsDeferredGetThePolicy) {
  const Limit l = L("5 per minute");
  for (RedisFailurePolicy policy :
       {RedisFailurePolicy::kFailClosed, RedisFailurePolicy::kFailOpen,
        RedisFailurePolicy::kFallback}) {
    if (policy != RedisFailurePolicy::kFailClosed) {  // SetUp started one
      std::string error;
      ASSERT_TRUE(server_.Start(0, &error)) << error;
    }
    const std::string name(RedisFailurePolicyName(policy));
    auto store = Make(Options(policy));
    RedisStore& rs = *store;
    // A key Redis refuses (a list under its name) fails its call alone,
    // with Redis's error.
    server_.Command({"RPUSH", rs.RedisKey(Strategy::kFixedWindow, "LIMITER/l"),
                     "app data"});
    const auto refused = Single(rs, [&](auto done, void* ctx) {
      rs.IncrDeferred("LIMITER/l", 60 * kSec, 1, kT0, done, ctx);
    });
    EXPECT_NE(refused.error.find("WRONGTYPE"), std::string::npos) << name;
    EXPECT_NE(refused.source, DecisionSource::kStore) << name;
    server_.Kill();
    const auto incr = Single(rs, [&](auto done, void* ctx) {
      rs.IncrDeferred("LIMITER/i", 60 * kSec, 2, kT0, done, ctx);
    });
    const auto inspect = Single(rs, [&](auto done, void* ctx) {
      rs.InspectDeferred({Strategy::kMovingWindow, &l, "LIMITER/m", 1}, kT0,
                         done, ctx);
    });
    const auto decide = Single(rs, [&](auto done, void* ctx) {
      rs.DecideOneDeferred({Strategy::kMovingWindow, &l, "LIMITER/m", 1}, kT0,
                           done, ctx);
    });
    for (const auto* a : {&incr, &inspect, &decide}) {
      EXPECT_TRUE(a->error.empty()) << name << ": " << a->error;
    }
    switch (policy) {
      case RedisFailurePolicy::kFailClosed:
        EXPECT_EQ(refused.source, DecisionSource::kFailClosed);
        EXPECT_EQ(incr.source, DecisionSource::kFailClosed);
        EXPECT_EQ(incr.count, std::numeric_limits<int64_t>::max());
        EXPECT_EQ(incr.expiry_at_nanos, kT0 + kSec);  // the retry-after
        EXPECT_EQ(inspect.source, DecisionSource::kFailClosed);
        EXPECT_EQ(inspect.window.time_nanos, kT0);
        EXPECT_EQ(decide.source, DecisionSource::kFailClosed);
        EXPECT_FALSE(decide.decision.allowed);
        break;
      case RedisFailurePolicy::kFailOpen:
        EXPECT_EQ(incr.source, DecisionSource::kFailOpen);
        EXPECT_EQ(incr.count, 0);
        EXPECT_EQ(incr.expiry_at_nanos, kT0 + 60 * kSec);
        EXPECT_EQ(inspect.source, DecisionSource::kFailOpen);
        EXPECT_EQ(decide.source, DecisionSource::kFailOpen);
        EXPECT_TRUE(decide.decision.allowed);
        break;
      case RedisFailurePolicy::kFallback: {
        EXPECT_EQ(incr.source, DecisionSource::kFallback);
        EXPECT_EQ(incr.count, 2);
        EXPECT_EQ(decide.source, DecisionSource::kFallback);
        EXPECT_TRUE(decide.decision.allowed);
        // The fallback counted that hit.
        const auto after = Single(rs, [&](auto done, void* ctx) {
          rs.InspectDeferred({Strategy::kMovingWindow, &l, "LIMITER/m", 1},
                             kT0 + 1, done, ctx);
        });
        EXPECT_EQ(after.source, DecisionSource::kFallback);
        EXPECT_EQ(after.window.count, 1);
        break;
      }
    }
  }
}

// A policy's answer says whether it came for want of a reply in time (the
// limits adapter raises its client's TimeoutError then) or for a
// connection that is down (ConnectionError): blocking and deferred calls.
TEST_F(RedisStoreTest, PolicyAnswersSayWhetherTheyTimedOut) {
  const Limit l = L("5 per minute");
  auto store = Make(Options(RedisFailurePolicy::kFailClosed));
  RedisStore& rs = *store;
  ASSERT_TRUE(Hit(rs, Strategy::kFixedWindow, l, "warm", kT0).allowed);
  auto incr = [&rs] {
    return Single(rs, [&](auto done, void* ctx) {
      rs.IncrDeferred("LIMITER/i", 60 * kSec, 1, kT0, done, ctx);
    });
  };
  {
    std::thread sleeper = server_.SleepInBackground("0.5");
    EXPECT_EQ(Hit(rs, Strategy::kFixedWindow, l, "k", kT0).source,
              DecisionSource::kFailClosed);
    EXPECT_TRUE(RedisStore::LastTimedOut());
    sleeper.join();
  }
  ASSERT_TRUE(WaitRecovered(rs, std::chrono::milliseconds(3000)));
  {
    std::thread sleeper = server_.SleepInBackground("0.5");
    const auto timed_out = incr();
    EXPECT_EQ(timed_out.source, DecisionSource::kFailClosed);
    EXPECT_TRUE(timed_out.timed_out);
    sleeper.join();
  }
  ASSERT_TRUE(WaitRecovered(rs, std::chrono::milliseconds(3000)));
  server_.Kill();
  EXPECT_EQ(Hit(rs, Strategy::kFixedWindow, l, "k", kT0).source,
            DecisionSource::kFailClosed);
  EXPECT_FALSE(RedisStore::LastTimedOut());
  const auto down = incr();
  EXPECT_EQ(down.source, DecisionSource::kFailClosed);
  EXPECT_FALSE(down.timed_out);
}

// Calls `call` again while `busy` says its answer only meant the I/O
// thread held the connection a moment (up to 100 times, 1 ms apart).
template <typename Call, typename Busy>
auto RetriedWhileBusy(Call call, Busy busy) {
  auto r = call();
  for (int i = 0; i < 100 && busy(r); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    r = call();
  }
  return r;
}

// LoopFlush: kNotIdle where a loop would let the I/O thread send instead.
RedisStore::LoopResult SendFromLoop(RedisStore& store,
                                    RedisStore::LoopConnection* c) {
  return RetriedWhileBusy([&] { return store.LoopFlush(c); },
                          [](RedisStore::LoopResult r) {
                            return r == RedisStore::LoopResult::kNotIdle;
                          });
}

// LoopWatch: again in 1 ms.
int64_t WatchFromLoop(RedisStore& store, uint64_t generation) {
  return RetriedWhileBusy([&] { return store.LoopWatch(generation); },
                          [](int64_t r) { return r == 1'000'000; });
}

// LoopRead where no reply is the loop's: true only while the I/O thread
// holds the connection (read again), then false.
bool ReadFromLoop(RedisStore& store, uint64_t generation) {
  return RetriedWhileBusy([&] { return store.LoopRead(generation); },
                          [](bool r) { return r; });
}

// Reads the replies to what the loop sent on `c` as its selector would,
// until `w`'s requests are complete; false after 5 s (the store closed).
bool ReadFromSelector(RedisStore& store, const RedisStore::LoopConnection& c,
                      AsyncWait& w) {
  const auto start = std::chrono::steady_clock::now();
  while (true) {
    {
      std::lock_guard<std::mutex> lock(w.mu);
      if (w.pending == 0) return true;
    }
    pollfd p{c.fd, POLLIN, 0};
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(5) ||
        poll(&p, 1, 1000) < 0) {
      store.Close();
      return false;
    }
    // False when the I/O thread, woken by its periodic check, took the
    // replies first (then the requests are complete all the same).
    if (p.revents & POLLIN) store.LoopRead(c.generation);
  }
}

// What an event loop does with RedisStore::LoopFlush/LoopRead/LoopWatch,
// with poll() for its selector: the batch leaves from this thread and the
// replies are read here. In a pool, the loop drives the first connection.
class RedisLoopTest : public RedisStoreTest,
                      public ::testing::WithParamInterface<size_t> {};

INSTANTIATE_TEST_SUITE_P(PoolSizes, RedisLoopTest, ::testing::Values(1, 3));

TEST_P(RedisLoopTest, LoopDrivesAnIdleConnection) {
  const Limit l = L("3 per minute");
  auto store = MakeConnected(l, GetParam());
  const RedisStoreStats before = store->Stats();
  RedisStore::LoopConnection c;
  AsyncWait w;
  for (int i = 0; i < 4; ++i) DeferHit(*store, l, "LIMITER/loop", &w);
  // The first call names the connection to watch; nothing is sent yet.
  ASSERT_EQ(SendFromLoop(*store, &c), RedisStore::LoopResult::kNewConnection);
  ASSERT_GE(c.fd, 0);
  EXPECT_EQ(store->Stats().writes, before.writes);
  ASSERT_EQ(SendFromLoop(*store, &c), RedisStore::LoopResult::kSent);
  // In flight: a deadline within the timeout. Or 0: the I/O thread, woken
  // meanwhile (its periodic check, a wake-up left over from connecting),
  // polled the busy connection and took the replies first; the requests
  // complete all the same, and the counts below hold.
  const int64_t watch = store->LoopWatch(c.generation);
  EXPECT_GE(watch, 0);
  EXPECT_LE(watch, 2 * kSec);  // MakeConnected's timeout
  ASSERT_TRUE(ReadFromSelector(*store, c, w));
  EXPECT_EQ(w.allowed, 3);
  EXPECT_EQ(WatchFromLoop(*store, c.generation), 0);  // nothing in flight
  const RedisStoreStats after = store->Stats();
  EXPECT_EQ(after.loop_writes - before.loop_writes, 1u);
  EXPECT_EQ(after.writes - before.writes, 1u);
  // Nothing in flight and nothing to read: the loop keeps watching.
  EXPECT_TRUE(store->LoopRead(c.generation));
}

// What an event loop does at the end of its iteration with the one
// request it queued (`w`): sends it itself on `c`, retrying while the I/O
// thread holds the connection a moment if `retry`, and reads its reply;
// or, finding the request gone or the connection busy, has the I/O thread
// send it. True if the loop sent it; either way `w` is answered.
bool FlushOneFromLoop(RedisStore& store, RedisStore::LoopConnection* c,
                      AsyncWait& w, bool retry) {
  const auto flush = [&] {
    return retry ? SendFromLoop(store, c) : store.LoopFlush(c);
  };
  RedisStore::LoopResult got = flush();
  if (got == RedisStore::LoopResult::kNewConnection) got = flush();
  if (got == RedisStore::LoopResult::kSent) {
    EXPECT_TRUE(ReadFromSelector(store, *c, w));
    return true;
  }
  store.Flush();
  EXPECT_TRUE(WaitAll(w, store, std::chrono::seconds(5)));
  return false;
}

// A store is made with its I/O thread past its first pass over the
// connection: an event loop's first batch, sent right after, finds the
// connection free and leaves from the loop (it used to meet that pass now
// and then, and go to the I/O thread instead). No retry here, unlike the
// other loop tests.
TEST_F(RedisStoreTest, AFreshStoreLeavesItsConnectionToTheLoop) {
  const Limit l = L("1000 per minute");
  int handed_off = 0;
  for (int i = 0; i < 100; ++i) {
    RedisStoreOptions o = Options();
    o.command_timeout_nanos = 2 * kSec;
    auto store = Make(o);
    ASSERT_NE(store, nullptr);
    AsyncWait w;
    DeferHit(*store, l, "LIMITER/fresh", &w);
    // Whenever the loop comes: at once, or up to 200 µs later (a Python
    // loop's turn), wherever that falls in the thread's first pass.
    std::this_thread::sleep_for(std::chrono::microseconds(i % 50 * 4));
    RedisStore::LoopConnection c;
    if (!FlushOneFromLoop(*store, &c, w, /*retry=*/false)) ++handed_off;
    EXPECT_EQ(w.allowed, 1);
  }
  EXPECT_EQ(handed_off, 0);
}

// An event loop sends its batch at the end of its iteration, which a
// full garbage collection or a handler computing on the loop can hold up
// past the command timeout: Redis has not been waited for, and the batch
// is sent and answered (it was failed unsent, a timeout without Redis).
TEST_F(RedisStoreTest, LoopHeldUpBeforeItsFlushTimesNothingOut) {
  const Limit l = L("3 per minute");
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailClosed);
  o.command_timeout_nanos = 200 * kMs;
  auto store = Make(o);
  AsyncWait w;
  for (int i = 0; i < 2; ++i) DeferHit(*store, l, "LIMITER/late", &w);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  RedisStore::LoopConnection c;
  ASSERT_EQ(SendFromLoop(*store, &c), RedisStore::LoopResult::kNewConnection);
  ASSERT_EQ(SendFromLoop(*store, &c), RedisStore::LoopResult::kSent);
  ASSERT_TRUE(ReadFromSelector(*store, c, w));
  EXPECT_EQ(w.allowed, 2);
  EXPECT_EQ(w.sources, std::vector<DecisionSource>(2, DecisionSource::kStore));
  EXPECT_EQ(store->Stats().timeouts, 0u);
}

// Replies that came in time but that the loop, held up, has not read past
// their deadline: the I/O thread's periodic pass (one a second, polling
// the idle connection for a hang-up only) reads them rather than time the
// commands out and drop the connection.
TEST_F(RedisStoreTest, RepliesALoopHasNotReadByTheDeadlineAreReadNotTimedOut) {
  const Limit l = L("3 per minute");
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailClosed);
  o.command_timeout_nanos = 300 * kMs;
  auto store = Make(o);
  AsyncWait w;
  DeferHit(*store, l, "LIMITER/unread", &w);
  RedisStore::LoopConnection c;
  ASSERT_EQ(SendFromLoop(*store, &c), RedisStore::LoopResult::kNewConnection);
  ASSERT_EQ(SendFromLoop(*store, &c), RedisStore::LoopResult::kSent);
  // Within 1.3 s the thread has a pass past the deadline.
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(2)));
  EXPECT_EQ(w.allowed, 1);
  EXPECT_EQ(w.sources, std::vector<DecisionSource>{DecisionSource::kStore});
  const RedisStoreStats stats = store->Stats();
  EXPECT_EQ(stats.timeouts, 0u);
  EXPECT_EQ(stats.disconnects, 0u);
  EXPECT_TRUE(store->Connected());
}

// The I/O thread's idle pass (one a second, no one woke it) leaves an
// event loop's deferred requests to the loop's flush: it used to take and
// send them when it fell between their queueing and the flush. Here the
// loop's iterations take 10 ms and one always has a request queued, so
// the idle pass (at least one in 1.3 s) falls in one.
TEST_F(RedisStoreTest, TheIdlePassLeavesALoopItsDeferredRequests) {
  const Limit l = L("100000 per minute");
  RedisStoreOptions o = Options();
  o.command_timeout_nanos = 2 * kSec;
  auto store = Make(o);
  RedisStore::LoopConnection c;
  int sent = 0, handed_off = 0;
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(1) +
                   std::chrono::milliseconds(300);
  while (std::chrono::steady_clock::now() < end) {
    AsyncWait w;
    DeferHit(*store, l, "LIMITER/idle-pass", &w);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ++(FlushOneFromLoop(*store, &c, w, /*retry=*/true) ? sent : handed_off);
    EXPECT_EQ(w.allowed, 1);
  }
  EXPECT_EQ(handed_off, 0);
  EXPECT_GT(sent, 50);
}

// Deferred requests whose loop never flushes them (closed before its
// flush ran) are sent by the I/O thread's idle pass once they have waited
// longer than a loop's iteration.
TEST_F(RedisStoreTest, DeferredRequestsNoLoopFlushesAreSentAllTheSame) {
  const Limit l = L("3 per minute");
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailClosed);
  o.command_timeout_nanos = 300 * kMs;
  auto store = Make(o);
  AsyncWait w;
  const auto start = std::chrono::steady_clock::now();
  DeferHit(*store, l, "LIMITER/orphan", &w);
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(5)));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
  EXPECT_EQ(w.allowed, 1);
  EXPECT_EQ(w.sources, std::vector<DecisionSource>{DecisionSource::kStore});
  EXPECT_EQ(store->Stats().loop_writes, 0u);
}

TEST_F(RedisStoreTest, LoopWatchFailsARequestRedisDoesNotAnswer) {
  const Limit l = L("3 per minute");
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailOpen);
  auto store = Make(o);
  ASSERT_TRUE(Hit(*store, Strategy::kFixedWindow, l, "warm", kT0).allowed);
  RedisStore::LoopConnection c;
  AsyncWait w;
  std::thread sleeper = server_.SleepInBackground("1");
  DeferHit(*store, l, "LIMITER/held", &w);
  ASSERT_EQ(SendFromLoop(*store, &c), RedisStore::LoopResult::kNewConnection);
  ASSERT_EQ(SendFromLoop(*store, &c), RedisStore::LoopResult::kSent);
  const int64_t left = store->LoopWatch(c.generation);
  ASSERT_GT(left, 0);
  EXPECT_LE(left, o.command_timeout_nanos);
  // No reply by the deadline: the loop's check fails the request (the
  // I/O thread, which waits for no reply, would only at its periodic
  // wake-up), and the connection is replaced.
  std::this_thread::sleep_for(std::chrono::nanoseconds(left) +
                              std::chrono::milliseconds(20));
  EXPECT_EQ(WatchFromLoop(*store, c.generation), -1);
  sleeper.join();
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(5)));
  EXPECT_EQ(w.allowed, 1);  // fail-open
  EXPECT_EQ(w.sources[0], DecisionSource::kFailOpen);
  EXPECT_EQ(store->Stats().timeouts, 1u);
  // The next connection is another to watch.
  for (int i = 0; i < 200 && !store->Connected(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  DeferHit(*store, l, "LIMITER/held", &w);
  RedisStore::LoopConnection next = c;
  ASSERT_EQ(SendFromLoop(*store, &next),
            RedisStore::LoopResult::kNewConnection);
  EXPECT_NE(next.generation, c.generation);
  EXPECT_FALSE(ReadFromLoop(*store, c.generation));  // the old one is not read
  store->Flush();  // left to the I/O thread this time
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(5)));
}

TEST_F(RedisStoreTest, DeferredDecisionsLeaveInBatches) {
  const Limit l = L("1000 per minute");
  auto store = MakeConnected(l);
  const RedisStoreStats before = store->Stats();
  AsyncWait w;
  const int kOps = 200;
  w.pending = kOps;
  for (int i = 0; i < kOps; ++i) {
    const std::string key = "LIMITER/d" + std::to_string(i % 7);
    Request r{Strategy::kTokenBucket, &l, key, 1};
    store->DecideAsyncDeferred(&r, 1, kT0, Mode::kHit, &AsyncDone, &w);
  }
  store->Flush();
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(10)));
  EXPECT_EQ(w.allowed, kOps);
  const RedisStoreStats after = store->Stats();
  EXPECT_EQ(after.calls - before.calls, static_cast<uint64_t>(kOps));
  // A write per 32 queued commands, then one at Flush (the race with
  // replies adds a few): far fewer writes than commands.
  EXPECT_LE(after.writes - before.writes, static_cast<uint64_t>(kOps / 4));
}

// ------------------------------------------------------ blocked-key cache

TEST_F(RedisStoreTest, BlockedKeyCacheSendsNoCommand) {
  auto store = Make(Options());
  const Limit l = L("2 per minute");
  EXPECT_TRUE(Hit(*store, Strategy::kFixedWindow, l, "LIMITER/c", kT0).allowed);
  EXPECT_TRUE(
      Hit(*store, Strategy::kFixedWindow, l, "LIMITER/c", kT0 + 1).allowed);
  const Decision first =
      Hit(*store, Strategy::kFixedWindow, l, "LIMITER/c", kT0 + 2);
  EXPECT_FALSE(first.allowed);
  EXPECT_EQ(first.source, DecisionSource::kStore);
  ASSERT_TRUE(server_.Command({"CONFIG", "RESETSTAT"}).ok());
  for (int i = 0; i < 20; ++i) {
    const Decision d =
        Hit(*store, Strategy::kFixedWindow, l, "LIMITER/c", kT0 + 3 + i);
    EXPECT_FALSE(d.allowed);
    EXPECT_EQ(d.source, DecisionSource::kCache);
    EXPECT_EQ(d.reset_nanos, first.reset_nanos);
    EXPECT_EQ(d.retry_after_nanos, first.retry_after_nanos - 1 - i);
  }
  EXPECT_EQ(server_.CommandCalls().count("evalsha"), 0u);
  // After the window, Redis decides again.
  const Decision later =
      Hit(*store, Strategy::kFixedWindow, l, "LIMITER/c", kT0 + 60 * kSec);
  EXPECT_TRUE(later.allowed);
  EXPECT_EQ(later.source, DecisionSource::kStore);
  EXPECT_GE(store->Stats().cache_hits, 20u);
}

TEST_F(RedisStoreTest, CachedKeysReadAsTheirRefusalsWhileRedisIsDown) {
  // Refused from the cache while Redis is down, a key must also read (the
  // headers of that refusal) as the store saw it, not as the failure
  // policy: fail-closed would make the read an exception (a 500 through
  // slowapi on the limits adapter) for a request the store had answered.
  auto store = Make(Options(RedisFailurePolicy::kFailClosed));
  const Limit l = L("2 per minute");
  const Strategy kinds[] = {Strategy::kFixedWindow, Strategy::kMovingWindow,
                            Strategy::kSlidingWindowCounter,
                            Strategy::kTokenBucket};
  std::vector<WindowState> seen;
  for (Strategy s : kinds) {
    const std::string key = "LIMITER/" + std::string(StrategyName(s));
    EXPECT_TRUE(Hit(*store, s, l, key, kT0).allowed);
    EXPECT_TRUE(Hit(*store, s, l, key, kT0 + 1).allowed);
    EXPECT_FALSE(Hit(*store, s, l, key, kT0 + 2).allowed);
    seen.push_back(store->Inspect({s, &l, key, 1}, kT0 + 3));
  }
  server_.Kill();
  for (size_t i = 0; i < std::size(kinds); ++i) {
    const Strategy s = kinds[i];
    const std::string key = "LIMITER/" + std::string(StrategyName(s));
    const Decision d = Hit(*store, s, l, key, kT0 + 3);
    EXPECT_FALSE(d.allowed);
    EXPECT_EQ(d.source, DecisionSource::kCache);
    const WindowState w = store->Inspect({s, &l, key, 1}, kT0 + 3);
    EXPECT_EQ(RedisStore::LastSource(), DecisionSource::kCache);
    EXPECT_EQ(w.count, seen[i].count) << StrategyName(s);
    EXPECT_EQ(w.time_nanos, seen[i].time_nanos) << StrategyName(s);
    EXPECT_EQ(w.previous_count, seen[i].previous_count) << StrategyName(s);
    EXPECT_EQ(w.current_ttl_nanos, seen[i].current_ttl_nanos);
  }
  // A key the cache does not hold still meets the policy.
  store->Inspect({Strategy::kFixedWindow, &l, "LIMITER/other", 1}, kT0 + 3);
  EXPECT_EQ(RedisStore::LastSource(), DecisionSource::kFailClosed);
}

TEST_F(RedisStoreTest, FullBlockedKeyCacheMakesRoomForNewKeys) {
  RedisStoreOptions o = Options();
  o.blocked_cache_max_keys = 32;
  auto store = Make(o);
  const Limit l = L("1 per hour");
  // Far more blocked clients than the cache holds, all blocked for an hour.
  for (int i = 0; i < 400; ++i) {
    const std::string key = "LIMITER/flood" + std::to_string(i);
    Hit(*store, Strategy::kFixedWindow, l, key, kT0);
    EXPECT_FALSE(Hit(*store, Strategy::kFixedWindow, l, key, kT0 + 1).allowed);
  }
  // A client blocked later, and for longer, is answered from the cache.
  const Limit day = L("1 per day");
  for (int i = 0; i < 20; ++i) {
    const std::string key = "LIMITER/late" + std::to_string(i);
    Hit(*store, Strategy::kFixedWindow, day, key, kT0 + 2);
    Hit(*store, Strategy::kFixedWindow, day, key, kT0 + 3);
    const Decision d = Hit(*store, Strategy::kFixedWindow, day, key, kT0 + 4);
    EXPECT_FALSE(d.allowed);
    EXPECT_EQ(d.source, DecisionSource::kCache) << key;
  }
}

TEST_F(RedisStoreTest, CacheCanBeTurnedOff) {
  RedisStoreOptions o = Options();
  o.blocked_cache = false;
  auto store = Make(o);
  const Limit l = L("1 per minute");
  Hit(*store, Strategy::kTokenBucket, l, "k", kT0);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(Hit(*store, Strategy::kTokenBucket, l, "k", kT0 + i).source,
              DecisionSource::kStore);
  }
  EXPECT_EQ(store->Stats().cache_hits, 0u);
}

// ------------------------------------------------------------------ faults

class RedisFaultTest
    : public RedisStoreTest,
      public ::testing::WithParamInterface<RedisFailurePolicy> {};

TEST_P(RedisFaultTest, KilledAndRestarted) {
  const RedisFailurePolicy policy = GetParam();
  auto store = Make(Options(policy));
  const Limit l = L("2 per minute");
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).source,
            DecisionSource::kStore);
  const int port = server_.port();
  server_.Kill();
  for (int i = 0; i < 5; ++i) {
    const auto start = std::chrono::steady_clock::now();
    const Decision d = Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + 1 + i);
    const auto took = std::chrono::steady_clock::now() - start;
    EXPECT_LT(took, std::chrono::milliseconds(400));
    switch (policy) {
      case RedisFailurePolicy::kFailOpen:
        EXPECT_TRUE(d.allowed);
        EXPECT_EQ(d.source, DecisionSource::kFailOpen);
        break;
      case RedisFailurePolicy::kFailClosed:
        EXPECT_FALSE(d.allowed);
        EXPECT_EQ(d.source, DecisionSource::kFailClosed);
        EXPECT_EQ(d.retry_after_nanos, kSec);
        break;
      case RedisFailurePolicy::kFallback:
        // A memory store with the same limits: 2 admitted, then rejected.
        EXPECT_EQ(d.allowed, i < 2) << i;
        EXPECT_EQ(d.source, DecisionSource::kFallback);
        break;
    }
  }
  std::string error;
  ASSERT_TRUE(server_.Start(port, &error)) << error;
  EXPECT_TRUE(WaitRecovered(*store, std::chrono::milliseconds(3000)));
  const Decision d = Hit(*store, Strategy::kFixedWindow, l, "fresh", kT0);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.source, DecisionSource::kStore);
  EXPECT_GE(store->Stats().disconnects, 1u);
  EXPECT_GE(store->Stats().reconnects, 2u);
}

// Redis closes idle connections by itself (its `timeout` setting, which
// managed services set, or CLIENT KILL): the store notices without a
// request and reconnects, so the next request is answered by Redis instead
// of meeting a dead connection and getting the failure policy.
class RedisIdleCloseTest : public RedisStoreTest {
 protected:
  // Waits (without sending anything) until the store has reconnected
  // more than `before` times.
  static bool WaitReconnected(RedisStore& s, uint64_t before) {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (std::chrono::steady_clock::now() < deadline) {
      if (s.Stats().reconnects > before) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }

  void ExpectAnsweredByRedisAfterIdleClose(
      const std::function<void()>& close_idle) {
    for (const bool sync_first : {true, false}) {
      auto store = Make(Options(RedisFailurePolicy::kFailClosed));
      const Limit l = L("5 per minute");
      const std::string key = sync_first ? "sync" : "async";
      EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, key, kT0).remaining, 4);
      const RedisStoreStats before = store->Stats();
      close_idle();
      ASSERT_TRUE(WaitReconnected(*store, before.reconnects));
      Decision d;
      if (sync_first) {
        d = Hit(*store, Strategy::kFixedWindow, l, key, kT0 + 1);
      } else {  // the I/O thread's path (asyncio's)
        Request r{Strategy::kFixedWindow, &l, key, 1};
        std::promise<Decision> done;
        std::future<Decision> answer = done.get_future();
        store->DecideAsync(
            &r, 1, kT0 + 1, Mode::kHit,
            [](void* ctx, const Decision* got, size_t, size_t) {
              static_cast<std::promise<Decision>*>(ctx)->set_value(got[0]);
            },
            &done);
        if (answer.wait_for(std::chrono::seconds(10)) !=
            std::future_status::ready) {
          store->Close();  // answers it while `done` still exists
          FAIL() << key << ": no answer";
        }
        d = answer.get();
      }
      EXPECT_EQ(d.source, DecisionSource::kStore) << key;
      EXPECT_EQ(d.remaining, 3) << key;  // counted once, nothing lost
      const RedisStoreStats after = store->Stats();
      EXPECT_EQ(after.disconnects, before.disconnects + 1) << key;
      EXPECT_EQ(after.fail_closed, 0u) << key;
    }
  }
};

TEST_F(RedisIdleCloseTest, ClientKill) {
  ExpectAnsweredByRedisAfterIdleClose([this] {
    const auto r = server_.Command({"CLIENT", "KILL", "TYPE", "normal"});
    EXPECT_EQ(r.integer, 1);  // the store's connection (not this one)
  });
}

TEST_F(RedisIdleCloseTest, RedisTimeoutSetting) {
  ASSERT_EQ(server_.Command({"CONFIG", "SET", "timeout", "1"}).str, "OK");
  // Redis drops a client idle for more than a second on its next check.
  ExpectAnsweredByRedisAfterIdleClose([] {});
}

// The first lookup answers at once, the later ones after 1 s.
std::atomic<int> g_lookups{0};
int SlowAfterFirstGetAddrInfo(const char* host, const char* port,
                              const addrinfo* hints, addrinfo** out) {
  if (g_lookups.fetch_add(1) > 0) {
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  return getaddrinfo(host, port, hints, out);
}

TEST_F(RedisIdleCloseTest,
       RequestQueuedDuringASlowReconnectWaitsOnlyItsTimeout) {
  // While the I/O thread replaces a connection Redis closed, requests
  // queue for the new one; when that takes long (here its name lookup),
  // they get the policy at their timeout, not when the connect ends.
  struct Restore {
    ~Restore() { redis::g_getaddrinfo = &getaddrinfo; }
  } restore;
  g_lookups = 0;
  redis::g_getaddrinfo = &SlowAfterFirstGetAddrInfo;
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailOpen);
  o.host = "localhost";
  o.command_timeout_nanos = 100 * kMs;
  o.connect_timeout_nanos = 3 * kSec;
  auto store = Make(o);
  ASSERT_TRUE(store->Connected());
  const uint64_t before = store->Stats().disconnects;
  server_.Command({"CLIENT", "KILL", "TYPE", "normal"});
  const auto noticed =
      std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (store->Stats().disconnects == before &&
         std::chrono::steady_clock::now() < noticed) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_GT(store->Stats().disconnects, before);  // reconnecting now
  const Limit l = L("5 per minute");
  Request r{Strategy::kFixedWindow, &l, "k", 1};
  std::promise<Decision> done;
  std::future<Decision> answer = done.get_future();
  const auto start = std::chrono::steady_clock::now();
  store->DecideAsync(
      &r, 1, kT0, Mode::kHit,
      [](void* ctx, const Decision* got, size_t, size_t) {
        static_cast<std::promise<Decision>*>(ctx)->set_value(got[0]);
      },
      &done);
  if (answer.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    store->Close();  // answers it while `done` still exists
    FAIL() << "no answer";
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start,
            std::chrono::milliseconds(400));
  EXPECT_EQ(answer.get().source, DecisionSource::kFailOpen);
}

TEST_P(RedisFaultTest, SlowRedisTimesOut) {
  const RedisFailurePolicy policy = GetParam();
  RedisStoreOptions o = Options(policy);
  o.command_timeout_nanos = 100 * kMs;
  auto store = Make(o);
  const Limit l = L("100 per minute");
  EXPECT_EQ(Hit(*store, Strategy::kTokenBucket, l, "k", kT0).source,
            DecisionSource::kStore);
  std::thread sleeper = server_.SleepInBackground("0.6");
  const auto start = std::chrono::steady_clock::now();
  const Decision d = Hit(*store, Strategy::kTokenBucket, l, "k", kT0 + 1);
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_GE(took, std::chrono::milliseconds(80));
  EXPECT_LT(took, std::chrono::milliseconds(250));
  EXPECT_NE(d.source, DecisionSource::kStore);
  EXPECT_GE(store->Stats().timeouts, 1u);
  // While Redis sleeps, calls fail fast instead of waiting again.
  const auto start2 = std::chrono::steady_clock::now();
  Hit(*store, Strategy::kTokenBucket, l, "k", kT0 + 2);
  EXPECT_LT(std::chrono::steady_clock::now() - start2,
            std::chrono::milliseconds(250));
  sleeper.join();
  EXPECT_TRUE(WaitRecovered(*store, std::chrono::milliseconds(3000)));
}

INSTANTIATE_TEST_SUITE_P(Policies, RedisFaultTest,
                         ::testing::Values(RedisFailurePolicy::kFailOpen,
                                           RedisFailurePolicy::kFailClosed,
                                           RedisFailurePolicy::kFallback),
                         [](const auto& info) {
                           std::string n(RedisFailurePolicyName(info.param));
                           for (char& c : n) {
                             if (c == '-') c = '_';
                           }
                           return n;
                         });

TEST_F(RedisStoreTest, UnreachableAtStartIsNotFatal) {
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailClosed);
  o.port = testing::FreePort();
  const auto start = std::chrono::steady_clock::now();
  auto store = Make(o);
  ASSERT_NE(store, nullptr);
  EXPECT_FALSE(store->Connected());
  const Decision d =
      Hit(*store, Strategy::kFixedWindow, L("1/second"), "k", kT0);
  EXPECT_EQ(d.source, DecisionSource::kFailClosed);
  EXPECT_LT(std::chrono::steady_clock::now() - start,
            std::chrono::milliseconds(500));
  // Inspect, Incr, Clear degrade too.
  const Limit l = L("1/second");
  EXPECT_EQ(store->Inspect({Strategy::kFixedWindow, &l, "k", 1}, kT0).count, 0);
  EXPECT_GT(store->Incr("k", kSec, 1, kT0, nullptr), 1'000'000);
  EXPECT_FALSE(store->Clear(Strategy::kFixedWindow, "k"));
}

TEST_F(RedisStoreTest, StartIsBoundedByOneConnectTimeoutWhateverThePool) {
  // A server that accepts and never answers: every connection of the pool
  // would wait out the connect timeout, one after the other.
  testing::SilentServer silent;
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailOpen);
  o.port = silent.port();
  o.pool_size = 4;
  o.connect_timeout_nanos = 300 * kMs;
  const auto start = std::chrono::steady_clock::now();
  auto store = Make(o);
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_NE(store, nullptr);
  EXPECT_FALSE(store->Connected());
  EXPECT_LT(took, std::chrono::milliseconds(550));
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, L("1/second"), "k", kT0).source,
            DecisionSource::kFailOpen);
}

// A name server that does not answer: the lookup returns after the
// resolver's retries, seconds later.
int SlowGetAddrInfo(const char* host, const char* port, const addrinfo* hints,
                    addrinfo** out) {
  std::this_thread::sleep_for(std::chrono::seconds(2));
  return getaddrinfo(host, port, hints, out);
}

TEST_F(RedisStoreTest, NameLookupIsBoundedByTheConnectTimeout) {
  struct Restore {
    ~Restore() { redis::g_getaddrinfo = &getaddrinfo; }
  } restore;
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailClosed);
  o.host = "localhost";
  o.connect_timeout_nanos = 200 * kMs;
  {
    // A name is looked up (on a thread of its own) and connected to.
    auto store = Make(o);
    EXPECT_TRUE(store->Connected());
  }
  redis::g_getaddrinfo = &SlowGetAddrInfo;
  const auto start = std::chrono::steady_clock::now();
  auto store = Make(o);
  EXPECT_LT(std::chrono::steady_clock::now() - start,
            std::chrono::milliseconds(450));
  EXPECT_FALSE(store->Connected());
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, L("1/second"), "k", kT0).source,
            DecisionSource::kFailClosed);
  // The I/O thread's own attempts give up in time too: Close waits for one.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const auto closing = std::chrono::steady_clock::now();
  store->Close();
  EXPECT_LT(std::chrono::steady_clock::now() - closing,
            std::chrono::milliseconds(450));
}

// --------------------------------------------------- name lookups, lanes

// A name server the test controls: while it is shut, lookups wait for it
// to open; lookups past the first `answered` ones fail. Never destroyed:
// a lookup the store left in flight may still be in it after its test.
class LookupGate {
 public:
  static LookupGate& Get() {
    static auto* gate = new LookupGate;
    return *gate;
  }

  // Open, answering every lookup, no calls counted. Waits for the lookups
  // a previous test left in flight to leave.
  void Reset() {
    std::unique_lock<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
    cv_.wait_for(lock, std::chrono::seconds(5),
                 [&] { return in_flight_ == 0; });
    answered_ = std::numeric_limits<int>::max();
    calls_ = 0;
    max_in_flight_ = 0;
  }
  void Shut() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = false;
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  // Of the lookups from now on, only the first `n` are answered.
  void AnswerOnly(int n) {
    std::lock_guard<std::mutex> lock(mu_);
    answered_ = calls_ + n;
  }
  int calls() {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }
  int max_in_flight() {
    std::lock_guard<std::mutex> lock(mu_);
    return max_in_flight_;
  }
  // Whether `n` lookups have started within `limit`.
  bool WaitCalls(int n, std::chrono::milliseconds limit) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return calls_ >= n; });
  }

  static int GetAddrInfo(const char* host, const char* port,
                         const addrinfo* hints, addrinfo** out) {
    LookupGate& g = Get();
    bool fail;
    {
      std::unique_lock<std::mutex> lock(g.mu_);
      fail = g.calls_ >= g.answered_;
      ++g.calls_;
      g.max_in_flight_ = std::max(g.max_in_flight_, ++g.in_flight_);
      g.cv_.notify_all();
      g.cv_.wait(lock, [&] { return g.open_; });
      --g.in_flight_;
      g.cv_.notify_all();
    }
    return fail ? EAI_NONAME : getaddrinfo(host, port, hints, out);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = true;
  int answered_ = std::numeric_limits<int>::max();
  int calls_ = 0;
  int in_flight_ = 0;
  int max_in_flight_ = 0;
};

// Opens the gate when it goes out of scope: declared after a store, it
// lets the store's Close find no lookup waiting for the gate.
struct OpenGateAtEnd {
  ~OpenGateAtEnd() { LookupGate::Get().Open(); }
};

// Log lines of a store, collected.
class LogLines {
 public:
  std::function<void(RedisLogLevel, const std::string&)> Sink() {
    return [this](RedisLogLevel level, const std::string& line) {
      std::lock_guard<std::mutex> lock(mu_);
      lines_.emplace_back(level, line);
    };
  }
  // Lines of `level` or above containing `text`.
  int Count(RedisLogLevel level, const std::string& text) {
    std::lock_guard<std::mutex> lock(mu_);
    int n = 0;
    for (const auto& [l, line] : lines_) {
      if (l >= level && line.find(text) != std::string::npos) ++n;
    }
    return n;
  }
  bool WaitCount(RedisLogLevel level, const std::string& text, int n,
                 std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (Count(level, text) < n) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return true;
  }
  std::string All() {
    std::lock_guard<std::mutex> lock(mu_);
    std::string all;
    for (const auto& entry : lines_) all += entry.second + "\n";
    return all;
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<RedisLogLevel, std::string>> lines_;
};

// One asynchronous decision and its answer.
class AsyncAnswer {
 public:
  AsyncAnswer(RedisStore& store, const Limit& l, const std::string& key,
              int64_t now)
      : store_(store) {
    Request r{Strategy::kFixedWindow, &l, key, 1};
    store.DecideAsync(
        &r, 1, now, Mode::kHit,
        [](void* ctx, const Decision* got, size_t, size_t) {
          static_cast<std::promise<Decision>*>(ctx)->set_value(got[0]);
        },
        &promise_);
  }
  // The answer, or nothing after `limit`: the store is then closed, which
  // answers while the promise still exists.
  std::optional<Decision> Wait(std::chrono::milliseconds limit) {
    if (future_.wait_for(limit) != std::future_status::ready) {
      store_.Close();
      return std::nullopt;
    }
    return future_.get();
  }

 private:
  RedisStore& store_;
  std::promise<Decision> promise_;
  std::future<Decision> future_ = promise_.get_future();
};

// A primary demoted to a replica answers every write with READONLY: a
// failover, behind an address (a DNS name, a proxy, here a unix socket
// path) that leads to the new primary only on a new connection.
class RedisFailoverTest : public RedisStoreTest {
 protected:
  void SetUp() override {
    RedisStoreTest::SetUp();
    if (IsSkipped()) return;
    std::string error;
    ASSERT_TRUE(primary_.Start(0, &error)) << error;
  }

  // Makes server_ a replica of primary_ (it stays one until promoted).
  void Demote() {
    ASSERT_TRUE(server_
                    .Command({"REPLICAOF", "127.0.0.1",
                              std::to_string(primary_.port())})
                    .ok());
    ASSERT_EQ(server_.Command({"ROLE"}).elements.at(0).str, "slave");
  }

  RedisServer primary_;
};

TEST_F(RedisFailoverTest, ReplicaIsRefusedUntilPromoted) {
  Demote();
  LogLines log;
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailOpen);
  o.log = log.Sink();
  auto store = Make(o);
  EXPECT_FALSE(store->Connected());
  const Limit l = L("5 per minute");
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).source,
            DecisionSource::kFailOpen);
  EXPECT_EQ(log.Count(RedisLogLevel::kWarning,
                      "the server is a replica, not a primary (ROLE)"),
            1)
      << log.All();
  // Retried with backoff, not at every request, and reported once.
  ASSERT_TRUE(server_.Command({"REPLICAOF", "NO", "ONE"}).ok());
  ASSERT_TRUE(WaitRecovered(*store, std::chrono::milliseconds(3000)));
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).remaining, 4);
  EXPECT_EQ(log.Count(RedisLogLevel::kWarning, "replica"), 1) << log.All();
  EXPECT_EQ(log.Count(RedisLogLevel::kInfo,
                      std::to_string(server_.port()) + " is back"),
            1)
      << log.All();
}

TEST_F(RedisFailoverTest, ReadOnlyReplyReconnectsToTheNewPrimary) {
  for (const bool sync : {true, false}) {
    const std::string link =
        "/tmp/rapidlimit-test-" + std::to_string(getpid()) + "-failover.sock";
    const auto point_at = [&link](const std::string& target) {
      const std::string tmp = link + ".new";
      unlink(tmp.c_str());
      ASSERT_EQ(symlink(target.c_str(), tmp.c_str()), 0);
      ASSERT_EQ(rename(tmp.c_str(), link.c_str()), 0);
    };
    point_at(server_.unix_path());
    RedisStoreOptions o = Options(RedisFailurePolicy::kFailClosed);
    std::string error;
    ASSERT_TRUE(ParseRedisUri("redis+unix://" + link, &o, &error)) << error;
    LogLines log;
    o.log = log.Sink();
    auto store = Make(o);
    const Limit l = L("5 per minute");
    const std::string key = sync ? "sync" : "async";
    EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, key, kT0).remaining, 4);

    Demote();
    point_at(primary_.unix_path());
    // The request that meets READONLY gets the policy; the lane replaces
    // its connection at once, which now leads to the new primary.
    Decision d;
    if (sync) {
      d = Hit(*store, Strategy::kFixedWindow, l, key, kT0);
    } else {  // the I/O thread's path (asyncio's)
      AsyncAnswer answer(*store, l, key, kT0);
      const std::optional<Decision> got =
          answer.Wait(std::chrono::milliseconds(5000));
      ASSERT_TRUE(got.has_value());
      d = *got;
    }
    EXPECT_EQ(d.source, DecisionSource::kFailClosed) << key;
    EXPECT_EQ(log.Count(RedisLogLevel::kWarning, "READONLY"), 1) << log.All();
    ASSERT_TRUE(WaitRecovered(*store, std::chrono::milliseconds(3000)))
        << key << "\n"
        << log.All();
    // Counted on the new primary (which knew nothing of the old count: a
    // replica's data is the primary's).
    d = Hit(*store, Strategy::kFixedWindow, l, key, kT0);
    EXPECT_EQ(d.source, DecisionSource::kStore) << key;
    EXPECT_EQ(d.remaining, 4) << key;
    EXPECT_GE(store->Stats().disconnects, 1u) << key;
    unlink(link.c_str());
    // The next round starts from a primary again.
    ASSERT_TRUE(server_.Command({"REPLICAOF", "NO", "ONE"}).ok());
    ASSERT_TRUE(primary_.Command({"FLUSHALL"}).ok());
    ASSERT_TRUE(server_.Command({"FLUSHALL"}).ok());
  }
}

class RedisLookupTest : public RedisStoreTest {
 protected:
  // Sync and async requests of a fail-closed store: none gets the policy.
  static void ExpectEveryRequestAnsweredByRedis(RedisStore& store) {
    const Limit l = L("1000 per minute");
    for (int i = 0; i < 12; ++i) {
      EXPECT_EQ(Hit(store, Strategy::kFixedWindow, l, "k", kT0 + i).source,
                DecisionSource::kStore)
          << i;
    }
    for (int i = 0; i < 6; ++i) {
      AsyncAnswer answer(store, l, "k", kT0 + 100 + i);
      const std::optional<Decision> d = answer.Wait(std::chrono::seconds(10));
      ASSERT_TRUE(d.has_value()) << "no answer";
      EXPECT_EQ(d->source, DecisionSource::kStore) << i;
    }
    EXPECT_EQ(store.Stats().fail_closed, 0u);
  }

  void SetUp() override {
    RedisStoreTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    LookupGate::Get().Reset();
    redis::g_getaddrinfo = &LookupGate::GetAddrInfo;
  }
  void TearDown() override {
    LookupGate::Get().Open();
    redis::g_getaddrinfo = &getaddrinfo;
  }

  // Options that connect by name, through the gate.
  RedisStoreOptions NamedOptions(RedisFailurePolicy policy) const {
    RedisStoreOptions o = Options(policy);
    o.host = "localhost";
    return o;
  }

  // The server's clients (CLIENT LIST) as their id and whole line.
  std::vector<std::pair<std::string, std::string>> Clients() const {
    std::vector<std::pair<std::string, std::string>> clients;
    std::stringstream lines(server_.Command({"CLIENT", "LIST"}).str);
    std::string line;
    while (std::getline(lines, line)) {
      if (line.rfind("id=", 0) != 0) continue;
      clients.emplace_back(line.substr(3, line.find(' ') - 3), line);
    }
    return clients;
  }

  // The id Redis gives the client connected through socket `fd`, or "".
  std::string ClientIdOf(int fd) const {
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      return "";
    }
    const uint16_t port =
        addr.ss_family == AF_INET6
            ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
            : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
    for (const auto& [id, line] : Clients()) {
      const size_t at = line.find(" addr=");
      if (at == std::string::npos) continue;
      const std::string peer =
          line.substr(at + 6, line.find(' ', at + 1) - at - 6);
      if (peer.substr(peer.rfind(':') + 1) == std::to_string(port)) return id;
    }
    return "";
  }

  // The ids of the server's clients other than the one asking.
  std::vector<std::string> OtherClientIds() const {
    std::vector<std::string> ids;
    for (const auto& [id, line] : Clients()) {
      if (line.find(" cmd=client") == std::string::npos) ids.push_back(id);
    }
    return ids;
  }
};

TEST_F(RedisLookupTest, IdleReconnectSlowerThanACommandIsNoOutage) {
  // Redis closed the idle connection and the new one takes longer than a
  // command may wait (here its name lookup) but less than the connect
  // timeout: a request queued meanwhile gets the policy at its own
  // deadline, yet the reconnect goes on, and a request queued later is
  // answered by Redis once it is done. Before, the reconnect gave up at
  // the command timeout and turned into an outage: a warning, and the
  // policy for every request until a later attempt succeeded.
  LookupGate& gate = LookupGate::Get();
  LogLines log;
  RedisStoreOptions o = NamedOptions(RedisFailurePolicy::kFailOpen);
  o.command_timeout_nanos = 500 * kMs;
  o.connect_timeout_nanos = 20 * kSec;
  o.log = log.Sink();
  auto store = Make(o);
  OpenGateAtEnd open_at_end;
  ASSERT_TRUE(store->Connected());
  const Limit l = L("5 per minute");
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).remaining, 4);
  const RedisStoreStats before = store->Stats();
  gate.Shut();
  ASSERT_EQ(server_.Command({"CLIENT", "KILL", "TYPE", "normal"}).integer, 1);
  // The I/O thread noticed and waits for the name.
  ASSERT_TRUE(gate.WaitCalls(2, std::chrono::milliseconds(5000)));

  const auto start = std::chrono::steady_clock::now();
  AsyncAnswer first(*store, l, "k", kT0 + 1);
  const std::optional<Decision> a = first.Wait(std::chrono::seconds(10));
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(a.has_value()) << "no answer";
  EXPECT_EQ(a->source, DecisionSource::kFailOpen);
  EXPECT_GE(took, std::chrono::milliseconds(480));
  EXPECT_LT(took, std::chrono::milliseconds(900));

  AsyncAnswer second(*store, l, "k", kT0 + 2);
  gate.Open();
  const std::optional<Decision> b = second.Wait(std::chrono::seconds(10));
  ASSERT_TRUE(b.has_value()) << "no answer";
  EXPECT_EQ(b->source, DecisionSource::kStore);
  EXPECT_EQ(b->remaining, 3);
  const RedisStoreStats after = store->Stats();
  EXPECT_EQ(after.fail_open, 1u);
  EXPECT_EQ(after.timeouts, before.timeouts + 1);
  EXPECT_EQ(after.disconnects, before.disconnects + 1);
  EXPECT_EQ(gate.calls(), 2);
  EXPECT_EQ(log.Count(RedisLogLevel::kWarning, ""), 0) << log.All();
}

// Start gives all lanes one connect deadline, and a lane loses its
// connection alone: requests go to a lane that is up while another is
// down, not to the failure policy.
TEST_F(RedisLookupTest, RequestsGoToALaneThatIsUpWhenOthersNeverConnected) {
  LookupGate::Get().AnswerOnly(1);  // the first lane's; the others fail
  RedisStoreOptions o = NamedOptions(RedisFailurePolicy::kFailClosed);
  o.pool_size = 3;
  o.command_timeout_nanos = 2 * kSec;
  auto store = Make(o);
  ASSERT_TRUE(store->Connected());
  ASSERT_EQ(OtherClientIds().size(), 1u);
  ExpectEveryRequestAnsweredByRedis(*store);
}

// The lane that lost its connection is the first, which an event loop
// drives: the loop's deferred requests go to a lane that is up too (the
// I/O threads send them).
TEST_F(RedisLookupTest, RequestsGoToALaneThatIsUpWhenOneLostItsConnection) {
  LogLines log;
  RedisStoreOptions o = NamedOptions(RedisFailurePolicy::kFailClosed);
  o.pool_size = 3;
  o.command_timeout_nanos = 2 * kSec;
  o.log = log.Sink();
  auto store = Make(o);
  ASSERT_EQ(OtherClientIds().size(), 3u);
  RedisStore::LoopConnection c;
  ASSERT_EQ(SendFromLoop(*store, &c), RedisStore::LoopResult::kNewConnection);
  const std::string id = ClientIdOf(c.fd);
  ASSERT_FALSE(id.empty());
  // The name no longer resolves: the lane whose connection Redis closes
  // cannot reconnect and stays down.
  LookupGate::Get().AnswerOnly(0);
  ASSERT_EQ(server_.Command({"CLIENT", "KILL", "ID", id}).integer, 1);
  ASSERT_TRUE(log.WaitCount(RedisLogLevel::kWarning, "cannot reach redis", 1,
                            std::chrono::milliseconds(5000)))
      << log.All();
  EXPECT_EQ(OtherClientIds().size(), 2u);
  ExpectEveryRequestAnsweredByRedis(*store);
  const Limit l = L("1000 per minute");
  AsyncWait w;
  w.pending = 6;
  for (int i = 0; i < 6; ++i) {
    Request r{Strategy::kFixedWindow, &l, "LIMITER/deferred", 1};
    store->DecideAsyncDeferred(&r, 1, kT0 + i, Mode::kHit, &AsyncDone, &w);
  }
  // What a loop does when its connection cannot take the batch.
  EXPECT_NE(store->LoopFlush(&c), RedisStore::LoopResult::kSent);
  store->Flush();
  ASSERT_TRUE(WaitAll(w, *store, std::chrono::seconds(10)));
  EXPECT_EQ(w.allowed, 6);
  for (DecisionSource source : w.sources) {
    EXPECT_EQ(source, DecisionSource::kStore);
  }
  EXPECT_EQ(store->Stats().fail_closed, 0u);
}

TEST_F(RedisLookupTest, AttemptsShareTheNameLookupInFlight) {
  // A name server that does not answer: each attempt gives up at its
  // deadline and leaves the lookup in flight. Later attempts wait for that
  // lookup instead of starting one more (each on a thread left behind).
  LookupGate& gate = LookupGate::Get();
  gate.Shut();
  OpenGateAtEnd open_at_end;
  const RedisStoreOptions o = NamedOptions(RedisFailurePolicy::kFailClosed);
  std::atomic<int> timed_out{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 5; ++i) {
        std::string error;
        const int fd =
            redis::ConnectSocket(o, redis::MonoNanos() + 20 * kMs, &error);
        if (fd >= 0) close(fd);
        if (fd < 0 && error.find("timed out") != std::string::npos) {
          timed_out.fetch_add(1);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(timed_out.load(), 20);
  EXPECT_EQ(gate.calls(), 1);
  EXPECT_EQ(gate.max_in_flight(), 1);
  // Once the name server answers, the next attempt connects with that
  // answer; the one after it looks the name up again.
  gate.Open();
  for (const int lookups : {1, 2}) {
    std::string error;
    const int fd =
        redis::ConnectSocket(o, redis::MonoNanos() + 10 * kSec, &error);
    EXPECT_GE(fd, 0) << error;
    if (fd >= 0) close(fd);
    EXPECT_EQ(gate.calls(), lookups);
  }
}

TEST_F(RedisLookupTest, ReconnectAttemptsDoNotPileUpNameLookups) {
  LookupGate& gate = LookupGate::Get();
  LogLines log;
  RedisStoreOptions o = NamedOptions(RedisFailurePolicy::kFailClosed);
  o.pool_size = 3;
  o.connect_timeout_nanos = 20 * kMs;
  o.reconnect_min_nanos = kMs;
  o.reconnect_max_nanos = kMs;
  o.log = log.Sink();
  gate.Shut();
  auto store = Make(o);
  OpenGateAtEnd open_at_end;
  EXPECT_FALSE(store->Connected());
  // The lanes keep trying, every attempt giving up after 20 ms.
  ASSERT_TRUE(log.WaitCount(RedisLogLevel::kDebug, "failed: resolve", 30,
                            std::chrono::milliseconds(10'000)))
      << log.All();
  EXPECT_EQ(gate.calls(), 1);
  EXPECT_EQ(gate.max_in_flight(), 1);
  gate.Open();
  EXPECT_TRUE(WaitRecovered(*store, std::chrono::milliseconds(5000)));
  EXPECT_EQ(gate.max_in_flight(), 1);
}

TEST_F(RedisLookupTest, ForkedChildLooksTheNameUpItself) {
  // The parent's lookup in flight has no thread in a forked child: the
  // child's store must not wait for it.
  auto store = Make(NamedOptions(RedisFailurePolicy::kFailClosed));
  ASSERT_TRUE(store->Connected());
  LookupGate& gate = LookupGate::Get();
  gate.Shut();
  OpenGateAtEnd open_at_end;
  std::string error;
  ASSERT_LT(redis::ConnectSocket(store->options(),
                                 redis::MonoNanos() + 10 * kMs, &error),
            0);
  ASSERT_TRUE(gate.WaitCalls(2, std::chrono::milliseconds(5000)));
  const pid_t pid = testing::ForkWhenQuiet();
  if (pid == 0) {
    // The gate's waiter is the parent's thread: no gate here.
    redis::g_getaddrinfo = &getaddrinfo;
    const Decision d =
        Hit(*store, Strategy::kFixedWindow, L("3 per minute"), "k", kT0);
    store->Close();
    _exit(d.source == DecisionSource::kStore ? 0 : 1);
  }
  const std::optional<int> status =
      testing::WaitChild(pid, std::chrono::seconds(10));
  ASSERT_TRUE(status.has_value()) << "the child hung";
  ASSERT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 0);
}

TEST_F(RedisStoreTest, CloseIsBoundedAndLaterCallsGetThePolicy) {
  auto store = Make(Options(RedisFailurePolicy::kFailOpen));
  const Limit l = L("1/second");
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).source,
            DecisionSource::kStore);
  const auto start = std::chrono::steady_clock::now();
  store->Close();
  store->Close();
  EXPECT_LT(std::chrono::steady_clock::now() - start,
            std::chrono::milliseconds(200));
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).source,
            DecisionSource::kFailOpen);
}

// A closed store held on to (an application's limiter kept by a framework's
// caches) keeps no file open: neither its connections nor its I/O threads'
// wake-ups.
TEST_F(RedisStoreTest, CloseReleasesEveryFile) {
  auto open_files = [] {
    return std::distance(std::filesystem::directory_iterator("/proc/self/fd"),
                         std::filesystem::directory_iterator{});
  };
  const auto before = open_files();
  RedisStoreOptions o = Options();
  o.pool_size = 3;
  auto store = Make(o);
  EXPECT_TRUE(
      Hit(*store, Strategy::kFixedWindow, L("9/second"), "k", kT0).allowed);
  EXPECT_GE(open_files(), before + 6);
  store->Close();
  EXPECT_EQ(open_files(), before);
}

// The I/O thread reconnects to a server that accepts and never answers,
// with a long connect timeout: Close() ends that connect rather than
// waiting it out (at interpreter exit, once per lane).
TEST_F(RedisStoreTest, CloseDoesNotWaitForAReconnect) {
  testing::SilentServer silent;
  auto store = MakeSilent(silent, 1500 * kMs);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto start = std::chrono::steady_clock::now();
  store->Close();
  EXPECT_LT(std::chrono::steady_clock::now() - start,
            std::chrono::milliseconds(500));
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, L("1/second"), "k", kT0).source,
            DecisionSource::kFailOpen);
}

// Every kind of call at once, on two connections, while Redis keeps
// dropping them (CLIENT KILL: callers running a round trip inline meet the
// break while the I/O threads reconnect), and then Close under the
// traffic: every request is answered, each asynchronous one exactly once,
// and nothing hangs. Meant for ThreadSanitizer as much as for its checks.
TEST_F(RedisStoreTest, CallsOfEveryKindThroughDisconnectsAndClose) {
  RedisStoreOptions o = Options(RedisFailurePolicy::kFallback);
  o.pool_size = 2;
  o.command_timeout_nanos = 2 * kSec;
  auto store = Make(o);
  ASSERT_TRUE(store->Connected());
  // Low enough that rejections fill the blocked-key cache.
  const Limit l = L("20 per second");
  std::atomic<bool> stop{false};
  struct Answers {
    std::atomic<int> sent{0}, answered{0}, empty{0};
  } async;
  const DecideCallback done = [](void* ctx, const Decision*, size_t written,
                                 size_t) {
    auto* a = static_cast<Answers*>(ctx);
    if (written == 0) a->empty.fetch_add(1);
    a->answered.fetch_add(1);
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {  // synchronous callers
    threads.emplace_back([&, t] {
      for (int64_t i = 0; !stop.load(); ++i) {
        const std::string key = "LIMITER/s" + std::to_string((i + t) % 5);
        const int64_t now = kT0 + i * kMs;
        Hit(*store, Strategy::kFixedWindow, l, key, now);
        Hit(*store, Strategy::kMovingWindow, l, key, now);
        if (i % 7 == 0) {
          const Request r{Strategy::kSlidingWindowCounter, &l, key, 1};
          store->Inspect(r, now);
          store->Incr(key, kSec, 1, now, nullptr);
        }
      }
    });
  }
  threads.emplace_back([&] {  // asynchronous callers, deferred or not
    for (int64_t i = 0; !stop.load(); ++i) {
      const std::string key = "LIMITER/a" + std::to_string(i % 5);
      const Request r{Strategy::kTokenBucket, &l, key, 1};
      async.sent.fetch_add(1);
      if (i % 2 == 0) {
        store->DecideAsync(&r, 1, kT0 + i * kMs, Mode::kHit, done, &async);
      } else {
        store->DecideAsyncDeferred(&r, 1, kT0 + i * kMs, Mode::kHit, done,
                                   &async);
        if (i % 8 == 7) store->Flush();
      }
      if (i % 64 == 63) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    store->Flush();
  });
  threads.emplace_back([&] {  // reads and resets
    for (int i = 0; !stop.load(); ++i) {
      (void)store->Stats();
      (void)store->Connected();
      store->Clear(Strategy::kFixedWindow, "LIMITER/s" + std::to_string(i % 5));
      if (i % 10 == 0) store->Reset();
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  for (int i = 0; i < 8; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    server_.Command({"CLIENT", "KILL", "TYPE", "normal"});
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  store->Close();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  stop.store(true);
  for (auto& t : threads) t.join();
  // Close answered whatever was queued or in flight; later requests were
  // answered when submitted.
  EXPECT_EQ(async.answered.load(), async.sent.load());
  EXPECT_EQ(async.empty.load(), 0);
  EXPECT_GT(store->Stats().disconnects, 0u);
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "LIMITER/late", kT0).source,
            DecisionSource::kFallback);
}

// Holds an I/O thread in its connect, once the new connection is
// published, until released (redis::g_connected_hook).
std::atomic<bool> g_hold_armed{false}, g_holding{false}, g_release{false};
void HoldAfterConnect() {
  if (!g_hold_armed.exchange(false)) return;
  g_holding.store(true);
  while (!g_release.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// Holds the next connect (HoldAfterConnect) for its scope.
class HeldConnect {
 public:
  HeldConnect() {
    g_release.store(false);
    g_holding.store(false);
    g_hold_armed.store(true);
    redis::g_connected_hook.store(&HoldAfterConnect);
  }
  ~HeldConnect() {
    Release();
    redis::g_connected_hook.store(nullptr);
  }
  HeldConnect(const HeldConnect&) = delete;
  HeldConnect& operator=(const HeldConnect&) = delete;

  // Whether an I/O thread is held, within 5 s.
  bool WaitHolding() const {
    const auto until =
        std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!g_holding.load() && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return g_holding.load();
  }
  void Release() { g_release.store(true); }
};

// A caller running inline breaks a connection the moment the I/O thread
// has published it, before that thread's connect has returned: the lane
// is down, and requests must get the policy at once rather than queue for
// the next connect attempt. The connect set accepting_ after publishing
// the connection, outside conn_mu_, undoing the caller's StopAccepting:
// the next request waited its whole timeout (fails on that code).
TEST_F(RedisStoreTest, InlineBreakRightAfterAReconnectStopsAccepting) {
  auto store = Make(Options(RedisFailurePolicy::kFailClosed));
  const Limit l = L("1000 per minute");
  ASSERT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).source,
            DecisionSource::kStore);
  HeldConnect held;
  // Redis drops the idle connection: the I/O thread reconnects and stops
  // in the hook with the new connection up.
  ASSERT_TRUE(server_.Command({"CLIENT", "KILL", "TYPE", "normal"}).ok());
  ASSERT_TRUE(held.WaitHolding());
  // Redis stops answering; a request run inline times out and breaks the
  // new connection.
  std::thread sleeper = server_.SleepInBackground("0.8");
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).source,
            DecisionSource::kFailClosed);
  EXPECT_FALSE(store->Connected());
  const uint64_t timeouts = store->Stats().timeouts;
  // The I/O thread finishes its connect and starts the next (the server
  // still sleeps, so that one waits for its handshake's reply).
  held.Release();
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).source,
            DecisionSource::kFailClosed);
  EXPECT_LT(std::chrono::steady_clock::now() - start,
            std::chrono::milliseconds(100));
  EXPECT_EQ(store->Stats().timeouts, timeouts);
  sleeper.join();
  EXPECT_TRUE(WaitRecovered(*store, std::chrono::milliseconds(3000)));
}

// An asynchronous request's timeout starts when it is sent, unless it
// waited for a reconnect: that wait is Redis's, and its deadline bounds it.
// Here the request is queued while the I/O thread waits for the name of a
// reconnect, which then completes, and the thread is held past the
// request's deadline before it sends the queue: the request gets the
// policy. (Restarted at the send, its timeout let the caller wait for
// the reconnect and then a whole timeout more: Redis answered it.)
TEST_F(RedisLookupTest, AsyncRequestThatWaitedForAReconnectKeepsItsDeadline) {
  LookupGate& gate = LookupGate::Get();
  RedisStoreOptions o = NamedOptions(RedisFailurePolicy::kFailOpen);
  o.command_timeout_nanos = 300 * kMs;
  o.connect_timeout_nanos = 20 * kSec;
  auto store = Make(o);
  OpenGateAtEnd open_at_end;
  ASSERT_TRUE(store->Connected());
  const Limit l = L("5 per minute");
  ASSERT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).source,
            DecisionSource::kStore);
  HeldConnect held;
  gate.Shut();
  ASSERT_EQ(server_.Command({"CLIENT", "KILL", "TYPE", "normal"}).integer, 1);
  ASSERT_TRUE(gate.WaitCalls(2, std::chrono::milliseconds(5000)));
  AsyncAnswer queued(*store, l, "k", kT0 + 1);
  gate.Open();
  ASSERT_TRUE(held.WaitHolding());
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  held.Release();
  const std::optional<Decision> d = queued.Wait(std::chrono::seconds(10));
  ASSERT_TRUE(d.has_value()) << "no answer";
  EXPECT_EQ(d->source, DecisionSource::kFailOpen);
  // The reconnect was no outage: the next request is Redis's.
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + 2).source,
            DecisionSource::kStore);
}

// -------------------------------------------------------------------- fork

TEST_F(RedisStoreTest, ForkedChildGetsItsOwnConnection) {
  auto store = Make(Options());
  const Limit l = L("3 per minute");
  EXPECT_TRUE(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).allowed);
  const pid_t pid = testing::ForkWhenQuiet();
  if (pid == 0) {
    // Child: no gtest here; report through the exit code.
    const Decision d = Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + 1);
    const bool ok =
        d.allowed && d.remaining == 1 && d.source == DecisionSource::kStore;
    store->Close();
    _exit(ok ? 0 : 1);
  }
  const std::optional<int> status =
      testing::WaitChild(pid, std::chrono::seconds(10));
  ASSERT_TRUE(status.has_value()) << "the child hung";
  ASSERT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 0);
  // The parent's connection is intact and sees the child's hit.
  const Decision d = Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + 2);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.remaining, 0);
  EXPECT_EQ(d.source, DecisionSource::kStore);
}

TEST_F(RedisStoreTest, ForkWhileAnotherThreadClosesTheStore) {
  // Another thread of the app closes the store while the I/O thread
  // connects to a server that never answers, and forks meanwhile: the
  // child's calls and Close() must still return, whatever the closing
  // thread held at the fork.
  testing::SilentServer silent;
  auto store = MakeSilent(silent, 300 * kMs);
  std::thread closer([&] { store->Close(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const pid_t pid = testing::ForkWhenQuiet();
  if (pid == 0) {
    const Decision d =
        Hit(*store, Strategy::kFixedWindow, L("1/second"), "k", kT0);
    store->Close();
    _exit(d.source == DecisionSource::kFailOpen ? 0 : 1);
  }
  const std::optional<int> status =
      testing::WaitChild(pid, std::chrono::seconds(5));
  closer.join();
  ASSERT_TRUE(status.has_value()) << "the child hung";
  ASSERT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 0);
}

// A forked child that does nothing but hold what fork gave it, until this
// goes out of scope.
class IdleChild {
 public:
  IdleChild() : pid_(testing::ForkWhenQuiet()) {
    if (pid_ == 0) {
      std::this_thread::sleep_for(std::chrono::seconds(10));
      _exit(0);
    }
  }
  IdleChild(const IdleChild&) = delete;
  IdleChild& operator=(const IdleChild&) = delete;
  ~IdleChild() {
    kill(pid_, SIGKILL);
    EXPECT_TRUE(testing::WaitChild(pid_, std::chrono::seconds(5)).has_value())
        << "the idle child did not die";
  }

 private:
  const pid_t pid_;
};

// A child holding a copy of a socket keeps that connection open in Redis
// (the server sees no close) for as long as it lives, whatever the parent
// does with it.
TEST_F(RedisStoreTest, ForkedChildDoesNotKeepTheParentsConnectInFlight) {
  testing::SilentServer silent;
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailOpen);
  o.port = silent.port();
  o.connect_timeout_nanos = 300 * kMs;
  std::unique_ptr<RedisStore> store;
  // The first connect runs in the constructor: here, in another thread,
  // which waits for the silent server's reply when the fork comes.
  std::thread maker([&] { store = Make(o); });
  ASSERT_TRUE(silent.Accept(std::chrono::milliseconds(2000)));
  IdleChild child;
  maker.join();  // the parent gave the connect up after 300 ms
  EXPECT_TRUE(silent.WaitClosed(0, std::chrono::milliseconds(2000)))
      << "the child kept the connect's socket open";
}

// The same one generation down: a child's first call connects a new
// engine while another thread of the child forks.
TEST_F(RedisStoreTest, GrandchildDoesNotKeepTheChildsConnectInFlight) {
  testing::SilentServer silent;
  RedisStoreOptions o = Options(RedisFailurePolicy::kFailOpen);
  o.port = silent.port();
  o.connect_timeout_nanos = 600 * kMs;
  // The parent tries once, here, and not again during the test.
  o.reconnect_min_nanos = 60 * kSec;
  o.reconnect_max_nanos = 60 * kSec;
  auto store = Make(o);
  silent.Drain();
  const pid_t child = testing::ForkWhenQuiet();
  if (child == 0) {
    // Exit codes: 0 the grandchild let the connect go, 1 it kept it, 2
    // the child's connect never came.
    std::thread first_call(
        [&] { Hit(*store, Strategy::kFixedWindow, L("1/second"), "k", kT0); });
    const size_t taken = silent.accepted();
    int code = 2;
    if (silent.Accept(std::chrono::milliseconds(5000))) {
      IdleChild grandchild;
      first_call.join();  // the child gave the connect up
      code = silent.WaitClosed(taken, std::chrono::milliseconds(2000)) ? 0 : 1;
    } else {
      first_call.join();
    }
    _exit(code);
  }
  const std::optional<int> status =
      testing::WaitChild(child, std::chrono::seconds(20));
  ASSERT_TRUE(status.has_value()) << "the child hung";
  ASSERT_TRUE(WIFEXITED(*status));
  EXPECT_EQ(WEXITSTATUS(*status), 0)
      << "1: the grandchild kept the child's connect open; 2: no connect";
}

TEST_F(RedisStoreTest, ForkedChildNotUsingTheStoreKeepsNoConnection) {
  auto clients = [this] {
    const testing::Reply r = server_.Command({"CLIENT", "LIST"});
    int n = 0;
    for (size_t at = 0; (at = r.str.find("cmd=", at)) != std::string::npos;
         ++at) {
      if (r.str.compare(at, 15, "cmd=client|list") != 0) ++n;
    }
    return n;
  };
  auto store = Make(Options());
  ASSERT_TRUE(store->Connected());
  ASSERT_EQ(clients(), 1);
  IdleChild child;
  store->Close();
  int left = clients();
  for (int i = 0; i < 100 && left != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    left = clients();
  }
  EXPECT_EQ(left, 0) << "the idle child kept the parent's connection open";
}

// Another thread closes or destroys a store while this one forks: after
// the pthread_atfork handlers, the child holds no socket to Redis (it held
// one in about a third of such forks when a destroyed store left the
// registry before closing, and a socket's number was published and closed
// outside the lock fork takes). Not under ASan: a fork while another
// thread is busy may leave the child its allocator's lock (see
// testing::ForkWhenQuiet).
TEST_F(RedisStoreTest, ForkWhileAnotherThreadClosesLeavesTheChildNoSocket) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "fork while another thread runs: not under ASan";
#else
  const int port = server_.port();
  // Sockets connected to the Redis port, counted by a child; no gtest there.
  const auto sockets_to_redis = [port] {
    int n = 0;
    DIR* dir = opendir("/proc/self/fd");
    while (dirent* e = readdir(dir)) {
      const int fd = std::atoi(e->d_name);
      if (e->d_name[0] == '.' || fd == dirfd(dir)) continue;
      sockaddr_in peer{};
      socklen_t len = sizeof(peer);
      if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) == 0 &&
          peer.sin_family == AF_INET && ntohs(peer.sin_port) == port) {
        ++n;
      }
    }
    closedir(dir);
    return n;
  };
  std::minstd_rand rng(7);
  int leaked = 0;
  const int rounds = 200;
  for (int i = 0; i < rounds; ++i) {
    std::unique_ptr<RedisStore> store = Make(Options());
    ASSERT_TRUE(store->Connected());
    const bool destroy = i % 2 == 0;
    std::atomic<bool> go{false};
    std::thread closer([&] {
      go.store(true);
      if (destroy) {
        store.reset();
      } else {
        store->Close();
      }
    });
    while (!go.load()) {
    }
    // A random moment of the close: its thread's join, the socket's close.
    const auto until = std::chrono::steady_clock::now() +
                       std::chrono::nanoseconds(rng() % 10'000);
    while (std::chrono::steady_clock::now() < until) {
    }
    const pid_t pid = fork();
    if (pid == 0) _exit(std::min(sockets_to_redis(), 100));
    closer.join();
    const std::optional<int> status =
        testing::WaitChild(pid, std::chrono::seconds(10));
    ASSERT_TRUE(status.has_value()) << "the child hung";
    if (WIFEXITED(*status) && WEXITSTATUS(*status) > 0) ++leaked;
  }
  EXPECT_EQ(leaked, 0) << "of " << rounds << " children";
#endif
}

TEST_F(RedisStoreTest, PingMeasuresRoundTrip) {
  auto store = Make(Options());
  int64_t rtt = 0;
  EXPECT_TRUE(store->Ping(&rtt));
  EXPECT_GT(rtt, 0);
  EXPECT_LT(rtt, 100 * kMs);
}

}  // namespace
}  // namespace rapidlimit

#else  // !RAPIDLIMIT_HAVE_HIREDIS

namespace rapidlimit {
namespace {

TEST(RedisStoreTest, BuiltWithoutHiredis) {
  EXPECT_FALSE(RedisStoreAvailable());
  std::string error;
  EXPECT_EQ(NewRedisStore(RedisStoreOptions{}, &error), nullptr);
  EXPECT_NE(error.find("without hiredis"), std::string::npos) << error;
}

}  // namespace
}  // namespace rapidlimit

#endif  // RAPIDLIMIT_HAVE_HIREDIS
