// Google Benchmark of the core decisions on the memory store, without
// Python: the floor under every figure measured from Python.
#include <benchmark/benchmark.h>

#include <memory>
#include <string>
#include <vector>

#include "rapidlimit/clock.h"
#include "rapidlimit/limit.h"
#include "rapidlimit/memory_store.h"
#include "rapidlimit/store.h"

namespace rapidlimit {
namespace {

constexpr int kKeys = 1000;

std::vector<std::string> Keys(int n, const Limit& limit) {
  std::vector<std::string> keys;
  keys.reserve(n);
  for (int i = 0; i < n; ++i) {
    keys.push_back(limit.KeyFor({"client-" + std::to_string(i)}));
  }
  return keys;
}

// One store shared by every thread of a run, as in a server.
Store* SharedStore() {
  static Store* store = NewMemoryStore().release();
  return store;
}

void BM_Decide(benchmark::State& state, Strategy strategy) {
  Limit limit = ParseOne("1000000/minute").limits.front();
  const std::vector<std::string> keys = Keys(kKeys, limit);
  Store* store = SharedStore();
  const Clock* clock = SystemClock();
  size_t i = static_cast<size_t>(state.thread_index()) * 7;
  Request r;
  r.strategy = strategy;
  r.limit = &limit;
  Decision d;
  for (auto _ : state) {
    r.key = keys[i++ % kKeys];
    store->Decide(&r, 1, clock->NowNanos(), Mode::kHit, &d);
    benchmark::DoNotOptimize(d);
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_FixedWindow(benchmark::State& s) {
  BM_Decide(s, Strategy::kFixedWindow);
}
void BM_MovingWindow(benchmark::State& s) {
  BM_Decide(s, Strategy::kMovingWindow);
}
void BM_SlidingWindow(benchmark::State& s) {
  BM_Decide(s, Strategy::kSlidingWindowCounter);
}
void BM_TokenBucket(benchmark::State& s) {
  BM_Decide(s, Strategy::kTokenBucket);
}

BENCHMARK(BM_FixedWindow)->Threads(1)->Threads(2);
BENCHMARK(BM_MovingWindow)->Threads(1)->Threads(2);
BENCHMARK(BM_SlidingWindow)->Threads(1)->Threads(2);
BENCHMARK(BM_TokenBucket)->Threads(1)->Threads(2);

// A request with three limits (per second, minute, hour), decided at once.
void BM_ThreeLimitRequest(benchmark::State& state) {
  const std::vector<Limit> limits =
      ParseMany("1000000/second;1000000/minute;1000000/hour").limits;
  std::vector<std::vector<std::string>> keys;
  for (const Limit& l : limits) keys.push_back(Keys(kKeys, l));
  Store* store = SharedStore();
  Request r[3];
  Decision d[3];
  size_t i = 0;
  for (auto _ : state) {
    for (int j = 0; j < 3; ++j) {
      r[j].limit = &limits[j];
      r[j].key = keys[j][i % kKeys];
    }
    ++i;
    store->Decide(r, 3, SystemClock()->NowNanos(), Mode::kHit, d);
    benchmark::DoNotOptimize(d);
  }
}
BENCHMARK(BM_ThreeLimitRequest);

// The reject path: every key is over its 1/minute limit (fixed window
// counts rejected hits too, so the state stays over the limit).
void BM_FixedWindowRejected(benchmark::State& state) {
  Limit limit = ParseOne("1/minute").limits.front();
  const std::vector<std::string> keys = Keys(kKeys, limit);
  std::unique_ptr<Store> store = NewMemoryStore();
  const Clock* clock = SystemClock();
  Request r;
  r.strategy = Strategy::kFixedWindow;
  r.limit = &limit;
  Decision d;
  for (const std::string& k : keys) {
    r.key = k;
    store->Decide(&r, 1, clock->NowNanos(), Mode::kHit, &d);
  }
  size_t i = 0;
  for (auto _ : state) {
    r.key = keys[i++ % kKeys];
    store->Decide(&r, 1, clock->NowNanos(), Mode::kHit, &d);
    benchmark::DoNotOptimize(d);
  }
  if (d.allowed) state.SkipWithError("the reject path allowed a hit");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_FixedWindowRejected);

// Many keys: the table no longer fits in the caches (1,000,000 keys of a
// store with room for 2,000,000, visited in a scattered order).
void BM_FixedWindowManyKeys(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  Limit limit = ParseOne("1000000/minute").limits.front();
  const std::vector<std::string> keys = Keys(n, limit);
  MemoryStoreOptions options;
  options.max_keys = 2 * static_cast<size_t>(n);  // no eviction
  std::unique_ptr<Store> store = NewMemoryStore(options);
  const Clock* clock = SystemClock();
  Request r;
  r.strategy = Strategy::kFixedWindow;
  r.limit = &limit;
  Decision d;
  for (const std::string& k : keys) {
    r.key = k;
    store->Decide(&r, 1, clock->NowNanos(), Mode::kHit, &d);
  }
  // A stride coprime with n walks every key in a cache-unfriendly order.
  const size_t stride = 7919;
  size_t i = 0;
  for (auto _ : state) {
    r.key = keys[i % static_cast<size_t>(n)];
    i += stride;
    store->Decide(&r, 1, clock->NowNanos(), Mode::kHit, &d);
    benchmark::DoNotOptimize(d);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_FixedWindowManyKeys)->Arg(1'000'000);

}  // namespace
}  // namespace rapidlimit

BENCHMARK_MAIN();
