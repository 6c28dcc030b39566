// The in-memory store: batches, inspection, limits' incr, clear/reset,
// exact admission under contention, the key cap and its eviction order.
// Time is a ManualClock or an explicit `now`; nothing sleeps. Run under
// ASan (RAPIDLIMIT_SANITIZE=ON) to check that moving-window logs are freed.
#include "rapidlimit/memory_store.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace rapidlimit {
namespace {

using test_util::kMs;
using test_util::kSec;
using test_util::kT0;
using test_util::MakeLimit;

constexpr Strategy kAllStrategies[] = {
    Strategy::kFixedWindow, Strategy::kMovingWindow,
    Strategy::kSlidingWindowCounter, Strategy::kTokenBucket};

Request Req(Strategy s, const Limit& l, std::string_view key,
            int64_t cost = 1) {
  Request r;
  r.strategy = s;
  r.limit = &l;
  r.key = key;
  r.cost = cost;
  return r;
}

Decision Hit(Store& store, Strategy s, const Limit& l, std::string_view key,
             int64_t now, int64_t cost = 1) {
  const Request r = Req(s, l, key, cost);
  Decision d;
  store.Decide(&r, 1, now, Mode::kHit, &d);
  return d;
}

Decision Peek(Store& store, Strategy s, const Limit& l, std::string_view key,
              int64_t now, int64_t cost = 1) {
  const Request r = Req(s, l, key, cost);
  Decision d;
  store.Decide(&r, 1, now, Mode::kTest, &d);
  return d;
}

int64_t Count(Store& store, Strategy s, const Limit& l, std::string_view key,
              int64_t now) {
  return store.Inspect(Req(s, l, key), now).count;
}

std::unique_ptr<Store> SingleShard(size_t max_keys) {
  MemoryStoreOptions o;
  o.shards = 1;
  o.max_keys = max_keys;
  return NewMemoryStore(o);
}

class PerStrategy : public ::testing::TestWithParam<Strategy> {};

INSTANTIATE_TEST_SUITE_P(AllStrategies, PerStrategy,
                         ::testing::ValuesIn(kAllStrategies),
                         [](const ::testing::TestParamInfo<Strategy>& info) {
                           std::string name(StrategyName(info.param));
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// ------------------------------------------------------------------ Decide

TEST_P(PerStrategy, HitBatchStopsAtTheFirstRejection) {
  auto store = NewMemoryStore();
  const Limit big = MakeLimit(10, 1, Granularity::kMinute);
  const Limit one = MakeLimit(1, 1, Granularity::kMinute);
  ASSERT_TRUE(Hit(*store, GetParam(), one, "b", kT0).allowed);
  const Request reqs[] = {Req(GetParam(), big, "a"), Req(GetParam(), one, "b"),
                          Req(GetParam(), big, "c")};
  Decision out[3];
  out[2].limit = -42;  // must stay untouched
  EXPECT_EQ(store->Decide(reqs, 3, kT0 + kSec, Mode::kHit, out), 1u);
  EXPECT_TRUE(out[0].allowed);
  EXPECT_EQ(out[0].remaining, 9);
  EXPECT_FALSE(out[1].allowed);
  EXPECT_GT(out[1].retry_after_nanos, 0);
  EXPECT_EQ(out[2].limit, -42);
  // "a" was charged, "c" was not.
  EXPECT_EQ(Count(*store, GetParam(), big, "a", kT0 + kSec), 1);
  EXPECT_EQ(Count(*store, GetParam(), big, "c", kT0 + kSec), 0);
  EXPECT_EQ(Peek(*store, GetParam(), big, "c", kT0 + kSec).remaining, 10);
}

TEST_P(PerStrategy, TestBatchEvaluatesEverythingAndChargesNothing) {
  auto store = NewMemoryStore();
  const Limit big = MakeLimit(10, 1, Granularity::kMinute);
  const Limit one = MakeLimit(1, 1, Granularity::kMinute);
  ASSERT_TRUE(Hit(*store, GetParam(), one, "b", kT0).allowed);
  const size_t size = store->Size();
  const Request reqs[] = {Req(GetParam(), big, "a"), Req(GetParam(), one, "b"),
                          Req(GetParam(), big, "c"),
                          Req(GetParam(), one, "d", 2)};
  Decision out[4];
  EXPECT_EQ(store->Decide(reqs, 4, kT0 + kSec, Mode::kTest, out), 1u);
  EXPECT_TRUE(out[0].allowed);
  EXPECT_FALSE(out[1].allowed);
  EXPECT_TRUE(out[2].allowed);
  EXPECT_EQ(out[2].remaining, 10);
  EXPECT_EQ(out[2].limit, 10);
  EXPECT_FALSE(out[3].allowed);  // cost above amount
  EXPECT_EQ(store->Size(), size);
  EXPECT_EQ(Count(*store, GetParam(), big, "a", kT0 + kSec), 0);
  // Nothing rejected: returns n.
  EXPECT_EQ(store->Decide(reqs, 1, kT0 + kSec, Mode::kTest, out), 1u);
  EXPECT_EQ(store->Decide(reqs, 0, kT0 + kSec, Mode::kHit, out), 0u);
}

TEST_P(PerStrategy, SameKeyTwiceInOneBatchIsSequential) {
  auto store = NewMemoryStore();
  const Limit l = MakeLimit(3, 1, Granularity::kHour);
  const Request reqs[] = {Req(GetParam(), l, "k", 2),
                          Req(GetParam(), l, "k", 2)};
  Decision out[2];
  EXPECT_EQ(store->Decide(reqs, 2, kT0, Mode::kHit, out), 1u);
  EXPECT_TRUE(out[0].allowed);
  EXPECT_EQ(out[0].remaining, 1);
  EXPECT_FALSE(out[1].allowed);
}

TEST_P(PerStrategy, DecideAsyncDefaultReportsWhatWasWritten) {
  auto store = NewMemoryStore();
  const Limit l = MakeLimit(1, 1, Granularity::kHour);
  const Request reqs[] = {Req(GetParam(), l, "x"), Req(GetParam(), l, "x"),
                          Req(GetParam(), l, "y")};
  struct Seen {
    int calls = 0;
    size_t written = 0;
    size_t first_reject = 0;
    bool first_allowed = false;
  } seen;
  auto done = [](void* ctx, const Decision* d, size_t written,
                 size_t first_reject) {
    auto* s = static_cast<Seen*>(ctx);
    ++s->calls;
    s->written = written;
    s->first_reject = first_reject;
    s->first_allowed = written > 0 && d[0].allowed;
  };
  store->DecideAsync(reqs, 3, kT0, Mode::kHit, done, &seen);
  EXPECT_EQ(seen.calls, 1);
  EXPECT_EQ(seen.written, 2u);
  EXPECT_EQ(seen.first_reject, 1u);
  EXPECT_TRUE(seen.first_allowed);
  store->DecideAsync(reqs, 3, kT0, Mode::kTest, done, &seen);
  EXPECT_EQ(seen.written, 3u);
  EXPECT_EQ(seen.first_reject, 0u);
}

TEST_P(PerStrategy, UnknownKeysAndTestsTakeNoSlot) {
  auto store = NewMemoryStore();
  const Limit l = MakeLimit(2, 1);
  const Limit zero = MakeLimit(0, 1);
  EXPECT_TRUE(Peek(*store, GetParam(), l, "a", kT0).allowed);
  EXPECT_EQ(store->Inspect(Req(GetParam(), l, "a"), kT0).count, 0);
  EXPECT_EQ(store->Size(), 0u);
  Hit(*store, GetParam(), zero, "z", kT0);
  if (GetParam() == Strategy::kMovingWindow ||
      GetParam() == Strategy::kTokenBucket) {
    // Refused requests leave no state for these two.
    EXPECT_EQ(store->Size(), 0u);
  }
  EXPECT_TRUE(Hit(*store, GetParam(), l, "a", kT0).allowed);
  EXPECT_EQ(store->Size(), GetParam() == Strategy::kMovingWindow ||
                                   GetParam() == Strategy::kTokenBucket
                               ? 1u
                               : 2u);
}

TEST_P(PerStrategy, KeysAreBytesAndStrategiesAreSeparate) {
  auto store = NewMemoryStore();
  const Limit l = MakeLimit(1, 1, Granularity::kHour);
  const std::string with_nul("a\0b", 3);
  const std::string long_key(10'000, 'x');
  EXPECT_TRUE(Hit(*store, GetParam(), l, "a", kT0).allowed);
  EXPECT_TRUE(Hit(*store, GetParam(), l, with_nul, kT0).allowed);
  EXPECT_TRUE(
      Hit(*store, GetParam(), l, std::string_view("a\0c", 3), kT0).allowed);
  EXPECT_TRUE(Hit(*store, GetParam(), l, long_key, kT0).allowed);
  EXPECT_TRUE(Hit(*store, GetParam(), l, "", kT0).allowed);
  EXPECT_FALSE(Hit(*store, GetParam(), l, with_nul, kT0).allowed);
  EXPECT_FALSE(Hit(*store, GetParam(), l, long_key, kT0).allowed);
  EXPECT_FALSE(Hit(*store, GetParam(), l, "", kT0).allowed);
  for (Strategy other : kAllStrategies) {
    if (other == GetParam()) continue;
    EXPECT_TRUE(Hit(*store, other, l, "a", kT0).allowed) << StrategyName(other);
  }
}

TEST_P(PerStrategy, AFingerprintStandsForItsKey) {
  auto store = NewMemoryStore();
  ASSERT_TRUE(store->AcceptsFingerprints());
  const Limit l = MakeLimit(2, 1, Granularity::kHour);
  Request by_print = Req(GetParam(), l, "");
  by_print.has_fingerprint = true;
  by_print.fingerprint = MemoryKeyFingerprint("LIMITER/a/2/1/hour");
  Decision d;
  store->Decide(&by_print, 1, kT0, Mode::kHit, &d);
  EXPECT_TRUE(d.allowed);
  // The same key by its bytes shares the state; the empty key does not.
  EXPECT_EQ(Count(*store, GetParam(), l, "LIMITER/a/2/1/hour", kT0), 1);
  EXPECT_EQ(Count(*store, GetParam(), l, "", kT0), 0);
  EXPECT_TRUE(Hit(*store, GetParam(), l, "LIMITER/a/2/1/hour", kT0).allowed);
  store->Decide(&by_print, 1, kT0, Mode::kHit, &d);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(store->Inspect(by_print, kT0).count,
            Count(*store, GetParam(), l, "LIMITER/a/2/1/hour", kT0));
  EXPECT_TRUE(store->Clear(GetParam(), "LIMITER/a/2/1/hour"));
  store->Decide(&by_print, 1, kT0, Mode::kTest, &d);
  EXPECT_TRUE(d.allowed);
}

TEST(MemoryStoreTest, FingerprintsAreKeyedPerProcessAndDiffer) {
  const KeyFingerprint a = MemoryKeyFingerprint("a");
  const KeyFingerprint a2 = MemoryKeyFingerprint(std::string("a"));
  const KeyFingerprint b = MemoryKeyFingerprint("b");
  EXPECT_EQ(a.lo, a2.lo);
  EXPECT_EQ(a.hi, a2.hi);
  EXPECT_NE(a.lo, b.lo);
  EXPECT_NE(a.hi, b.hi);
}

// ------------------------------------------------------- Inspect and stats

TEST(MemoryStoreTest, InspectReportsEachStrategysState) {
  auto store = NewMemoryStore();
  const Limit l = MakeLimit(5, 10);
  const int64_t w0 = kT0 - kT0 % (10 * kSec);
  const int64_t t = w0 + 2 * kSec;
  // Unknown keys: empty, time = now.
  for (Strategy s : kAllStrategies) {
    const WindowState w = store->Inspect(Req(s, l, "k"), t);
    EXPECT_EQ(w.count, 0) << StrategyName(s);
    if (s != Strategy::kSlidingWindowCounter) {
      EXPECT_EQ(w.time_nanos, t) << StrategyName(s);
    }
  }
  for (Strategy s : kAllStrategies) {
    ASSERT_TRUE(Hit(*store, s, l, "k", t, 2).allowed);
    ASSERT_TRUE(Hit(*store, s, l, "k", t + kSec, 1).allowed);
  }
  const int64_t now = t + 3 * kSec;
  WindowState w = store->Inspect(Req(Strategy::kFixedWindow, l, "k"), now);
  EXPECT_EQ(w.count, 3);
  EXPECT_EQ(w.time_nanos, t + 10 * kSec);
  w = store->Inspect(Req(Strategy::kMovingWindow, l, "k"), now);
  EXPECT_EQ(w.count, 3);
  EXPECT_EQ(w.time_nanos, t);
  w = store->Inspect(Req(Strategy::kSlidingWindowCounter, l, "k"), now);
  EXPECT_EQ(w.count, 3);
  EXPECT_EQ(w.previous_count, 0);
  EXPECT_EQ(w.current_ttl_nanos, 2 * 10 * kSec - 5 * kSec);
  EXPECT_EQ(w.time_nanos, w0 + 10 * kSec);
  // Token bucket: 3 tokens of 2s each taken, 3s refilled -> 1.5 in use.
  w = store->Inspect(Req(Strategy::kTokenBucket, l, "k"), now);
  EXPECT_EQ(w.count, 2);
  EXPECT_EQ(w.time_nanos, t + 6 * kSec);
  // Inspect never charges.
  EXPECT_EQ(store->Inspect(Req(Strategy::kFixedWindow, l, "k"), now).count, 3);
}

TEST(MemoryStoreTest, FixedWindowExpiresExactlyAtItsExpiry) {
  auto store = NewMemoryStore();
  const Limit l = MakeLimit(1, 1);
  ASSERT_TRUE(Hit(*store, Strategy::kFixedWindow, l, "k", kT0).allowed);
  EXPECT_FALSE(
      Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + kSec - 1).allowed);
  EXPECT_EQ(Count(*store, Strategy::kFixedWindow, l, "k", kT0 + kSec - 1), 2);
  EXPECT_EQ(Count(*store, Strategy::kFixedWindow, l, "k", kT0 + kSec), 0);
  const Decision d = Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + kSec);
  EXPECT_TRUE(d.allowed);
  EXPECT_EQ(d.reset_nanos, kT0 + 2 * kSec);
}

TEST(MemoryStoreTest, MovingWindowBoundaryThroughTheStore) {
  auto store = NewMemoryStore();
  const Limit l = MakeLimit(2, 1);
  ASSERT_TRUE(Hit(*store, Strategy::kMovingWindow, l, "k", kT0, 2).allowed);
  EXPECT_FALSE(
      Hit(*store, Strategy::kMovingWindow, l, "k", kT0 + kSec).allowed);
  EXPECT_EQ(Count(*store, Strategy::kMovingWindow, l, "k", kT0 + kSec), 0);
  EXPECT_TRUE(
      Hit(*store, Strategy::kMovingWindow, l, "k", kT0 + kSec + 1).allowed);
}

// -------------------------------------------------------------------- Incr

TEST(MemoryStoreTest, IncrFollowsLimitsAndSharesTheFixedWindowCounter) {
  auto store = NewMemoryStore();
  int64_t expiry_at = 0;
  EXPECT_EQ(store->Incr("k", 10 * kSec, 1, kT0, &expiry_at), 1);
  EXPECT_EQ(expiry_at, kT0 + 10 * kSec);
  EXPECT_EQ(store->Incr("k", 10 * kSec, 5, kT0 + kSec, &expiry_at), 6);
  EXPECT_EQ(expiry_at, kT0 + 10 * kSec);  // not extended
  EXPECT_EQ(store->Incr("k", 10 * kSec, 1, kT0 + 2 * kSec, nullptr), 7);
  // Exactly at expiry the counter starts over.
  EXPECT_EQ(store->Incr("k", 3 * kSec, 2, kT0 + 10 * kSec, &expiry_at), 2);
  EXPECT_EQ(expiry_at, kT0 + 13 * kSec);
  // The same state as the fixed window of a limit keyed "k".
  const Limit l = MakeLimit(3, 1, Granularity::kHour);
  EXPECT_EQ(Count(*store, Strategy::kFixedWindow, l, "k", kT0 + 11 * kSec), 2);
  EXPECT_TRUE(
      Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + 11 * kSec).allowed);
  EXPECT_EQ(store->Incr("k", kSec, 1, kT0 + 12 * kSec, nullptr), 4);
  EXPECT_FALSE(
      Hit(*store, Strategy::kFixedWindow, l, "k", kT0 + 12 * kSec).allowed);
  // Zero-cost incr on an empty key opens a window at 0; the next incr
  // restarts it (limits: counter == amount).
  EXPECT_EQ(store->Incr("z", 5 * kSec, 0, kT0, &expiry_at), 0);
  EXPECT_EQ(expiry_at, kT0 + 5 * kSec);
  EXPECT_EQ(store->Incr("z", 5 * kSec, 1, kT0 + kSec, &expiry_at), 1);
  EXPECT_EQ(expiry_at, kT0 + 6 * kSec);
}

// ------------------------------------------------------------ Clear/Reset

TEST(MemoryStoreTest, ClearForgetsOneKeyOfOneStrategy) {
  auto store = NewMemoryStore();
  const Limit l = MakeLimit(1, 1, Granularity::kHour);
  for (Strategy s : kAllStrategies) {
    ASSERT_TRUE(Hit(*store, s, l, "k", kT0).allowed);
    ASSERT_TRUE(Hit(*store, s, l, "other", kT0).allowed);
  }
  EXPECT_EQ(store->Size(), 8u);
  for (Strategy s : kAllStrategies) {
    EXPECT_TRUE(store->Clear(s, "k")) << StrategyName(s);
    EXPECT_FALSE(store->Clear(s, "k")) << StrategyName(s);
    EXPECT_FALSE(store->Clear(s, "never")) << StrategyName(s);
    EXPECT_TRUE(Hit(*store, s, l, "k", kT0).allowed) << StrategyName(s);
    EXPECT_FALSE(Hit(*store, s, l, "other", kT0).allowed) << StrategyName(s);
  }
  EXPECT_EQ(store->Size(), 8u);
}

TEST(MemoryStoreTest, ResetDropsEverythingAndFreesLogs) {
  auto store = NewMemoryStore();
  const Limit l = MakeLimit(500, 1, Granularity::kHour);
  for (int i = 0; i < 100; ++i) {
    const std::string key = "k" + std::to_string(i);
    for (Strategy s : kAllStrategies) {
      ASSERT_TRUE(Hit(*store, s, l, key, kT0, 300).allowed);
    }
  }
  EXPECT_EQ(store->Size(), 400u);
  const size_t full = MemoryStoreBytes(*store);
  EXPECT_GE(full, 100u * 300 * 8);  // the moving-window logs
  EXPECT_EQ(store->Reset(), 400u);
  EXPECT_EQ(store->Size(), 0u);
  EXPECT_LT(MemoryStoreBytes(*store), full / 10);
  EXPECT_EQ(store->Reset(), 0u);
  for (Strategy s : kAllStrategies) {
    EXPECT_EQ(Count(*store, s, l, "k1", kT0), 0);
    EXPECT_TRUE(Hit(*store, s, l, "k1", kT0, 500).allowed);
  }
}

// ------------------------------------------- exact admission, contention

// 16 threads hammer one key: exactly `amount` hits get through, whatever
// the interleaving. `now` is fixed, so nothing refills or expires.
TEST_P(PerStrategy, ExactAdmissionUnderContention) {
  auto store = NewMemoryStore();
  constexpr int kThreads = 16;
  constexpr int kHitsPerThread = 250;  // 4000 attempts for 1000 places
  const Limit l = MakeLimit(1000, 1, Granularity::kMinute);
  std::atomic<int64_t> admitted{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      while (!go.load()) std::this_thread::yield();
      int64_t mine = 0;
      for (int i = 0; i < kHitsPerThread; ++i) {
        mine += Hit(*store, GetParam(), l, "hot", kT0).allowed;
      }
      admitted += mine;
    });
  }
  go = true;
  for (auto& th : threads) th.join();
  EXPECT_EQ(admitted.load(), 1000);
  const int64_t count = Count(*store, GetParam(), l, "hot", kT0);
  if (GetParam() == Strategy::kFixedWindow) {
    // Every hit counted, rejected ones included (limits' semantics).
    EXPECT_EQ(count, kThreads * kHitsPerThread);
  } else {
    EXPECT_EQ(count, 1000);
  }
}

// Batches under contention: each request is atomic and the batch stops at
// its first rejection, so "b" is only tried after "a" admitted.
TEST_P(PerStrategy, ExactAdmissionOfBatchesUnderContention) {
  auto store = NewMemoryStore();
  const Limit a = MakeLimit(600, 1, Granularity::kMinute);
  const Limit b = MakeLimit(250, 1, Granularity::kMinute);
  std::atomic<int64_t> admitted_a{0}, admitted_b{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      const std::string mine = "k" + std::to_string(t);
      const Request reqs[] = {Req(GetParam(), a, "shared-a"),
                              Req(GetParam(), b, "shared-b"),
                              Req(GetParam(), a, mine)};
      for (int i = 0; i < 150; ++i) {
        Decision out[3];
        const size_t first = store->Decide(reqs, 3, kT0, Mode::kHit, out);
        admitted_a += out[0].allowed;
        admitted_b += first >= 2;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(admitted_a.load(), 600);
  EXPECT_EQ(admitted_b.load(), 250);
}

TEST(MemoryStoreTest, ManyKeysManyThreadsEachExact) {
  MemoryStoreOptions o;
  o.shards = 4;
  auto store = NewMemoryStore(o);
  const Limit l = MakeLimit(50, 1, Granularity::kHour);
  constexpr int kKeys = 64;
  std::vector<std::atomic<int64_t>> admitted(kKeys);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      for (int i = 0; i < 2000; ++i) {
        const int k = static_cast<int>(rng() % kKeys);
        const Strategy s = kAllStrategies[k % 4];
        if (Hit(*store, s, l, "key" + std::to_string(k), kT0).allowed) {
          ++admitted[k];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int k = 0; k < kKeys; ++k) EXPECT_EQ(admitted[k].load(), 50) << k;
}

// ---------------------------------------------------- key cap and eviction

TEST(MemoryStoreEvictionTest, ExpiredKeysGoBeforeLiveOnes) {
  ManualClock clock(kT0);
  auto store = SingleShard(8);
  const Limit short_lived = MakeLimit(5, 1);
  const Limit long_lived = MakeLimit(5, 1, Granularity::kHour);
  // Long-lived keys first: they are the least recently used.
  for (int i = 0; i < 4; ++i) {
    Hit(*store, Strategy::kFixedWindow, long_lived, "live" + std::to_string(i),
        clock.NowNanos());
    clock.Advance(20 * kMs);
  }
  for (int i = 0; i < 4; ++i) {
    Hit(*store, Strategy::kMovingWindow, short_lived,
        "short" + std::to_string(i), clock.NowNanos());
    clock.Advance(20 * kMs);
  }
  ASSERT_EQ(store->Size(), 8u);
  // The short ones have expired, and their 1 s grace has passed.
  clock.Advance(3 * kSec);
  for (int i = 0; i < 4; ++i) {
    Hit(*store, Strategy::kSlidingWindowCounter, long_lived,
        "new" + std::to_string(i), clock.NowNanos());
    EXPECT_LE(store->Size(), 8u);
  }
  EXPECT_EQ(store->Size(), 8u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(Count(*store, Strategy::kFixedWindow, long_lived,
                    "live" + std::to_string(i), clock.NowNanos()),
              1)
        << i;
    EXPECT_EQ(Count(*store, Strategy::kSlidingWindowCounter, long_lived,
                    "new" + std::to_string(i), clock.NowNanos()),
              1)
        << i;
  }
}

TEST(MemoryStoreEvictionTest, LiveKeysGoLeastRecentlyUsedFirst) {
  ManualClock clock(kT0);
  auto store = SingleShard(8);
  const Limit l = MakeLimit(100, 1, Granularity::kHour);
  auto key = [](int i) { return "k" + std::to_string(i); };
  auto hit = [&](Strategy s, int i) {
    const bool ok = Hit(*store, s, l, key(i), clock.NowNanos()).allowed;
    clock.Advance(20 * kMs);
    return ok;
  };
  auto alive = [&](Strategy s, int i) {
    return Count(*store, s, l, key(i), clock.NowNanos()) > 0;
  };
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(hit(Strategy::kFixedWindow, i));
  ASSERT_TRUE(hit(Strategy::kFixedWindow, 0));  // k0 is now the newest
  ASSERT_TRUE(hit(Strategy::kFixedWindow, 8));  // evicts k1
  EXPECT_TRUE(alive(Strategy::kFixedWindow, 0));
  EXPECT_FALSE(alive(Strategy::kFixedWindow, 1));
  EXPECT_EQ(store->Size(), 8u);
  // Neither test-mode decisions nor Inspect refresh a key.
  Peek(*store, Strategy::kFixedWindow, l, key(2), clock.NowNanos());
  EXPECT_TRUE(alive(Strategy::kFixedWindow, 2));
  clock.Advance(20 * kMs);
  ASSERT_TRUE(hit(Strategy::kFixedWindow, 9));  // evicts k2
  EXPECT_FALSE(alive(Strategy::kFixedWindow, 2));
  // Incr refreshes like a hit.
  store->Incr(key(3), l.PeriodNanos(), 1, clock.NowNanos(), nullptr);
  clock.Advance(20 * kMs);
  ASSERT_TRUE(hit(Strategy::kFixedWindow, 10));  // evicts k4, not k3
  EXPECT_TRUE(alive(Strategy::kFixedWindow, 3));
  EXPECT_FALSE(alive(Strategy::kFixedWindow, 4));
  // The cap and the order span all strategies.
  ASSERT_TRUE(hit(Strategy::kMovingWindow, 11));  // evicts k5
  ASSERT_TRUE(hit(Strategy::kTokenBucket, 12));   // evicts k6
  EXPECT_FALSE(alive(Strategy::kFixedWindow, 5));
  EXPECT_FALSE(alive(Strategy::kFixedWindow, 6));
  EXPECT_TRUE(alive(Strategy::kFixedWindow, 7));
  EXPECT_TRUE(alive(Strategy::kMovingWindow, 11));
  EXPECT_TRUE(alive(Strategy::kTokenBucket, 12));
  EXPECT_EQ(store->Size(), 8u);
  // An evicted key starts over.
  EXPECT_EQ(Hit(*store, Strategy::kFixedWindow, l, key(1), clock.NowNanos())
                .remaining,
            99);
}

// Recency is the order of charges, not of time: keys charged at the same
// instant (a flood arrives faster than any clock tick) still leave oldest
// first, so a flood of new keys cannot evict a key hit between them.
TEST(MemoryStoreEvictionTest, AHotKeySurvivesAFloodAtOneInstant) {
  auto store = SingleShard(16);
  const Limit l = MakeLimit(10, 1, Granularity::kMinute);
  int admitted = 0;
  for (int i = 0; i < 2000; ++i) {
    admitted += Hit(*store, Strategy::kFixedWindow, l, "victim", kT0).allowed;
    Hit(*store, Strategy::kFixedWindow, l, "flood" + std::to_string(i), kT0);
  }
  EXPECT_EQ(admitted, 10);
  // The flood's keys themselves go oldest first.
  EXPECT_EQ(Count(*store, Strategy::kFixedWindow, l, "flood1999", kT0), 1);
  EXPECT_EQ(Count(*store, Strategy::kFixedWindow, l, "flood1000", kT0), 0);
}

// Larger shards evict a batch (a sixteenth of the cap) at once, still the
// oldest ones.
TEST(MemoryStoreEvictionTest, BatchEvictionTakesTheOldest) {
  ManualClock clock(kT0);
  auto store = SingleShard(64);
  const Limit l = MakeLimit(1, 1, Granularity::kHour);
  for (int i = 0; i < 64; ++i) {
    Hit(*store, Strategy::kMovingWindow, l, "k" + std::to_string(i),
        clock.NowNanos());
    clock.Advance(20 * kMs);
  }
  ASSERT_EQ(store->Size(), 64u);
  Hit(*store, Strategy::kMovingWindow, l, "new", clock.NowNanos());
  EXPECT_EQ(store->Size(), 61u);
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(Count(*store, Strategy::kMovingWindow, l, "k" + std::to_string(i),
                    clock.NowNanos()),
              i < 4 ? 0 : 1)
        << i;
  }
}

void ExpectFloodStaysUnderCap(size_t max_keys, size_t shards, int keys) {
  MemoryStoreOptions o;
  o.max_keys = max_keys;
  o.shards = shards;
  auto store = NewMemoryStore(o);
  const Limit l = MakeLimit(10, 1, Granularity::kDay);
  std::mt19937_64 rng(max_keys * 31 + shards);
  size_t peak = 0;
  int64_t now = kT0;
  for (int i = 0; i < keys; ++i) {
    const Strategy s = kAllStrategies[rng() % 4];
    const std::string key = std::to_string(rng());
    ASSERT_TRUE(Hit(*store, s, l, key, now).allowed);
    now += 1000;
    if (i % 16 == 0 || i + 1 == keys) {
      peak = std::max(peak, store->Size());
      ASSERT_LE(store->Size(), max_keys)
          << "after " << i + 1 << " keys, shards " << shards;
    }
  }
  EXPECT_GE(peak, max_keys / 2) << "the cap should be usable";
}

TEST(MemoryStoreEvictionTest, FloodOfRandomKeysNeverExceedsTheCap) {
  ExpectFloodStaysUnderCap(1000, 64, 100'000);
}

TEST(MemoryStoreEvictionTest, CapIsHardForAnyShardCount) {
  ExpectFloodStaysUnderCap(100, 64, 5'000);  // not a multiple of the shards
  ExpectFloodStaysUnderCap(10, 64, 2'000);   // fewer keys than shards
  ExpectFloodStaysUnderCap(1, 16, 500);
  ExpectFloodStaysUnderCap(77, 3, 5'000);  // rounded up to 4 shards
  ExpectFloodStaysUnderCap(4096, 64, 20'000);
}

TEST(MemoryStoreEvictionTest, ConcurrentFloodNeverExceedsTheCap) {
  MemoryStoreOptions o;
  o.max_keys = 2000;
  o.shards = 16;
  auto store = NewMemoryStore(o);
  const Limit l = MakeLimit(3, 1, Granularity::kHour);
  std::atomic<bool> done{false};
  std::atomic<size_t> worst{0};
  std::thread watcher([&] {
    while (!done.load()) {
      const size_t n = store->Size();
      size_t w = worst.load();
      while (n > w && !worst.compare_exchange_weak(w, n)) {
      }
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(t) + 7);
      for (int i = 0; i < 25'000; ++i) {
        Hit(*store, kAllStrategies[i % 4], l, std::to_string(rng()),
            kT0 + i * 1000);
      }
    });
  }
  for (auto& th : threads) th.join();
  done = true;
  watcher.join();
  EXPECT_LE(worst.load(), 2000u);
  EXPECT_LE(store->Size(), 2000u);
}

// Lazy expiry plus incremental sweeping: expired keys do not pile up even
// without the cap being reached.
TEST(MemoryStoreEvictionTest, ExpiredKeysAreSweptIncrementally) {
  auto store = SingleShard(1'000'000);
  const Limit short_lived = MakeLimit(5, 1);
  for (int i = 0; i < 2000; ++i) {
    Hit(*store, Strategy::kFixedWindow, short_lived, "old" + std::to_string(i),
        kT0);
  }
  ASSERT_EQ(store->Size(), 2000u);
  const int64_t later = kT0 + 10 * kSec;
  for (int i = 0; i < 2000; ++i) {
    Hit(*store, Strategy::kFixedWindow, short_lived, "new" + std::to_string(i),
        later);
  }
  EXPECT_EQ(store->Size(), 2000u) << "every expired key was swept";
}

// A clock up to the 1 s grace behind another still reads what that one
// wrote, whether or not new keys have swept or rebuilt the table since:
// the answer must not depend on where the per-process hash key placed the
// entry relative to the sweep cursor (Redis keeps its keys as long).
TEST_P(PerStrategy, SweepingNeverChangesAnAnswerWithinTheGrace) {
  const Limit l = MakeLimit(5, 1);
  const int64_t hits[] = {kT0, kT0 + 100 * kMs, kT0 + 300 * kMs};
  for (int64_t swept_at = kT0 + 400 * kMs; swept_at <= kT0 + 3 * kSec;
       swept_at += 100 * kMs) {
    const int64_t behind = swept_at - 900 * kMs;
    auto swept = SingleShard(1'000'000);
    auto untouched = SingleShard(1'000'000);
    for (int64_t t : hits) {
      Hit(*swept, GetParam(), l, "k", t);
      Hit(*untouched, GetParam(), l, "k", t);
    }
    // Enough new keys to rebuild the table several times.
    for (int i = 0; i < 2000; ++i) {
      Hit(*swept, GetParam(), l, "new" + std::to_string(i), swept_at);
    }
    const Decision a = Peek(*swept, GetParam(), l, "k", behind);
    const Decision b = Peek(*untouched, GetParam(), l, "k", behind);
    const std::string at = std::to_string((swept_at - kT0) / kMs) + " ms";
    EXPECT_EQ(a.allowed, b.allowed) << at;
    EXPECT_EQ(a.remaining, b.remaining) << at;
    EXPECT_EQ(a.reset_nanos, b.reset_nanos) << at;
    EXPECT_EQ(a.retry_after_nanos, b.retry_after_nanos) << at;
    const WindowState x = swept->Inspect(Req(GetParam(), l, "k"), behind);
    const WindowState y = untouched->Inspect(Req(GetParam(), l, "k"), behind);
    EXPECT_EQ(x.count, y.count) << at;
    EXPECT_EQ(x.time_nanos, y.time_nanos) << at;
    EXPECT_EQ(x.previous_count, y.previous_count) << at;
  }
}

// Moving-window logs of evicted, expired, swept and cleared keys are freed;
// LeakSanitizer reports any that are not.
TEST(MemoryStoreEvictionTest, MovingWindowLogsAreFreedEverywhere) {
  MemoryStoreOptions o;
  o.max_keys = 256;
  o.shards = 4;
  auto store = NewMemoryStore(o);
  const Limit l = MakeLimit(64, 1);
  int64_t now = kT0;
  for (int i = 0; i < 20'000; ++i) {
    const std::string key = "m" + std::to_string(i % 3000);
    Hit(*store, Strategy::kMovingWindow, l, key, now, 1 + i % 64);
    if (i % 7 == 0) store->Clear(Strategy::kMovingWindow, key);
    now += 300 * kMs / 1000;  // keys expire and are swept as time passes
  }
  EXPECT_LE(store->Size(), 256u);
  EXPECT_LE(MemoryStoreBytes(*store), 256u * (64 * 8 + 64) + 64 * 1024);
}

}  // namespace
}  // namespace rapidlimit
