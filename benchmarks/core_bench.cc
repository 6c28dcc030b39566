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

}  // namespace
}  // namespace rapidlimit

BENCHMARK_MAIN();
