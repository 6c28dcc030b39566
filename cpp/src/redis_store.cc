// The Redis store.
//
// Threads. Each connection (a "lane"; one by default) belongs to one I/O
// thread. Callers turn a batch of limits into one EVALSHA command and
// either queue it for the I/O thread, which writes everything queued
// since its last write in one send() and reads the replies in one go
// (batching comes from concurrency alone: nothing waits for a batch to
// fill), or, when a synchronous caller finds the connection idle, do that
// one round trip themselves, which spares two thread hand-offs on the
// sequential path. Asynchronous callers only ever queue. No thread is
// ever created per request.
//
// Time. The script runs at the caller's `now`, like every Store: the
// memory store and the Redis store then give the same answers to the same
// calls (frozen test clocks included), a fallback to memory continues
// seamlessly, and the blocked-key cache can compare its deadlines with
// the caller's clock. The price is that app instances' clocks must agree
// (NTP); Redis TIME would protect against skew but makes decisions depend
// on when Redis runs them. Key TTLs, which only collect garbage, carry a
// slack (1 s) so that skew never drops live state.
//
// Faults. A command not answered within the timeout, or any socket error,
// closes the connection: everything in flight gets the failure policy,
// and so does everything submitted until the I/O thread has reconnected
// (first at once, then with doubling backoff). Nothing waits for a
// connection that is down: with several, requests go to those that are
// up. When Redis closes an idle connection (its `timeout` setting, CLIENT
// KILL), the I/O thread reconnects at once and requests queue for the new
// connection meanwhile, each until its own deadline; only a failed
// reconnect is an outage. A request whose key Redis refuses (a value of
// another type, such as a list an application pushed under the name) gets
// the policy alone: the script writes nothing for it and decides the other
// requests sharing its call (see decide.lua).
//
// Fork. A child process must not share the parent's connection or use
// its threads (which do not exist in the child). pthread_atfork bumps a
// generation counter; the first call in the child sees it, abandons the
// parent's engine (closing only its file descriptors) and builds a new
// one with its own connection. A store's own lock, which Close and that
// rebuild hold while they wait, starts free in the child, and so does the
// table of name lookups in flight (redis_socket.cc), emptied: the child
// has none of their threads.
#include "rapidlimit/redis_store.h"

#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "hiredis_include.h"
#include "rapidlimit/algorithms.h"
#include "rapidlimit/memory_store.h"
#include "redis_internal.h"

namespace rapidlimit {
namespace redis {
namespace {

// ------------------------------------------------------------------ fork

std::atomic<uint64_t> g_fork_generation{0};

void ForkPrepare();
void ForkParent();
void ForkChild();

void RegisterAtFork() {
  static std::once_flag once;
  std::call_once(once,
                 [] { pthread_atfork(&ForkPrepare, &ForkParent, &ForkChild); });
}

thread_local DecisionSource tl_last_source = DecisionSource::kStore;
// The Redis error behind the calling thread's last policy answer (empty
// when the policy answered for want of a reply).
thread_local std::string tl_last_error;
// Whether that answer came for want of a reply within the timeout.
thread_local bool tl_last_timed_out = false;

// ----------------------------------------------------------------- stats

struct Counters {
  std::atomic<uint64_t> decisions{0}, calls{0}, writes{0}, inline_calls{0},
      cache_hits{0}, fail_open{0}, fail_closed{0}, fallback{0}, timeouts{0},
      errors{0}, disconnects{0}, reconnects{0}, script_reloads{0},
      mismatches{0}, scripts{0}, loop_writes{0};
};

inline void Add(std::atomic<uint64_t>& c, uint64_t v = 1) {
  c.fetch_add(v, std::memory_order_relaxed);
}

// -------------------------------------------------------------------- op

// A plain copy of a reply, for the rare non-script commands.
struct RawReply {
  int type = 0;
  int64_t integer = 0;
  std::string str;
  std::vector<RawReply> elements;
};

// The part of a Redis key that names its strategy, after the prefix.
std::string_view StrategyCode(Strategy s) {
  switch (s) {
    case Strategy::kFixedWindow:
      return "fw:";
    case Strategy::kMovingWindow:
      return "mw:";
    case Strategy::kSlidingWindowCounter:
      return "sw:";
    case Strategy::kTokenBucket:
      return "tb:";
  }
  return "xx:";
}

// A glob matching every StrategyCode: the first letters of the codes, then
// their second letters, then ':'. It also matches pairs no strategy has
// ("tw:"), which ParseScan leaves out.
std::string CodePattern() {
  std::string first, second;
  for (Strategy s : kStrategies) {
    const std::string_view code = StrategyCode(s);
    if (first.find(code[0]) == std::string::npos) first.push_back(code[0]);
    if (second.find(code[1]) == std::string::npos) second.push_back(code[1]);
  }
  return "[" + first + "][" + second + "]:";
}

// A SCAN reply's next cursor and page of keys (false for another reply):
// the keys MATCH `<prefix>` CodePattern() `{*` listed, kept only where they
// name a strategy's code. The one pattern lets a reset or a size visit the
// keyspace once for every strategy.
bool ParseScan(const RawReply& reply, size_t prefix_size, std::string* cursor,
               std::vector<std::string>* keys) {
  if (reply.type != REDIS_REPLY_ARRAY || reply.elements.size() != 2) {
    return false;
  }
  *cursor = reply.elements[0].str;
  keys->clear();
  keys->reserve(reply.elements[1].elements.size());
  for (const RawReply& k : reply.elements[1].elements) {
    if (k.str.size() < prefix_size + 3) continue;
    const std::string_view code(k.str.data() + prefix_size, 3);
    for (Strategy s : kStrategies) {
      if (code == StrategyCode(s)) {
        keys->push_back(k.str);
        break;
      }
    }
  }
  return true;
}

RawReply CopyReply(const redisReply* r) {
  RawReply out;
  out.type = r->type;
  out.integer = r->integer;
  if (r->str != nullptr) out.str.assign(r->str, r->len);
  if (r->type == REDIS_REPLY_ARRAY) {
    out.elements.reserve(r->elements);
    for (size_t i = 0; i < r->elements; ++i) {
      out.elements.push_back(CopyReply(r->element[i]));
    }
  }
  return out;
}

class Engine;

// One command on its way to Redis and back. Reference counted: the
// submitter holds one reference, the lane that completes it another.
struct Op {
  enum class Kind : uint8_t { kScript, kRaw };
  enum class Result : uint8_t { kPending, kOk, kUnavailable, kError };

  Op(Engine* e, Kind k) : engine(e), kind(k) {}

  Engine* engine;
  Kind kind;
  std::atomic<int> refs{1};

  // Raw commands: the whole frame. Scripts: the request's keys (one per
  // item) as RESP bulk strings and its block of the script's argument, so
  // that several requests can share one script command.
  std::string args;
  std::string keys;
  std::string block;
  bool as_eval = false;  // send the body (after NOSCRIPT)
  bool sent = false;     // counted in the stats
  int64_t deadline = 0;  // MonoNanos
  // In flight: the ops answered by one reply are consecutive in the lane's
  // queue; the first holds their number, the others 0.
  uint32_t group = 1;

  // The batch (scripts).
  std::vector<Item> items;
  int64_t now = 0;
  Mode mode = Mode::kHit;
  bool has_cached_tail = false;  // a cached rejection follows the items
  Decision cached_tail;

  // Filled by the lane.
  Result result = Result::kPending;
  std::string error;
  bool refused = false;  // the error is Redis refusing one of its keys
  // Unavailable because no reply came by the deadline (a lane's timeout,
  // not a refused connection): limits' clients raise TimeoutError then.
  bool timed_out = false;
  std::vector<int64_t> values;
  RawReply raw;

  // Filled by FinishScript.
  std::vector<Decision> decisions;
  // A single sliding-window decision's state after it (SingleAnswer).
  WindowState window;
  bool has_window = false;
  size_t written = 0;
  size_t first_reject = 0;

  // Completion.
  bool async = false;
  DecideCallback callback = nullptr;
  // A single call (RedisStore::DecideOneDeferred, InspectDeferred,
  // IncrDeferred; the synchronous Inspect and Incr too): answered by
  // FinishSingle, asynchronously through `single_callback`.
  enum class Single : uint8_t { kNone, kDecide, kInspect, kIncr, kRaw };
  Single single = Single::kNone;
  RedisStore::SingleCallback single_callback = nullptr;
  void* context = nullptr;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
};

void Release(Op* op) {
  if (op->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete op;
}

// --------------------------------------------------------- blocked cache

// Keys known to be over their limit until some time T, with the state the
// script left them in: until T, a request for such a key is decided here
// by the memory store's code, without Redis. A request the cached state
// would admit (a smaller cost, a clock moved back) is a miss.
class BlockedCache {
 public:
  BlockedCache(bool enabled, size_t max_keys)
      : enabled_(enabled),
        per_shard_(std::max<size_t>(1, max_keys / kShards)) {}

  bool enabled() const { return enabled_; }

  bool Lookup(const Request& r, int64_t now, Decision* out) {
    return WithLiveEntry(r.strategy, r.key, now, [&](const Entry& e) {
      return Decide(r, now, e, out);
    });
  }

  // The state of a key cached as blocked at `now`, as Inspect reads it:
  // the state this key's cached refusals are decided from, for a read
  // while Redis cannot answer (the headers of such a refusal must not
  // meet the failure policy, a 503 or an exception, instead).
  bool Peek(Strategy s, std::string_view key, int64_t now, WindowState* out) {
    return WithLiveEntry(s, key, now, [&](const Entry& e) {
      StateOf(s, e, now, out);
      return true;
    });
  }

  // Inspect's answer for a moving or sliding window cached as blocked, so
  // that slowapi's read of a refusal's window for its headers needs no
  // Redis command: neither strategy writes for a refusal, so the cached
  // state is Redis's, but for what other processes wrote meanwhile (as for
  // Lookup). A read of another limit (amount, where the read names one, or
  // period) misses.
  bool Read(const Request& r, int64_t now, WindowState* out) {
    if (r.strategy != Strategy::kMovingWindow &&
        r.strategy != Strategy::kSlidingWindowCounter) {
      return false;
    }
    const Limit& l = *r.limit;
    return WithLiveEntry(r.strategy, r.key, now, [&](const Entry& e) {
      if (l.PeriodNanos() != e.limit.PeriodNanos() ||
          (l.amount > 0 && l.amount != e.limit.amount)) {
        return false;
      }
      StateOf(r.strategy, e, now, out);
      return true;
    });
  }

  // Remembers a rejection the script charged at `now`.
  void Insert(const Item& item, int64_t now, const Decision& d,
              const PostState& post) {
    if (!enabled_ || d.allowed || item.incr) return;
    int64_t until = now + d.retry_after_nanos;
    if (item.strategy == Strategy::kMovingWindow) {
      // Exact only when the blocker is the oldest entry: cost 1. The stats
      // change the moment the blocker leaves the window (blocker + P).
      if (item.cost != 1) return;
      until = post.moving_blocker + item.limit.PeriodNanos();
    }
    if (until <= now) return;
    thread_local std::string k;
    MakeKey(item.strategy, item.key, &k);
    Shard& shard = ShardFor(k);
    std::lock_guard<std::mutex> lock(shard.mu);
    if (shard.map.size() >= per_shard_ &&
        shard.map.find(k) == shard.map.end()) {
      MakeRoomLocked(&shard, now);
    }
    Entry e;
    e.since = now;
    e.until = until;
    e.cost = item.cost;
    e.limit = item.limit;
    e.post = post;
    const bool fresh = shard.map.insert_or_assign(k, std::move(e)).second;
    if (fresh) count_.fetch_add(1, std::memory_order_relaxed);
  }

  void Erase(Strategy s, std::string_view key) {
    if (!enabled_ || count_.load(std::memory_order_relaxed) == 0) return;
    thread_local std::string k;
    MakeKey(s, key, &k);
    Shard& shard = ShardFor(k);
    std::lock_guard<std::mutex> lock(shard.mu);
    if (shard.map.erase(k) > 0) count_.fetch_sub(1, std::memory_order_relaxed);
  }

  void Clear() {
    for (Shard& shard : shards_) {
      std::lock_guard<std::mutex> lock(shard.mu);
      count_.fetch_sub(shard.map.size(), std::memory_order_relaxed);
      shard.map.clear();
    }
  }

 private:
  static constexpr size_t kShards = 16;
  struct Entry {
    int64_t since = 0;
    int64_t until = 0;
    int64_t cost = 0;
    Limit limit;
    PostState post;
  };
  struct Shard {
    std::mutex mu;
    std::unordered_map<std::string, Entry> map;
  };

  // Calls `fn(entry)` under its shard's lock when `key` holds a live entry
  // at `now` (a stale one is dropped); false when there is none.
  template <class Fn>
  bool WithLiveEntry(Strategy s, std::string_view key, int64_t now, Fn fn) {
    if (!enabled_ || count_.load(std::memory_order_relaxed) == 0) return false;
    thread_local std::string k;
    MakeKey(s, key, &k);
    Shard& shard = ShardFor(k);
    std::lock_guard<std::mutex> lock(shard.mu);
    auto it = shard.map.find(k);
    if (it == shard.map.end()) return false;
    if (now >= it->second.until || now < it->second.since) {
      shard.map.erase(it);
      count_.fetch_sub(1, std::memory_order_relaxed);
      return false;
    }
    return fn(it->second);
  }

  // The state a live entry's refusals are decided from, at `now`.
  static void StateOf(Strategy s, const Entry& e, int64_t now,
                      WindowState* out) {
    switch (s) {
      case Strategy::kFixedWindow:
        *out = InspectFixedWindow(e.limit, now, false, e.post.counter);
        break;
      case Strategy::kTokenBucket:
        *out = InspectTokenBucket(e.limit, now, false, e.post.counter);
        break;
      case Strategy::kSlidingWindowCounter:
        *out = InspectSlidingWindow(e.limit, now, false, e.post.sliding);
        break;
      case Strategy::kMovingWindow:
        // Cached only for cost 1, when the blocker is the oldest of a full
        // log: until it leaves, the window holds `amount` hits.
        *out = WindowState{};
        out->count = e.limit.amount;
        out->time_nanos = e.post.moving_blocker;
        break;
    }
  }

  // Lookup's decision from a live entry.
  static bool Decide(const Request& r, int64_t now, const Entry& e,
                     Decision* out) {
    const Limit& l = *r.limit;
    if (r.cost < e.cost || l.amount != e.limit.amount ||
        l.PeriodNanos() != e.limit.PeriodNanos() ||
        l.EffectiveBurst() != e.limit.EffectiveBurst()) {
      return false;
    }
    Decision d;
    switch (r.strategy) {
      case Strategy::kFixedWindow: {
        CounterState st = e.post.counter;
        d = ApplyFixedWindow(l, r.cost, now, false, false, &st);
        break;
      }
      case Strategy::kTokenBucket: {
        CounterState st = e.post.counter;
        d = ApplyTokenBucket(l, r.cost, now, false, false, &st);
        break;
      }
      case Strategy::kSlidingWindowCounter: {
        SlidingState st = e.post.sliding;
        d = ApplySlidingWindow(l, r.cost, now, false, false, &st);
        break;
      }
      case Strategy::kMovingWindow: {
        if (r.cost != 1) return false;
        const int64_t period = l.PeriodNanos();
        d.limit = l.amount;
        d.remaining = 0;
        d.reset_nanos = e.post.moving_blocker + period;
        d.retry_after_nanos = e.post.moving_blocker + period + 1 - now;
        break;
      }
    }
    if (d.allowed) return false;
    d.source = DecisionSource::kCache;
    *out = d;
    return true;
  }

  // A full shard drops its expired entries and, when that frees less than
  // an eighth of it, the live ones that expire first (their next request
  // asks Redis again), so that a pass over the shard comes once per
  // per_shard_ / 8 inserts at most. A pass per insert that found nothing
  // expired cost 0.8 ms of the I/O thread per rejection at the default
  // size once 100,000 distinct clients were blocked: rejections fell from
  // 30,000 to 700 a second, and queued commands timed out (fail-closed
  // 503s for every client).
  void MakeRoomLocked(Shard* shard, int64_t now) {
    const size_t keep = per_shard_ - std::max<size_t>(1, per_shard_ / 8);
    size_t dropped = 0;
    for (auto it = shard->map.begin(); it != shard->map.end();) {
      if (it->second.until <= now) {
        it = shard->map.erase(it);
        ++dropped;
      } else {
        ++it;
      }
    }
    if (shard->map.size() > keep) {
      std::vector<int64_t> untils;
      untils.reserve(shard->map.size());
      for (const auto& entry : shard->map) untils.push_back(entry.second.until);
      const size_t excess = shard->map.size() - keep;
      std::nth_element(untils.begin(), untils.begin() + (excess - 1),
                       untils.end());
      const int64_t cutoff = untils[excess - 1];
      for (auto it = shard->map.begin();
           it != shard->map.end() && shard->map.size() > keep;) {
        if (it->second.until <= cutoff) {
          it = shard->map.erase(it);
          ++dropped;
        } else {
          ++it;
        }
      }
    }
    count_.fetch_sub(dropped, std::memory_order_relaxed);
  }

  static void MakeKey(Strategy s, std::string_view key, std::string* out) {
    out->clear();
    out->push_back(static_cast<char>('0' + static_cast<int>(s)));
    out->append(key);
  }
  Shard& ShardFor(const std::string& k) {
    return shards_[std::hash<std::string>()(k) % kShards];
  }

  const bool enabled_;
  const size_t per_shard_;
  std::atomic<size_t> count_{0};
  Shard shards_[kShards];
};

// ------------------------------------------------------------------ lane

// One connection and its I/O thread.
class Lane {
 public:
  enum State : int { kDown, kUp, kClosed };

  Lane(Engine* engine, size_t index);
  ~Lane();
  Lane(const Lane&) = delete;
  Lane& operator=(const Lane&) = delete;

  // Connects (giving up at `deadline`, MonoNanos) and starts the thread.
  void Start(int64_t deadline);
  void Stop();
  void AbandonAfterFork();
  bool Up() const { return state_.load(std::memory_order_acquire) == kUp; }

  // Queues `op` for the I/O thread (taking a reference for it), waking it
  // unless `defer` (then Flush wakes it). False when the lane is not
  // accepting: the caller applies the failure policy.
  bool Submit(Op* op, bool defer = false);
  void Flush();
  // Runs `op` on the calling thread when the connection is idle. True if
  // the op is complete.
  bool TryInline(Op* op);
  // See RedisStore::LoopFlush, LoopRead and LoopWatch.
  RedisStore::LoopResult LoopSend(RedisStore::LoopConnection* connection);
  bool LoopRead(uint64_t generation);
  int64_t LoopWatch(uint64_t generation);

 private:
  void Run();
  // By `deadline`, or the connect timeout from now when 0, attending to
  // `hook` (if non-null) while it waits; false at once, with no backoff
  // or report, when the hook cancels the wait.
  bool Connect(int64_t deadline = 0, WaitHook* hook = nullptr);
  bool Handshake(int fd, redisReader* reader, int64_t deadline, WaitHook* hook,
                 std::string* error);
  void AppendLocked(Op* op) { AppendGroupLocked(&op, 1); }
  // Sends ops[0..k) as one command: a raw op alone, script ops as one
  // script call.
  void AppendGroupLocked(Op* const* ops, size_t k);
  // Appends the queued `batch` (emptied) as script groups, failing into
  // `failed` the ops whose deadline `now` has passed; an asynchronous
  // op queued on this connection gets its timeout from `now`.
  void AppendBatchLocked(std::vector<Op*>* batch, int64_t now,
                         std::vector<Op*>* failed);
  // Up, with no command in flight and none being sent (conn_mu_ held): a
  // caller may then exchange on the connection from its own thread.
  bool IdleLocked() const;
  // Ends an exchange a caller made holding `conn` (conn_mu_): stops
  // accepting if the connection broke, releases `conn`, wakes the I/O
  // thread if `wake`, then finishes the ops.
  void EndExchange(std::unique_lock<std::mutex>* conn, bool wake,
                   std::vector<Op*>* completed, std::vector<Op*>* failed);
  bool FlushLocked(std::vector<Op*>* failed);
  bool ReadLocked(std::vector<Op*>* completed, std::vector<Op*>* failed);
  // What the lane does with ops[0..k) once HandleReply has read their
  // reply.
  enum class Next { kDone, kResend, kBreak };
  // Stores `r` in ops[0..k). kResend: send them again (as EVAL); kBreak:
  // the server is no longer one to decide on (`*reason`): the ops get the
  // failure policy and the connection is replaced.
  Next HandleReply(Op* const* ops, size_t k, const redisReply* r,
                   std::string* reason);
  // Closes the socket and drops its reader and unsent output.
  void CloseLocked();
  void BreakLocked(const std::string& why, std::vector<Op*>* failed);
  // BreakLocked for the command in flight that missed its deadline: it
  // and the ones behind it fail as timed out.
  void TimeOutLocked(std::vector<Op*>* failed);
  // After Redis hung up on the idle connection `fd` (its `timeout`
  // setting, CLIENT KILL, a restart): reconnects at once, keeping the
  // queue, so that the next request does not find the connection dead.
  void ReconnectIdle(int fd, std::vector<Op*>* failed);
  // The wait hook of that reconnect: completes the queued requests whose
  // deadline has passed; returns the earliest deadline of those left.
  int64_t ExpireQueued();
  void StopAccepting(std::vector<Op*>* failed);
  void Wake();
  // Reads the wake-up's count (I/O thread only).
  void DrainWake();
  void Finish(std::vector<Op*>* completed, std::vector<Op*>* failed);

  Engine* const engine_;
  const size_t index_;
  // The I/O thread's wake-up; closed by Stop once the thread is joined (a
  // closed store kept it, one file per storage an application left behind
  // in FastAPI's caches). wake_mu_ keeps Stop from closing it under a
  // Wake still writing to it, whose number might by then name another
  // file.
  std::mutex wake_mu_;
  int efd_ = -1;

  // Set by the I/O thread when it first blocks (to poll or to connect):
  // Start waits for it, so that an event loop's first batch, queued right
  // after the store is made, does not meet the thread's first pass, which
  // would take it from the queue and send it itself (the loop's flush then
  // finds nothing to send, or the connection held).
  std::mutex started_mu_;
  std::condition_variable started_cv_;
  bool started_ = false;

  std::mutex q_mu_;  // guards queue_, woken_, accepting_, stop_
  std::vector<Op*> queue_;
  bool woken_ = false;  // the I/O thread was woken for queue_
  bool accepting_ = false;
  bool stop_ = false;

  std::mutex conn_mu_;  // guards the connection below
  int fd_ = -1;
  // The socket Connect is opening, until it becomes fd_ or is closed; only
  // for AbandonAfterFork, which must not wait for conn_mu_.
  std::atomic<int> connecting_fd_{-1};
  redisReader* reader_ = nullptr;
  std::string out_;
  size_t out_off_ = 0;
  std::deque<Op*> inflight_;
  int64_t last_read_ = 0;     // MonoNanos of the last bytes received
  uint64_t generation_ = 0;   // of fd_: one per connection made (conn_mu_)
  int64_t connected_at_ = 0;  // MonoNanos when fd_ was made (conn_mu_)
  // A caller's inline exchange holds conn_mu_ (TryInline), waiting for
  // its reply: LoopRead, finding conn_mu_ taken, stops watching.
  std::atomic<bool> inline_busy_{false};
  std::vector<Op*> group_;  // ReadLocked's scratch
  static constexpr size_t kEagerBatch = 32;
  static constexpr int64_t kIdleCheckNanos = 20'000'000;
  // How long an event loop's deferred requests are left to its flush.
  static constexpr int64_t kLoopGraceNanos = 100'000'000;
  // Requests sharing one script command at most: bounds the script's run
  // (Redis serves nobody else meanwhile) and its reply.
  static constexpr size_t kMaxGroup = 32;
  std::atomic<int> state_{kDown};
  int64_t next_retry_ = 0;  // I/O thread only (and Start)
  int64_t backoff_ = 0;
  // Written by whoever breaks or makes the connection.
  std::atomic<bool> reported_down_{false};

  std::thread thread_;
};

// ---------------------------------------------------------------- engine

// Everything a process needs to talk to Redis; replaced in a forked child.
class Engine {
 public:
  Engine(const RedisStoreOptions& options, Counters* counters,
         uint64_t generation)
      : options(options),
        counters(counters),
        generation(generation),
        cache(options.blocked_cache, options.blocked_cache_max_keys) {
    slack_ms =
        std::max<int64_t>(1, (options.ttl_slack_nanos + 999'999) / 1'000'000);
    if (options.on_error == RedisFailurePolicy::kFallback) {
      fallback = NewMemoryStore(options.fallback);
    }
    const size_t n = std::max<size_t>(1, options.pool_size);
    for (size_t i = 0; i < n; ++i) {
      lanes.push_back(std::make_unique<Lane>(this, i));
    }
  }

  // Bounded by one connect timeout in all, not one per lane: against a
  // server that accepts and never answers, lanes after the first give up
  // at once and connect in the background (PickLane passes them over
  // meanwhile).
  void Start() {
    const int64_t deadline = MonoNanos() + options.connect_timeout_nanos;
    for (auto& lane : lanes) lane->Start(deadline);
  }
  void Stop() {
    for (auto& lane : lanes) lane->Stop();
  }
  void AbandonAfterFork() {
    for (auto& lane : lanes) lane->AbandonAfterFork();
  }

  void Log(RedisLogLevel level, const std::string& message) const {
    if (options.log) options.log(level, message);
  }

  std::string Endpoint() const {
    if (!options.unix_path.empty()) return "unix:" + options.unix_path;
    return options.host + ":" + std::to_string(options.port);
  }

  // Round robin over the lanes that are up: a lane that is down (it
  // never connected, or lost its connection and is waiting to retry)
  // would give the request the failure policy while another lane could
  // ask Redis. With none up, the round robin's choice: one reconnecting
  // after an idle close still queues.
  Lane* PickLane() {
    const size_t n = lanes.size();
    if (n == 1) return lanes[0].get();
    const size_t first = rr.fetch_add(1, std::memory_order_relaxed) % n;
    for (size_t i = 0, k = first; i < n; ++i, k = k + 1 == n ? 0 : k + 1) {
      if (lanes[k]->Up()) return lanes[k].get();
    }
    return lanes[first].get();
  }

  void AppendKey(Strategy s, std::string_view key, Resp* out) const;
  std::string KeyFor(Strategy s, std::string_view key) const;

  // A script op for `requests[0..n)`.
  Op* NewScriptOp(const Request* requests, size_t n, int64_t now, Mode mode,
                  bool incr = false, int64_t incr_period = 0);

  // Runs `op` and waits, with the caller's blocking hooks. Returns false
  // if the op could not complete in time (the caller must not read its
  // results).
  bool RunSync(Op* op);
  // Queues `op`; its callback runs when it completes. Consumes the
  // caller's reference.
  void RunAsync(Op* op, bool defer = false);
  // The lane an event loop drives (RedisStore::LoopFlush): a deferred op
  // comes from an event loop, and goes to it while it is up, so that the
  // loop's batches leave from the loop's own thread whatever the pool
  // size. Spread over the lanes, they went through the I/O threads, with
  // a thread switch each way, in smaller batches: under uvicorn and
  // wrk -c16, 0.9 context switches and 3.9 decisions per script at
  // pool_size 2 against 0.1 and 10.5 at 1, and 8 % fewer requests per
  // second. Redis runs one script at a time, so one connection per loop
  // loses nothing; the other lanes serve sync callers and stand in while
  // it is down.
  Lane* LoopLane() {
    Lane* lane = lanes[0].get();
    return lane->Up() ? lane : PickLane();
  }
  void Flush() {
    for (auto& lane : lanes) lane->Flush();
  }
  // Called once per op by whoever completes it.
  void Complete(Op* op);
  // Logs the error that gave `op` the failure policy, if Redis answered
  // one, and records it for LastError on the calling thread.
  void NoteFailure(const Op* op, bool completed);
  // Turns a script op's result (or failure) into decisions.
  void FinishScript(Op* op, bool timed_out);
  // Turns a single call's result (or failure) into its answer; `completed`
  // as RunSync returns it (false: the results must not be read).
  void FinishSingle(Op* op, bool completed, RedisStore::SingleAnswer* out);

  // Scans `requests` for a cached rejection. Returns how many requests
  // must go to Redis (those before it); `*tail` gets the rejection.
  size_t CacheScan(const Request* requests, size_t n, int64_t now,
                   Decision* tail, bool* has_tail);

  const RedisStoreOptions& options;
  Counters* const counters;
  const uint64_t generation;
  int64_t slack_ms = 1000;
  std::atomic<bool> use_eval{false};
  BlockedCache cache;
  std::unique_ptr<Store> fallback;
  std::vector<std::unique_ptr<Lane>> lanes;
  std::atomic<size_t> rr{0};
};

// ------------------------------------------------------------ lane impl

Lane::Lane(Engine* engine, size_t index) : engine_(engine), index_(index) {
  std::lock_guard<std::mutex> lock(FilesMutex());
  efd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  backoff_ = engine_->options.reconnect_min_nanos;
}

Lane::~Lane() {
  if (fd_ >= 0) close(fd_);
  if (reader_ != nullptr) redisReaderFree(reader_);
  if (efd_ >= 0) close(efd_);
}

void Lane::Start(int64_t deadline) {
  Connect(deadline);
  thread_ = std::thread([this] { Run(); });
  // Bounded like the connect: a thread the system is slow to schedule
  // delays the store's creation by at most what is left of its timeout.
  std::unique_lock<std::mutex> lock(started_mu_);
  const int64_t left = deadline - MonoNanos();
  if (left > 0) {
    started_cv_.wait_for(lock, std::chrono::nanoseconds(left),
                         [this] { return started_; });
  }
}

void Lane::Stop() {
  {
    std::lock_guard<std::mutex> lock(q_mu_);
    stop_ = true;
    accepting_ = false;
  }
  Wake();
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(wake_mu_);
  CloseFile(&efd_);
}

void Lane::AbandonAfterFork() {
  // The parent's thread does not exist here and its locks may be held
  // forever: touch nothing but our file descriptors (closing a socket in
  // the child leaves the parent's connection alone; keeping it would keep
  // that connection open in Redis after the parent closes it). Called
  // again by the child's first use of the store: then a no-op.
  const int connecting = connecting_fd_.exchange(-1);
  if (connecting >= 0 && connecting != fd_) close(connecting);
  if (fd_ >= 0) close(fd_);
  if (efd_ >= 0) close(efd_);
  fd_ = -1;
  efd_ = -1;
}

void Lane::DrainWake() {
  uint64_t value;
  while (read(efd_, &value, sizeof(value)) < 0 && errno == EINTR) {
  }
}

void Lane::Wake() {
  std::lock_guard<std::mutex> lock(wake_mu_);
  if (efd_ < 0) return;
  const uint64_t one = 1;
  ssize_t rc;
  do {
    rc = write(efd_, &one, sizeof(one));
  } while (rc < 0 && errno == EINTR);
}

bool Lane::Submit(Op* op, bool defer) {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(q_mu_);
    if (!accepting_) return false;
    op->refs.fetch_add(1, std::memory_order_relaxed);
    queue_.push_back(op);
    // One wake-up per batch: woken_ stays set until the I/O thread takes
    // the queue. A deferred op is left for Flush (the end of the event
    // loop's iteration) unless a full batch waits, which Redis can work on
    // while the loop prepares the next. Starting a lone op at once when
    // Redis is idle looks cheaper but is not: where the loop and the I/O
    // thread share a CPU, the woken I/O thread preempts the loop, the op
    // goes out alone, its reply comes back alone, and batches decay to
    // one request per script (measured: 1.3 decisions per script at 64
    // concurrent requests, 29 without the early start, and a fifth less
    // CPU per request).
    wake = !woken_ && (!defer || queue_.size() >= kEagerBatch);
    woken_ = woken_ || wake;
  }
  if (wake) Wake();
  return true;
}

void Lane::Flush() {
  bool wake;
  {
    std::lock_guard<std::mutex> lock(q_mu_);
    wake = !queue_.empty() && !woken_;
    woken_ = woken_ || wake;
  }
  if (wake) Wake();
}

RedisStore::LoopResult Lane::LoopSend(RedisStore::LoopConnection* connection) {
  std::unique_lock<std::mutex> conn(conn_mu_, std::try_to_lock);
  // Only an idle connection: the I/O thread then waits for no reply (it
  // polls the socket for a hang-up only), so the replies to what the loop
  // sends reach the loop alone; with commands in flight it polls for them
  // and would be woken anyway.
  if (!conn.owns_lock() || !IdleLocked()) {
    return RedisStore::LoopResult::kNotIdle;
  }
  if (connection->generation != generation_) {
    connection->fd = fd_;
    connection->generation = generation_;
    return RedisStore::LoopResult::kNewConnection;
  }
  std::vector<Op*> batch, completed, failed;
  {
    std::lock_guard<std::mutex> lock(q_mu_);
    if (queue_.empty()) return RedisStore::LoopResult::kNotIdle;
    batch.swap(queue_);
  }
  AppendBatchLocked(&batch, MonoNanos(), &failed);
  Add(engine_->counters->loop_writes);
  FlushLocked(&failed);
  // A write Redis did not take whole is finished by the I/O thread, which
  // then waits for the replies as well.
  EndExchange(&conn, out_off_ < out_.size(), &completed, &failed);
  return RedisStore::LoopResult::kSent;
}

bool Lane::LoopRead(uint64_t generation) {
  std::unique_lock<std::mutex> conn(conn_mu_, std::try_to_lock);
  if (!conn.owns_lock()) {
    // A caller reading its own reply inline, which it sent only with
    // nothing in flight: the bytes are its, and the loop stops watching
    // rather than be woken by them again and again. Otherwise a moment's
    // contention (the I/O thread, or an inline attempt backing off from
    // the loop's commands in flight): the loop reads at its next turn,
    // as no one else may be waiting for these replies.
    return !inline_busy_.load(std::memory_order_acquire);
  }
  // Another connection: the loop's next send watches the new one.
  if (state_.load(std::memory_order_relaxed) != kUp ||
      generation != generation_) {
    return false;
  }
  if (inflight_.empty()) {
    // Another reader (the I/O thread, awake for a batch of its own) took
    // the replies, and the loop keeps watching; but bytes no command
    // waits for, or the end of the connection, are the I/O thread's to
    // handle, and would wake the loop again and again meanwhile.
    char byte;
    const ssize_t n = recv(fd_, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
  std::vector<Op*> completed, failed;
  bool ok = ReadLocked(&completed, &failed);
  // A reply that asks for a command again (NOSCRIPT: sent as EVAL) left
  // it in out_.
  if (ok && out_off_ < out_.size()) ok = FlushLocked(&failed);
  const bool unfinished = ok && out_off_ < out_.size();
  EndExchange(&conn, unfinished, &completed, &failed);
  return ok && !unfinished;
}

int64_t Lane::LoopWatch(uint64_t generation) {
  std::unique_lock<std::mutex> conn(conn_mu_, std::try_to_lock);
  if (!conn.owns_lock()) return 1'000'000;  // busy: again in a millisecond
  if (state_.load(std::memory_order_relaxed) != kUp ||
      generation != generation_) {
    return -1;
  }
  if (inflight_.empty()) return 0;
  const int64_t left = inflight_.front()->deadline - MonoNanos();
  if (left > 0) return left;
  std::vector<Op*> completed, failed;
  TimeOutLocked(&failed);
  EndExchange(&conn, false, &completed, &failed);
  return -1;
}

bool Lane::TryInline(Op* op) {
  if (!Up()) return false;
  std::unique_lock<std::mutex> lock(conn_mu_, std::try_to_lock);
  if (!lock.owns_lock() || !IdleLocked()) return false;
  // A connection idle for a while may have been closed by Redis (its
  // `timeout`, CLIENT KILL, a proxy) before the I/O thread, woken by the
  // hang-up, took it: sent on it, the request would get the failure
  // policy although Redis is fine. Such a request goes to the I/O thread,
  // which queues it for the new connection. A busy caller skips the poll.
  if (MonoNanos() - last_read_ > kIdleCheckNanos) {
    pollfd p{fd_, POLLIN | POLLRDHUP, 0};
    if (poll(&p, 1, 0) != 0) return false;
  }
  const RedisStoreOptions& o = engine_->options;
  void* token = o.before_blocking != nullptr ? o.before_blocking() : nullptr;
  Add(engine_->counters->inline_calls);
  inline_busy_.store(true, std::memory_order_relaxed);
  op->refs.fetch_add(1, std::memory_order_relaxed);
  std::vector<Op*> completed, failed;
  AppendLocked(op);
  while (FlushLocked(&failed) && !inflight_.empty()) {
    const short events = POLLIN | (out_off_ < out_.size() ? POLLOUT : 0);
    const int ready = WaitFd(fd_, events, inflight_.front()->deadline);
    if (ready == 0) {
      TimeOutLocked(&failed);
      break;
    }
    if (ready < 0) {
      BreakLocked(std::string("poll: ") + std::strerror(errno), &failed);
      break;
    }
    if (!ReadLocked(&completed, &failed)) break;
  }
  inline_busy_.store(false, std::memory_order_release);
  EndExchange(&lock, false, &completed, &failed);
  if (o.after_blocking != nullptr) o.after_blocking(token);
  return true;
}

void Lane::Finish(std::vector<Op*>* completed, std::vector<Op*>* failed) {
  if (completed->empty() && failed->empty()) return;
  const RedisStoreOptions& o = engine_->options;
  if (o.completions_begin != nullptr) o.completions_begin();
  for (Op* op : *completed) engine_->Complete(op);
  for (Op* op : *failed) {
    if (op->result == Op::Result::kPending) {
      op->result = Op::Result::kUnavailable;
    }
    engine_->Complete(op);
  }
  if (o.completions_end != nullptr) o.completions_end();
  completed->clear();
  failed->clear();
}

bool Lane::IdleLocked() const {
  return state_.load(std::memory_order_relaxed) == kUp && inflight_.empty() &&
         out_off_ >= out_.size();
}

void Lane::EndExchange(std::unique_lock<std::mutex>* conn, bool wake,
                       std::vector<Op*>* completed, std::vector<Op*>* failed) {
  // Still under conn_mu_: released first, the I/O thread could reconnect
  // (setting accepting_) before this cleared it, leaving a lane that is up
  // and refuses every queued request until the next disconnect.
  if (state_.load(std::memory_order_relaxed) != kUp) StopAccepting(failed);
  conn->unlock();
  if (wake) Wake();
  Finish(completed, failed);
}

// Lock order: conn_mu_ may be held when taking q_mu_ (TryInline,
// Connect), never the reverse.
void Lane::StopAccepting(std::vector<Op*>* failed) {
  std::vector<Op*> queued;
  {
    std::lock_guard<std::mutex> lock(q_mu_);
    accepting_ = false;
    queued.swap(queue_);
    woken_ = false;
  }
  failed->insert(failed->end(), queued.begin(), queued.end());
  Wake();  // the I/O thread reconnects
}

void Lane::AppendBatchLocked(std::vector<Op*>* batch, int64_t now,
                             std::vector<Op*>* failed) {
  const int64_t timeout = engine_->options.command_timeout_nanos;
  for (size_t i = 0; i < batch->size();) {
    Op* op = (*batch)[i];
    // An asynchronous request queued on this connection waited for its
    // event loop's flush (an iteration held up by a full garbage
    // collection of a big heap, or by a handler computing on the loop) or
    // for this thread, not for Redis, and its caller keeps no clock of its
    // own: its timeout starts now. One queued before the connection was
    // made waited for the reconnect, which its deadline bounds
    // (ExpireQueued); a synchronous caller stops waiting at its deadline
    // (RunSync): their requests, if late, are failed rather than sent.
    if (op->async && op->deadline - timeout >= connected_at_) {
      op->deadline = now + timeout;
    }
    if (op->deadline <= now) {
      Add(engine_->counters->timeouts);
      op->timed_out = true;
      failed->push_back(op);
      ++i;
      continue;
    }
    // Script requests queued together share one script command (their
    // keys may lie in different slots: Redis Cluster, not supported yet,
    // will need a group per slot).
    size_t j = i + 1;
    if (op->kind == Op::Kind::kScript) {
      while (j < batch->size() && j - i < kMaxGroup &&
             (*batch)[j]->kind == Op::Kind::kScript &&
             (*batch)[j]->deadline > now) {
        ++j;
      }
    }
    AppendGroupLocked(&(*batch)[i], j - i);
    i = j;
  }
  batch->clear();
}

void Lane::AppendGroupLocked(Op* const* ops, size_t k) {
  if (ops[0]->kind == Op::Kind::kRaw) {
    ops[0]->group = 1;
    out_.append(ops[0]->args);
    inflight_.push_back(ops[0]);
    return;
  }
  size_t nkeys = 0, block = 0;
  bool as_eval = engine_->use_eval.load(std::memory_order_relaxed);
  for (size_t i = 0; i < k; ++i) {
    nkeys += ops[i]->items.size();
    block += ops[i]->block.size();
    as_eval = as_eval || ops[i]->as_eval;
  }
  Resp resp(&out_);
  resp.Array(nkeys + 4);
  if (as_eval) {
    resp.Bulk("EVAL");
    resp.Bulk(ScriptBody());
  } else {
    resp.Bulk("EVALSHA");
    resp.Bulk(ScriptSha1());
  }
  resp.Int(static_cast<int64_t>(nkeys));
  for (size_t i = 0; i < k; ++i) out_.append(ops[i]->keys);
  resp.BeginBulk(block);
  for (size_t i = 0; i < k; ++i) out_.append(ops[i]->block);
  resp.EndBulk();
  Add(engine_->counters->scripts);
  for (size_t i = 0; i < k; ++i) {
    Op* op = ops[i];
    op->as_eval = as_eval;
    if (!op->sent) Add(engine_->counters->calls);
    op->sent = true;
    op->group = i == 0 ? static_cast<uint32_t>(k) : 0;
    inflight_.push_back(op);
  }
}

bool Lane::FlushLocked(std::vector<Op*>* failed) {
  if (out_off_ >= out_.size()) return true;
  bool wrote = false;
  while (out_off_ < out_.size()) {
    const ssize_t n =
        send(fd_, out_.data() + out_off_, out_.size() - out_off_, MSG_NOSIGNAL);
    if (n > 0) {
      out_off_ += static_cast<size_t>(n);
      wrote = true;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    BreakLocked(std::string("write: ") + std::strerror(errno), failed);
    return false;
  }
  if (wrote) Add(engine_->counters->writes);
  if (out_off_ >= out_.size()) {
    out_.clear();
    out_off_ = 0;
  }
  return true;
}

bool Lane::ReadLocked(std::vector<Op*>* completed, std::vector<Op*>* failed) {
  char buf[65536];
  for (;;) {
    const ssize_t n = recv(fd_, buf, sizeof(buf), 0);
    if (n > 0) {
      last_read_ = MonoNanos();
      if (redisReaderFeed(reader_, buf, static_cast<size_t>(n)) != REDIS_OK) {
        BreakLocked("protocol error", failed);
        return false;
      }
      if (static_cast<size_t>(n) < sizeof(buf)) break;
      continue;
    }
    if (n == 0) {
      BreakLocked("connection closed by the server", failed);
      return false;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    BreakLocked(std::string("read: ") + std::strerror(errno), failed);
    return false;
  }
  bool resent = false;
  for (;;) {
    void* reply = nullptr;
    if (redisReaderGetReply(reader_, &reply) != REDIS_OK) {
      BreakLocked(std::string("protocol error: ") + reader_->errstr, failed);
      return false;
    }
    if (reply == nullptr) break;
    if (inflight_.empty() || inflight_.front()->group == 0 ||
        inflight_.front()->group > inflight_.size()) {
      freeReplyObject(reply);
      BreakLocked("unexpected reply", failed);
      return false;
    }
    group_.assign(inflight_.begin(),
                  inflight_.begin() + inflight_.front()->group);
    inflight_.erase(inflight_.begin(), inflight_.begin() + group_.size());
    std::string why;
    const Next next = HandleReply(group_.data(), group_.size(),
                                  static_cast<redisReply*>(reply), &why);
    freeReplyObject(reply);
    if (next == Next::kBreak) {
      failed->insert(failed->end(), group_.begin(), group_.end());
      BreakLocked(why, failed);
      return false;
    }
    if (next == Next::kResend) {
      AppendGroupLocked(group_.data(), group_.size());
      resent = true;
    } else {
      completed->insert(completed->end(), group_.begin(), group_.end());
    }
  }
  return !resent || FlushLocked(failed);
}

Lane::Next Lane::HandleReply(Op* const* ops, size_t k, const redisReply* r,
                             std::string* reason) {
  if (r->type == REDIS_REPLY_ERROR &&
      std::string_view(r->str, r->len).rfind("READONLY", 0) == 0) {
    // The primary became a replica: a failover, after which the address
    // (a DNS name, a proxy, a unix socket path) leads to the new primary
    // only on a new connection. Every write would meet this error until
    // then, and the reconnect's handshake refuses a replica, so the lane
    // retries with backoff instead of at every batch.
    *reason = "the server turned read-only, a failover? (" +
              std::string(r->str, r->len) + ")";
    return Next::kBreak;
  }
  if (ops[0]->kind == Op::Kind::kRaw) {
    ops[0]->raw = CopyReply(r);
    ops[0]->result = Op::Result::kOk;
    return Next::kDone;
  }
  const auto fail = [&](std::string_view why) {
    Add(engine_->counters->errors);
    for (size_t i = 0; i < k; ++i) {
      ops[i]->result = Op::Result::kError;
      ops[i]->error.assign(why);
    }
    return Next::kDone;
  };
  if (r->type == REDIS_REPLY_ERROR) {
    const std::string_view msg(r->str, r->len);
    if (!ops[0]->as_eval && msg.rfind("NOSCRIPT", 0) == 0) {
      // Redis restarted or SCRIPT FLUSH: EVAL sends the body and caches
      // it again, so the next calls are back to EVALSHA.
      Add(engine_->counters->script_reloads);
      for (size_t i = 0; i < k; ++i) ops[i]->as_eval = true;
      return Next::kResend;
    }
    // Only a refusal of the command itself: a NOPERM for the call's keys
    // (an ACL key pattern the storage's prefix is outside of) would refuse
    // EVAL the same way, and switching would send the whole script with
    // every later call, for good, even once the ACL lets the keys in.
    if (!ops[0]->as_eval && (msg.find("unknown command") != std::string::npos ||
                             (msg.rfind("NOPERM", 0) == 0 &&
                              msg.find("'evalsha'") != std::string::npos))) {
      if (!engine_->use_eval.exchange(true)) {
        engine_->Log(RedisLogLevel::kWarning,
                     "EVALSHA refused (" + std::string(msg) +
                         "); sending scripts with EVAL");
      }
      for (size_t i = 0; i < k; ++i) ops[i]->as_eval = true;
      return Next::kResend;
    }
    // The script stopped for all requests of the call (none of its writes
    // was undone, as with any Redis script): each gets the failure policy.
    // A key Redis refuses does not stop it (kReplyError, below).
    return fail(msg);
  }
  if (r->type != REDIS_REPLY_STRING) return fail("unexpected script reply");
  const std::string_view reply(r->str, r->len);
  size_t pos = 0;
  for (size_t i = 0; i < k; ++i) {
    if (!ReadReplyBlock(reply, &pos, ops[i]->items.size(), ops[i]->now, k == 1,
                        &ops[i]->values, &ops[i]->error)) {
      return fail("unexpected script reply");
    }
  }
  if (pos != reply.size()) return fail("unexpected script reply");
  for (size_t i = 0; i < k; ++i) {
    Op* op = ops[i];
    if (op->values[0] != 0) {
      op->result = Op::Result::kOk;
      continue;
    }
    // Only this request gets the failure policy: the script decided the
    // others and wrote nothing for it.
    Add(engine_->counters->errors);
    const Item& item = op->items[static_cast<size_t>(op->values[1])];
    op->error += " (key '" + engine_->KeyFor(item.strategy, item.key) + "')";
    op->refused = true;
    op->result = Op::Result::kError;
  }
  return Next::kDone;
}

void Lane::CloseLocked() {
  // An event loop may watch a duplicate of the socket (LoopRead), which
  // would keep the connection open past close(): shutdown ends it for
  // every descriptor, and the loop's sees the end and lets its go.
  if (fd_ >= 0) shutdown(fd_, SHUT_RDWR);
  CloseFile(&fd_);
  if (reader_ != nullptr) redisReaderFree(reader_);
  reader_ = nullptr;
  out_.clear();
  out_off_ = 0;
}

void Lane::BreakLocked(const std::string& why, std::vector<Op*>* failed) {
  CloseLocked();
  failed->insert(failed->end(), inflight_.begin(), inflight_.end());
  inflight_.clear();
  if (state_.load(std::memory_order_relaxed) == kUp) {
    Add(engine_->counters->disconnects);
    engine_->Log(
        RedisLogLevel::kWarning,
        "redis at " + engine_->Endpoint() + ": " + why + "; applying the " +
            std::string(RedisFailurePolicyName(engine_->options.on_error)) +
            " policy until it is back");
    reported_down_ = true;
    state_.store(kDown, std::memory_order_release);
  }
}

void Lane::TimeOutLocked(std::vector<Op*>* failed) {
  Add(engine_->counters->timeouts);
  for (Op* op : inflight_) op->timed_out = true;
  BreakLocked("no reply within the timeout", failed);
}

void Lane::ReconnectIdle(int fd, std::vector<Op*>* failed) {
  {
    std::lock_guard<std::mutex> lock(conn_mu_);
    // A caller running inline may have met the hang-up first (and broken
    // the connection), or may be using the connection right now.
    if (fd_ != fd || state_.load(std::memory_order_relaxed) != kUp ||
        !inflight_.empty()) {
      return;
    }
    CloseLocked();
    Add(engine_->counters->disconnects);
    // Not an outage yet: requests queue meanwhile, and only a failed
    // reconnect applies the policy and is reported.
    state_.store(kDown, std::memory_order_release);
  }
  engine_->Log(RedisLogLevel::kDebug, "redis at " + engine_->Endpoint() +
                                          " closed the idle connection; "
                                          "reconnecting");
  // The reconnect has the connect timeout, like any connect: Redis is
  // fine, and giving up sooner would turn a slow connect (a name lookup, a
  // busy server) into an outage. Requests queued meanwhile must not wait
  // longer than their own timeout: the hook answers each at its deadline.
  WaitHook hook;
  hook.fd = efd_;
  hook.run = [this] { return ExpireQueued(); };
  if (!Connect(MonoNanos() + engine_->options.connect_timeout_nanos, &hook)) {
    StopAccepting(failed);
  }
}

int64_t Lane::ExpireQueued() {
  DrainWake();
  const int64_t now = MonoNanos();
  int64_t next = std::numeric_limits<int64_t>::max();
  std::vector<Op*> completed, expired;
  {
    std::lock_guard<std::mutex> lock(q_mu_);
    // Closing: the connect ends now and what is queued gets the policy
    // (StopAccepting), as it would once connected.
    if (stop_) return kCancelWait;
    size_t kept = 0;
    for (Op* op : queue_) {
      if (op->deadline <= now) {
        op->timed_out = true;
        expired.push_back(op);
      } else {
        next = std::min(next, op->deadline);
        queue_[kept++] = op;
      }
    }
    queue_.resize(kept);
    // With requests left, the hook runs again at the first deadline (a
    // later request's is later); with none, the next Submit wakes us.
    if (queue_.empty()) woken_ = false;
  }
  Add(engine_->counters->timeouts, expired.size());
  Finish(&completed, &expired);
  return next;
}

bool Lane::Handshake(int fd, redisReader* reader, int64_t deadline,
                     WaitHook* hook, std::string* error) {
  const RedisStoreOptions& o = engine_->options;
  std::string cmd;
  Resp resp(&cmd);
  int expected = 0;
  // An ACL user with a password, a legacy password, or a user alone
  // (redis://user@host: a nopass user, sent as AUTH user "", as redis-py
  // does; without it the connection stays the default user).
  if (!o.password.empty() || !o.username.empty()) {
    if (o.username.empty()) {
      resp.Array(2);
    } else {
      resp.Array(3);
    }
    resp.Bulk("AUTH");
    if (!o.username.empty()) resp.Bulk(o.username);
    resp.Bulk(o.password);
    ++expected;
  }
  if (o.db != 0) {
    resp.Array(2);
    resp.Bulk("SELECT");
    resp.Int(o.db);
    ++expected;
  }
  resp.Array(1);
  resp.Bulk("PING");
  ++expected;
  // Every decision writes, so a replica will not do: refused here, it is
  // retried with backoff (after a failover the address may lead to the
  // new primary) instead of taking every request's script and answering
  // READONLY. A server or proxy that refuses ROLE is taken as it is.
  const int role_at = expected;
  resp.Array(1);
  resp.Bulk("ROLE");
  ++expected;
  // Load the script now rather than on a NOSCRIPT at the first batch. A
  // server that refuses SCRIPT gets EVAL later; its error is ignored.
  resp.Array(3);
  resp.Bulk("SCRIPT");
  resp.Bulk("LOAD");
  resp.Bulk(ScriptBody());
  const int optional_from = role_at;
  ++expected;
  int seen = 0;
  size_t off = 0;
  while (off < cmd.size()) {
    const ssize_t n =
        send(fd, cmd.data() + off, cmd.size() - off, MSG_NOSIGNAL);
    if (n > 0) {
      off += static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (WaitFd(fd, POLLOUT, deadline, hook) <= 0) {
        *error = "handshake timed out";
        return false;
      }
    } else {
      *error = std::string("write: ") + std::strerror(errno);
      return false;
    }
  }
  char buf[4096];
  while (expected > 0) {
    void* reply = nullptr;
    if (redisReaderGetReply(reader, &reply) != REDIS_OK) {
      *error = "protocol error";
      return false;
    }
    if (reply != nullptr) {
      const auto* r = static_cast<redisReply*>(reply);
      if (r->type == REDIS_REPLY_ERROR && seen < optional_from) {
        *error = std::string(r->str, r->len);
        freeReplyObject(reply);
        return false;
      }
      if (seen == role_at && r->type == REDIS_REPLY_ARRAY && r->elements > 0 &&
          r->element[0]->type == REDIS_REPLY_STRING) {
        const std::string_view role(r->element[0]->str, r->element[0]->len);
        if (role == "slave" || role == "replica" || role == "sentinel") {
          *error = std::string("the server is a ") +
                   (role == "sentinel" ? "Sentinel" : "replica") +
                   ", not a primary (ROLE)";
          freeReplyObject(reply);
          return false;
        }
      }
      freeReplyObject(reply);
      --expected;
      ++seen;
      continue;
    }
    const int ready = WaitFd(fd, POLLIN, deadline, hook);
    if (ready <= 0) {
      *error = ready == 0 ? "no reply to the handshake within the connect "
                            "timeout"
                          : std::string("poll: ") + std::strerror(errno);
      return false;
    }
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n == 0) {
      *error = "connection closed by the server";
      return false;
    }
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      *error = std::string("read: ") + std::strerror(errno);
      return false;
    }
    redisReaderFeed(reader, buf, static_cast<size_t>(n));
  }
  return true;
}

bool Lane::Connect(int64_t deadline, WaitHook* hook) {
  const RedisStoreOptions& o = engine_->options;
  if (deadline == 0) deadline = MonoNanos() + o.connect_timeout_nanos;
  std::string error;
  int fd = ConnectSocket(o, deadline, &error, hook, &connecting_fd_);
  redisReader* reader = nullptr;
  if (fd >= 0) {
    reader = redisReaderCreate();
    if (!Handshake(fd, reader, deadline, hook, &error)) {
      CloseFile(fd, &connecting_fd_);
      fd = -1;
      redisReaderFree(reader);
      reader = nullptr;
    }
  }
  if (fd < 0 && hook != nullptr && hook->cancelled) return false;  // closing
  if (fd < 0) {
    const int64_t now = MonoNanos();
    // Jitter (+-20 %) keeps many processes from reconnecting in lockstep.
    thread_local std::minstd_rand rng(
        static_cast<unsigned>(now ^ reinterpret_cast<uintptr_t>(this)));
    const int64_t jitter =
        backoff_ / 5 > 0
            ? static_cast<int64_t>(
                  rng() % static_cast<uint64_t>(2 * (backoff_ / 5) + 1)) -
                  backoff_ / 5
            : 0;
    next_retry_ = now + backoff_ + jitter;
    backoff_ = std::min(std::max(backoff_ * 2, o.reconnect_min_nanos),
                        std::max(o.reconnect_max_nanos, o.reconnect_min_nanos));
    if (!reported_down_) {
      engine_->Log(RedisLogLevel::kWarning,
                   "cannot reach redis at " + engine_->Endpoint() + ": " +
                       error + "; applying the " +
                       std::string(RedisFailurePolicyName(o.on_error)) +
                       " policy until it is back");
      reported_down_ = true;
    } else {
      engine_->Log(
          RedisLogLevel::kDebug,
          "reconnect to redis at " + engine_->Endpoint() + " failed: " + error);
    }
    return false;
  }
  bool was_down;
  {
    std::lock_guard<std::mutex> lock(conn_mu_);
    fd_ = fd;
    ++generation_;
    connected_at_ = MonoNanos();
    connecting_fd_.store(-1);
    reader_ = reader;
    out_.clear();
    out_off_ = 0;
    // Once kUp is published, a caller running inline (TryInline) may use
    // the connection, meet a failure and break it: it reports the outage
    // and calls StopAccepting, both under conn_mu_. accepting_ and
    // reported_down_ are therefore settled here, under conn_mu_ too (taking
    // q_mu_ under it is the lock order). Set after releasing it, accepting_
    // could come after that caller's StopAccepting and leave a lane that is
    // down yet accepting: requests then queued for the next connect
    // attempt, each waiting up to its own timeout (async ones up to the
    // connect timeout) instead of getting the failure policy at once, for
    // as long as Redis stayed unreachable; and the outage's report was
    // reset, so no "is back" followed it.
    was_down = reported_down_.exchange(false);
    state_.store(kUp, std::memory_order_release);
    std::lock_guard<std::mutex> q_lock(q_mu_);
    accepting_ = !stop_;
  }
  if (auto* connected = g_connected_hook.load(std::memory_order_relaxed)) {
    connected();
  }
  backoff_ = o.reconnect_min_nanos;
  Add(engine_->counters->reconnects);
  if (was_down) {
    engine_->Log(RedisLogLevel::kInfo,
                 "redis at " + engine_->Endpoint() + " is back");
  } else {
    engine_->Log(RedisLogLevel::kDebug,
                 "connected to redis at " + engine_->Endpoint());
  }
  return true;
}

void Lane::Run() {
  std::vector<Op*> batch, completed, failed;
  bool readable = false;
  bool timer_pass = false;  // poll timed out: no wake-up, nothing to read
  int hung_up = -1;         // the idle connection poll saw Redis close
  bool announced = false;
  auto announce = [&] {
    if (announced) return;
    announced = true;
    {
      std::lock_guard<std::mutex> lock(started_mu_);
      started_ = true;
    }
    started_cv_.notify_all();
  };
  for (;;) {
    if (hung_up >= 0) {
      ReconnectIdle(hung_up, &failed);
      hung_up = -1;
      Finish(&completed, &failed);
    }
    const int64_t now = MonoNanos();
    bool stopping;
    {
      std::lock_guard<std::mutex> lock(q_mu_);
      // A pass no one woke us for (the idle one a second) leaves an event
      // loop's deferred requests to the loop, whose flush at the end of
      // its iteration would otherwise now and then find them gone (their
      // answers are the same, but a batch leaves from here). Those that
      // waited longer than a loop's iteration takes are sent: a loop
      // closed before its flush ran never sends them.
      if (woken_ || stop_ || !timer_pass || queue_.empty() ||
          queue_.front()->deadline - engine_->options.command_timeout_nanos <=
              now - kLoopGraceNanos) {
        batch.swap(queue_);
        woken_ = false;
      }
      stopping = stop_;
    }
    int wait_fd = -1;
    short wait_events = 0;
    int64_t wake_at = now + 1'000'000'000;
    bool broke = false;
    {
      std::lock_guard<std::mutex> lock(conn_mu_);
      if (stopping) {
        state_.store(kClosed, std::memory_order_release);  // silences Break
        if (fd_ >= 0) BreakLocked("store closed", &failed);
      } else if (state_.load(std::memory_order_relaxed) == kUp) {
        AppendBatchLocked(&batch, now, &failed);
        // Read only what poll reported: a speculative recv() would cost a
        // syscall per batch. Before timing commands out, though: their
        // replies may have come in time and wait for an event loop that
        // sent them and was then held up before it read them (this pass
        // then is the idle one a second, which watches for hang-ups only).
        const auto late = [&] {
          return !inflight_.empty() && inflight_.front()->deadline <= now;
        };
        bool ok = FlushLocked(&failed) &&
                  (!readable || ReadLocked(&completed, &failed));
        if (ok && !readable && late()) ok = ReadLocked(&completed, &failed);
        if (ok && late()) TimeOutLocked(&failed);
        if (state_.load(std::memory_order_relaxed) == kUp) {
          wait_fd = fd_;
          if (!inflight_.empty()) {
            wait_events = POLLIN | (out_off_ < out_.size() ? POLLOUT : 0);
            wake_at = std::min(wake_at, inflight_.front()->deadline);
          } else {
            // Idle: only a hang-up wakes us (TryInline's replies must not:
            // their caller reads them), so that a connection Redis closed
            // is replaced before the next request needs it.
            wait_events = POLLRDHUP;
          }
        } else {
          broke = true;
        }
      }
      failed.insert(failed.end(), batch.begin(), batch.end());
      batch.clear();
    }
    if (broke || stopping) StopAccepting(&failed);
    Finish(&completed, &failed);
    if (stopping) {
      announce();
      return;
    }
    if (state_.load(std::memory_order_relaxed) == kDown) {
      if (MonoNanos() >= next_retry_) {
        readable = false;
        // Nothing is queued while the lane is down (Submit refuses): the
        // wake-up can only be Stop's, which ends the connect.
        WaitHook hook;
        hook.fd = efd_;
        hook.run = [this] {
          DrainWake();
          std::lock_guard<std::mutex> lock(q_mu_);
          return stop_ ? kCancelWait : std::numeric_limits<int64_t>::max();
        };
        announce();
        Connect(0, &hook);
        continue;
      }
      wake_at = std::min(wake_at, next_retry_);
    }
    announce();
    pollfd fds[2] = {{efd_, POLLIN, 0}, {wait_fd, wait_events, 0}};
    const int64_t left = wake_at - MonoNanos();
    const int ms = left <= 0 ? 0
                             : static_cast<int>(std::min<int64_t>(
                                   (left + 999'999) / 1'000'000, 1'000));
    const int rc = poll(fds, wait_fd >= 0 ? 2 : 1, ms);
    timer_pass = rc == 0;
    readable = rc > 0 && wait_fd >= 0 &&
               (fds[1].revents & (POLLIN | POLLERR | POLLHUP)) != 0;
    if (rc > 0 && wait_fd >= 0 && wait_events == POLLRDHUP &&
        (fds[1].revents & (POLLRDHUP | POLLERR | POLLHUP)) != 0) {
      readable = false;
      hung_up = wait_fd;
    }
    if (rc > 0 && (fds[0].revents & POLLIN)) DrainWake();
  }
}

// ---------------------------------------------------------- engine impl

// The hash tag: the first identifier after the namespace
// ("LIMITER/<this>/..."), which is the client for slowapi's keys, so that
// all limits of one client share a cluster slot.
std::string_view HashTag(std::string_view key) {
  const size_t a = key.find('/');
  if (a == std::string_view::npos) return key;
  const size_t b = key.find('/', a + 1);
  return key.substr(a + 1, b == std::string_view::npos ? b : b - a - 1);
}

void Engine::AppendKey(Strategy s, std::string_view key, Resp* out) const {
  const std::string_view tag = HashTag(key);
  thread_local std::string buf;
  buf.clear();
  buf.append(options.key_prefix);
  buf.append(StrategyCode(s));
  buf.push_back('{');
  buf.append(tag);
  buf.push_back('}');
  buf.append(key);
  out->Bulk(buf);
}

std::string Engine::KeyFor(Strategy s, std::string_view key) const {
  std::string frame;
  Resp resp(&frame);
  AppendKey(s, key, &resp);
  // Strip the bulk header and trailer.
  const size_t start = frame.find("\r\n") + 2;
  return frame.substr(start, frame.size() - start - 2);
}

Op* Engine::NewScriptOp(const Request* requests, size_t n, int64_t now,
                        Mode mode, bool incr, int64_t incr_period) {
  auto* op = new Op(this, Op::Kind::kScript);
  op->now = now;
  op->mode = mode;
  op->deadline = MonoNanos() + options.command_timeout_nanos;
  op->items.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const Request& r = requests[i];
    Item& it = op->items[i];
    it.strategy = r.strategy;
    it.incr = incr;
    it.incr_period = incr_period;
    it.limit.amount = r.limit->amount;
    it.limit.multiples = r.limit->multiples;
    it.limit.granularity = r.limit->granularity;
    it.limit.burst = r.limit->burst;
    it.cost = r.cost;
    it.key.assign(r.key);
  }
  Resp resp(&op->keys);
  for (size_t i = 0; i < n; ++i) {
    AppendKey(requests[i].strategy, requests[i].key, &resp);
  }
  std::string& b = op->block;
  b.reserve(sizeof(double) * (kFixedArgs + kValuesPerItem * n));
  const auto count = static_cast<int64_t>(n);
  AppendDouble(mode == Mode::kTest ? -count : count, &b);
  AppendDouble(FloorDivNanos(now, kNanosPerSecond), &b);
  AppendDouble(now - FloorDivNanos(now, kNanosPerSecond) * kNanosPerSecond, &b);
  for (const Item& it : op->items) AppendItemArgs(it, now, &b);
  AppendDouble(slack_ms, &b);
  return op;
}

bool Engine::RunSync(Op* op) {
  Lane* lane = PickLane();
  if (lane->TryInline(op)) return true;
  if (!lane->Submit(op)) {
    op->result = Op::Result::kUnavailable;
    return true;
  }
  void* token =
      options.before_blocking != nullptr ? options.before_blocking() : nullptr;
  bool completed;
  {
    std::unique_lock<std::mutex> lock(op->mu);
    // The lane answers by the deadline; the margin only guards against a
    // lane stuck in a connect, after which the op is abandoned to it.
    completed = op->cv.wait_until(
        lock,
        std::chrono::steady_clock::now() +
            std::chrono::nanoseconds(op->deadline - MonoNanos() + 5'000'000),
        [op] { return op->done; });
  }
  if (!completed) Add(counters->timeouts);
  if (options.after_blocking != nullptr) options.after_blocking(token);
  return completed;
}

void Engine::RunAsync(Op* op, bool defer) {
  if (!(defer ? LoopLane() : PickLane())->Submit(op, defer)) {
    op->result = Op::Result::kUnavailable;
    op->refs.fetch_add(1, std::memory_order_relaxed);
    Complete(op);
  }
  Release(op);
}

void Engine::NoteFailure(const Op* op, bool completed) {
  // Not completed: the caller's wait ended at the deadline, and the lane
  // (which may still hold the op) is not to be read.
  tl_last_timed_out = !completed || op->timed_out;
  if (!completed || op->result != Op::Result::kError) {
    tl_last_error.clear();
    return;
  }
  tl_last_error = op->error;
  const std::string policy(RedisFailurePolicyName(options.on_error));
  if (op->refused) {
    Log(RedisLogLevel::kError, "redis refused a request: " + op->error +
                                   "; the " + policy + " policy answers it");
  } else {
    Log(RedisLogLevel::kError, "redis script failed: " + op->error);
  }
}

void Engine::Complete(Op* op) {
  if (op->async && op->single != Op::Single::kNone) {
    RedisStore::SingleAnswer answer;
    FinishSingle(op, true, &answer);
    op->single_callback(op->context, answer);
  } else if (op->async) {
    FinishScript(op, false);
    op->callback(op->context, op->decisions.data(), op->written,
                 op->first_reject);
  } else {
    {
      std::lock_guard<std::mutex> lock(op->mu);
      op->done = true;
    }
    op->cv.notify_one();
  }
  Release(op);
}

size_t Engine::CacheScan(const Request* requests, size_t n, int64_t now,
                         Decision* tail, bool* has_tail) {
  *has_tail = false;
  if (!cache.enabled()) return n;
  for (size_t i = 0; i < n; ++i) {
    if (cache.Lookup(requests[i], now, tail)) {
      *has_tail = true;
      Add(counters->cache_hits);
      return i;
    }
  }
  return n;
}

void Engine::FinishScript(Op* op, bool timed_out) {
  const size_t n = op->items.size();
  const bool charge = op->mode == Mode::kHit;
  op->decisions.resize(n + (op->has_cached_tail ? 1 : 0));
  op->first_reject = n;
  op->written = 0;
  Decision* out = op->decisions.data();
  if (!timed_out && op->result == Op::Result::kOk) {
    const size_t processed = static_cast<size_t>(op->values[0]);
    for (size_t i = 0; i < processed; ++i) {
      const Item& item = op->items[i];
      PostState post;
      bool script_allowed = false;
      Decision d = InterpretDecision(item, op->now, charge,
                                     &op->values[1 + i * kValuesPerItem], &post,
                                     &script_allowed);
      if (d.allowed != script_allowed) {
        Add(counters->mismatches);
        d.allowed = script_allowed;
      }
      // Only in the caller's own window (a clock behind the newest window
      // reads at that window's start, not at `now`).
      if (op->single == Op::Single::kDecide &&
          item.strategy == Strategy::kSlidingWindowCounter &&
          post.sliding.window ==
              FloorDivNanos(op->now, item.limit.PeriodNanos())) {
        op->window =
            InspectSlidingWindow(item.limit, op->now, false, post.sliding);
        op->has_window = true;
      }
      if (!d.allowed) {
        if (op->first_reject == n) op->first_reject = i;
        if (charge) cache.Insert(item, op->now, d, post);
      } else if (charge) {
        // A smaller cost got through: a cached state of this key is stale.
        cache.Erase(item.strategy, item.key);
      }
      out[i] = d;
    }
    op->written = processed;
  } else {
    NoteFailure(op, !timed_out);
    switch (options.on_error) {
      case RedisFailurePolicy::kFailOpen:
        for (size_t i = 0; i < n; ++i) {
          const Item& item = op->items[i];
          Decision& d = out[i];
          d = Decision{};
          d.allowed = true;
          d.limit = item.limit.amount;
          d.remaining = std::max<int64_t>(0, item.limit.amount - item.cost);
          d.reset_nanos = op->now + item.limit.PeriodNanos();
          d.source = DecisionSource::kFailOpen;
        }
        op->written = n;
        Add(counters->fail_open, n);
        break;
      case RedisFailurePolicy::kFailClosed: {
        const size_t count = (charge && n > 0) ? 1 : n;
        for (size_t i = 0; i < count; ++i) {
          Decision& d = out[i];
          d = Decision{};
          d.limit = op->items[i].limit.amount;
          d.retry_after_nanos = options.fail_closed_retry_after_nanos;
          d.reset_nanos = op->now + d.retry_after_nanos;
          d.source = DecisionSource::kFailClosed;
        }
        op->written = count;
        op->first_reject = n > 0 ? 0 : n;
        Add(counters->fail_closed, count);
        break;
      }
      case RedisFailurePolicy::kFallback: {
        std::vector<Request> requests(n);
        for (size_t i = 0; i < n; ++i) {
          requests[i].strategy = op->items[i].strategy;
          requests[i].limit = &op->items[i].limit;
          requests[i].key = op->items[i].key;
          requests[i].cost = op->items[i].cost;
        }
        op->first_reject =
            fallback->Decide(requests.data(), n, op->now, op->mode, out);
        op->written =
            (charge && op->first_reject < n) ? op->first_reject + 1 : n;
        for (size_t i = 0; i < op->written; ++i) {
          out[i].source = DecisionSource::kFallback;
        }
        Add(counters->fallback, op->written);
        break;
      }
    }
  }
  if (op->has_cached_tail && op->first_reject == n && op->written == n) {
    out[n] = op->cached_tail;
    op->written = n + 1;
  }
  Add(counters->decisions, op->written);
}

void Engine::FinishSingle(Op* op, bool completed,
                          RedisStore::SingleAnswer* out) {
  if (op->single == Op::Single::kRaw) {
    // No policy answers a plain command: the caller learns whether Redis
    // answered (an error reply is Redis's no), as the blocking call does.
    const bool ok = completed && op->result == Op::Result::kOk;
    out->answered = ok && op->raw.type != REDIS_REPLY_ERROR;
    out->count = ok ? op->raw.integer : 0;
    // The only plain command answered with an array is SCAN.
    if (out->answered && op->raw.type == REDIS_REPLY_ARRAY) {
      out->answered = ParseScan(op->raw, options.key_prefix.size(),
                                &out->cursor, &out->keys);
    }
    if (ok && op->raw.type == REDIS_REPLY_ERROR) out->error = op->raw.str;
    out->timed_out = !completed || op->timed_out;
    return;
  }
  const Item& item = op->items[0];
  const int64_t now = op->now;
  if (op->single == Op::Single::kDecide) {
    FinishScript(op, !completed);
    out->decision = op->decisions[0];
    out->source = out->decision.source;
    out->window = op->window;
    out->has_window = op->has_window;
  } else if (completed && op->result == Op::Result::kOk && op->values[0] == 1) {
    if (op->single == Op::Single::kIncr) {
      out->count =
          InterpretIncr(item, now, &op->values[1], &out->expiry_at_nanos);
    } else {
      out->window = InterpretInspect(item, now, &op->values[1]);
    }
    return;
  } else if (op->single == Op::Single::kInspect &&
             cache.Peek(item.strategy, item.key, now, &out->window)) {
    // Refused from the cache meanwhile, the key reads as those refusals
    // were decided: through the limits adapter, slowapi reads the
    // headers of a refusal with a separate call, which would otherwise
    // meet the policy (fail-closed: an exception, a 500) for a request
    // the store had answered.
    NoteFailure(op, completed);
    out->source = DecisionSource::kCache;
  } else {
    NoteFailure(op, completed);
    switch (options.on_error) {
      case RedisFailurePolicy::kFailOpen:
        Add(counters->fail_open);
        out->source = DecisionSource::kFailOpen;
        out->window.time_nanos = now;
        out->expiry_at_nanos = now + item.incr_period;
        break;
      case RedisFailurePolicy::kFailClosed:
        Add(counters->fail_closed);
        out->source = DecisionSource::kFailClosed;
        out->window.time_nanos = now;
        out->count = std::numeric_limits<int64_t>::max();
        out->expiry_at_nanos = now + options.fail_closed_retry_after_nanos;
        break;
      case RedisFailurePolicy::kFallback:
        Add(counters->fallback);
        out->source = DecisionSource::kFallback;
        if (op->single == Op::Single::kIncr) {
          out->count = fallback->Incr(item.key, item.incr_period, item.cost,
                                      now, &out->expiry_at_nanos);
        } else {
          Request r;
          r.strategy = item.strategy;
          r.limit = &item.limit;
          r.key = item.key;
          r.cost = item.cost;
          out->window = fallback->Inspect(r, now);
        }
        break;
    }
  }
  if (completed && op->result == Op::Result::kError) out->error = op->error;
  out->timed_out = !completed || op->timed_out;
}

// ---------------------------------------------------------------- store

class RedisStoreImpl;

// Live stores, for ForkChild. Never destroyed: a store may outlive the
// statics of this file.
std::mutex& StoresMutex() {
  static auto* mu = new std::mutex;
  return *mu;
}
std::vector<RedisStoreImpl*>& Stores() {
  static auto* stores = new std::vector<RedisStoreImpl*>;
  return *stores;
}

class RedisStoreImpl final : public RedisStore {
 public:
  explicit RedisStoreImpl(const RedisStoreOptions& options)
      : options_(options) {
    RegisterAtFork();
    auto* engine =
        new Engine(options_, &counters_,
                   g_fork_generation.load(std::memory_order_relaxed));
    engine_.store(engine, std::memory_order_release);
    {
      // Known to ForkChild before the first connect: a fork meanwhile (by
      // another thread) must not leave the child that socket.
      std::lock_guard<std::mutex> lock(StoresMutex());
      Stores().push_back(this);
    }
    engine->Start();
  }

  ~RedisStoreImpl() override {
    // Closed while ForkChild still knows it: a fork meanwhile must not
    // leave the child its sockets.
    Close();
    {
      std::lock_guard<std::mutex> lock(StoresMutex());
      auto& stores = Stores();
      stores.erase(std::find(stores.begin(), stores.end(), this));
    }
    Engine* e = engine_.load();
    if (e->generation == g_fork_generation.load()) delete e;
  }

  // In a forked child, whose only thread is the one that forked: whoever
  // held engine_mu_ in the parent (Close waiting for an I/O thread, Reinit
  // connecting) does not exist here and would never release it. What it
  // guards stays consistent: closed_ is set before Close waits, and any
  // engine the parent had is abandoned by the child's first call.
  void ResetLockAfterFork() { new (&engine_mu_) std::mutex(); }

  // In a forked child, at once rather than at its first call: a child that
  // never uses the store (a worker pool's process, a daemon) would
  // otherwise hold the parent's connections open in Redis after the parent
  // closes them.
  void CloseInheritedFiles() {
    const uint64_t gen = g_fork_generation.load();
    Engine* e = engine_.load();
    if (e->generation != gen) e->AbandonAfterFork();
    Engine* starting = starting_.load();
    if (starting != nullptr && starting->generation != gen) {
      starting->AbandonAfterFork();
    }
  }

  size_t Decide(const Request* requests, size_t n, int64_t now, Mode mode,
                Decision* out) override {
    Engine* e = Acquire();
    Decision tail;
    bool has_tail = false;
    const size_t send = mode == Mode::kHit
                            ? e->CacheScan(requests, n, now, &tail, &has_tail)
                            : n;
    if (has_tail && send == 0) {
      out[0] = tail;
      Add(counters_.decisions);
      tl_last_source = DecisionSource::kCache;
      return 0;
    }
    if (n == 0) return 0;
    Op* op = e->NewScriptOp(requests, send, now, mode);
    op->has_cached_tail = has_tail;
    op->cached_tail = tail;
    const bool completed = e->RunSync(op);
    e->FinishScript(op, !completed);
    std::copy(op->decisions.begin(), op->decisions.begin() + op->written, out);
    const size_t first_reject = op->first_reject;
    tl_last_source = op->written > 0 ? op->decisions[op->written - 1].source
                                     : DecisionSource::kStore;
    Release(op);
    return first_reject;
  }

  void DecideAsync(const Request* requests, size_t n, int64_t now, Mode mode,
                   DecideCallback done, void* context) override {
    Async(requests, n, now, mode, done, context, false);
  }

  void DecideAsyncDeferred(const Request* requests, size_t n, int64_t now,
                           Mode mode, DecideCallback done,
                           void* context) override {
    Async(requests, n, now, mode, done, context, true);
  }

  void Flush() override { Acquire()->Flush(); }
  LoopResult LoopFlush(LoopConnection* connection) override {
    Engine* e = Acquire();
    const LoopResult r = e->lanes[0]->LoopSend(connection);
    // What was deferred to another lane while the loop's was down goes
    // out through that lane's I/O thread (kNotIdle flushes them all).
    if (r == LoopResult::kSent) {
      for (size_t i = 1; i < e->lanes.size(); ++i) e->lanes[i]->Flush();
    }
    return r;
  }
  bool LoopRead(uint64_t generation) override {
    return Acquire()->lanes[0]->LoopRead(generation);
  }
  int64_t LoopWatch(uint64_t generation) override {
    return Acquire()->lanes[0]->LoopWatch(generation);
  }

  void Async(const Request* requests, size_t n, int64_t now, Mode mode,
             DecideCallback done, void* context, bool defer) {
    Engine* e = Acquire();
    Decision tail;
    bool has_tail = false;
    const size_t send = mode == Mode::kHit
                            ? e->CacheScan(requests, n, now, &tail, &has_tail)
                            : n;
    if (has_tail && send == 0) {
      Add(counters_.decisions);
      done(context, &tail, 1, 0);
      return;
    }
    if (n == 0) {
      done(context, nullptr, 0, 0);
      return;
    }
    Op* op = e->NewScriptOp(requests, send, now, mode);
    op->has_cached_tail = has_tail;
    op->cached_tail = tail;
    op->async = true;
    op->callback = done;
    op->context = context;
    e->RunAsync(op, defer);
  }

  WindowState Inspect(const Request& request, int64_t now) override {
    Engine* e = Acquire();
    WindowState cached;
    if (ReadCached(e, request, now, &cached)) {
      tl_last_source = DecisionSource::kCache;
      return cached;
    }
    Op* op = NewInspectOp(e, request, now);
    SingleAnswer answer;
    e->FinishSingle(op, e->RunSync(op), &answer);
    tl_last_source = answer.source;
    Release(op);
    return answer.window;
  }

  int64_t Incr(std::string_view key, int64_t expiry_nanos, int64_t amount,
               int64_t now, int64_t* expiry_at) override {
    Engine* e = Acquire();
    Op* op = NewIncrOp(e, key, expiry_nanos, amount, now);
    SingleAnswer answer;
    e->FinishSingle(op, e->RunSync(op), &answer);
    tl_last_source = answer.source;
    if (expiry_at != nullptr) *expiry_at = answer.expiry_at_nanos;
    Release(op);
    return answer.count;
  }

  void DecideOneDeferred(const Request& request, int64_t now,
                         SingleCallback done, void* context) override {
    Engine* e = Acquire();
    SingleAnswer answer;
    if (DecidedFromCache(e, request, now, &answer)) {
      done(context, answer);
      return;
    }
    RunSingle(e, NewDecideOp(e, request, now), done, context);
  }

  SingleAnswer DecideOne(const Request& request, int64_t now) override {
    Engine* e = Acquire();
    SingleAnswer answer;
    if (!DecidedFromCache(e, request, now, &answer)) {
      Op* op = NewDecideOp(e, request, now);
      e->FinishSingle(op, e->RunSync(op), &answer);
      Release(op);
    }
    tl_last_source = answer.source;
    return answer;
  }

  // A single decision the blocked-key cache answers (into `*answer`).
  bool DecidedFromCache(Engine* e, const Request& request, int64_t now,
                        SingleAnswer* answer) {
    bool cached = false;
    e->CacheScan(&request, 1, now, &answer->decision, &cached);
    if (!cached) return false;
    Add(counters_.decisions);
    answer->source = DecisionSource::kCache;
    return true;
  }

  static Op* NewDecideOp(Engine* e, const Request& request, int64_t now) {
    Op* op = e->NewScriptOp(&request, 1, now, Mode::kHit);
    op->single = Op::Single::kDecide;
    return op;
  }

  static Op* NewInspectOp(Engine* e, const Request& request, int64_t now) {
    Op* op = e->NewScriptOp(&request, 1, now, Mode::kTest);
    op->single = Op::Single::kInspect;
    return op;
  }

  void InspectDeferred(const Request& request, int64_t now, SingleCallback done,
                       void* context) override {
    Engine* e = Acquire();
    SingleAnswer answer;
    if (ReadCached(e, request, now, &answer.window)) {
      answer.source = DecisionSource::kCache;
      done(context, answer);
      return;
    }
    RunSingle(e, NewInspectOp(e, request, now), done, context);
  }

  void IncrDeferred(std::string_view key, int64_t expiry_nanos, int64_t amount,
                    int64_t now, SingleCallback done, void* context) override {
    Engine* e = Acquire();
    RunSingle(e, NewIncrOp(e, key, expiry_nanos, amount, now), done, context);
  }

  bool Clear(Strategy strategy, std::string_view key) override {
    bool existed = false;
    TryClear(strategy, key, &existed);
    return existed;
  }

  bool TryClear(Strategy strategy, std::string_view key,
                bool* existed) override {
    size_t cleared = 0;
    const bool ok = TryClearMany(&strategy, 1, key, &cleared);
    *existed = cleared > 0;
    return ok;
  }

  bool TryClearMany(const Strategy* strategies, size_t n, std::string_view key,
                    size_t* cleared) override {
    Engine* e = Acquire();
    std::vector<std::string> keys;
    RawReply reply;
    *cleared = 0;
    if (!RawArgv(e, ClearArgv(e, strategies, n, key, &keys), &reply) ||
        reply.type != REDIS_REPLY_INTEGER) {
      return false;
    }
    *cleared = static_cast<size_t>(reply.integer);
    return true;
  }

  size_t Reset() override {
    size_t dropped = 0;
    TryReset(&dropped);
    return dropped;
  }

  bool TryReset(size_t* dropped) override {
    Engine* e = Acquire();
    Forget(e);
    *dropped = 0;
    bool ok = true;
    const bool listed =
        ForEachKeyBatch(e, [&](const std::vector<std::string>& keys) {
          RawReply reply;
          if (RawArgv(e, UnlinkArgv(keys), &reply) &&
              reply.type == REDIS_REPLY_INTEGER) {
            *dropped += static_cast<size_t>(reply.integer);
          } else {
            ok = false;
          }
        });
    return listed && ok;
  }

  size_t Size() const override {
    size_t size = 0;
    TrySize(&size);
    return size;
  }

  bool TrySize(size_t* size) const override {
    auto* self = const_cast<RedisStoreImpl*>(this);
    Engine* e = self->Acquire();
    *size = 0;
    return self->ForEachKeyBatch(
        e, [&](const std::vector<std::string>& keys) { *size += keys.size(); });
  }

  void Close() override {
    std::lock_guard<std::mutex> lock(engine_mu_);
    if (closed_) return;
    closed_ = true;
    Engine* e = engine_.load();
    if (e->generation == g_fork_generation.load()) e->Stop();
  }

  bool Ping(int64_t* rtt_nanos) override {
    Engine* e = Acquire();
    const int64_t start = MonoNanos();
    RawReply reply;
    const bool ok = Raw(e, {"PING"}, &reply) &&
                    reply.type == REDIS_REPLY_STATUS && reply.str == "PONG";
    if (rtt_nanos != nullptr) *rtt_nanos = MonoNanos() - start;
    return ok;
  }

  bool Connected() const override {
    Engine* e = const_cast<RedisStoreImpl*>(this)->Acquire();
    for (const auto& lane : e->lanes) {
      if (lane->Up()) return true;
    }
    return false;
  }

  RedisStoreStats Stats() const override {
    RedisStoreStats s;
    auto get = [](const std::atomic<uint64_t>& c) {
      return c.load(std::memory_order_relaxed);
    };
    s.decisions = get(counters_.decisions);
    s.calls = get(counters_.calls);
    s.writes = get(counters_.writes);
    s.inline_calls = get(counters_.inline_calls);
    s.cache_hits = get(counters_.cache_hits);
    s.fail_open = get(counters_.fail_open);
    s.fail_closed = get(counters_.fail_closed);
    s.fallback = get(counters_.fallback);
    s.timeouts = get(counters_.timeouts);
    s.errors = get(counters_.errors);
    s.disconnects = get(counters_.disconnects);
    s.reconnects = get(counters_.reconnects);
    s.script_reloads = get(counters_.script_reloads);
    s.mismatches = get(counters_.mismatches);
    s.scripts = get(counters_.scripts);
    s.loop_writes = get(counters_.loop_writes);
    return s;
  }

  const RedisStoreOptions& options() const override { return options_; }

  std::string RedisKey(Strategy strategy, std::string_view key) const override {
    return const_cast<RedisStoreImpl*>(this)->Acquire()->KeyFor(strategy, key);
  }

 private:
  Engine* Acquire() {
    Engine* e = engine_.load(std::memory_order_acquire);
    if (e->generation == g_fork_generation.load(std::memory_order_relaxed)) {
      return e;
    }
    return Reinit();
  }

  // First call in a forked child: a new engine with its own connection.
  Engine* Reinit() {
    std::lock_guard<std::mutex> lock(engine_mu_);
    const uint64_t gen = g_fork_generation.load();
    Engine* old = engine_.load();
    if (old->generation == gen) return old;
    old->AbandonAfterFork();  // leaked on purpose: see Lane::AbandonAfterFork
    auto* fresh = new Engine(options_, &counters_, gen);
    if (!closed_) {
      void* token = options_.before_blocking != nullptr
                        ? options_.before_blocking()
                        : nullptr;
      // Known to ForkChild while it connects, as the constructor's engine
      // is: a fork meanwhile (by another thread of this child) must not
      // leave the grandchild that socket. Not yet engine_, which callers
      // would use before it is up instead of waiting here for it.
      starting_.store(fresh);
      fresh->Start();
      if (options_.after_blocking != nullptr) options_.after_blocking(token);
      fresh->Log(RedisLogLevel::kDebug, "forked child " +
                                            std::to_string(getpid()) +
                                            ": new connection to redis");
    }
    engine_.store(fresh, std::memory_order_release);
    starting_.store(nullptr);
    return fresh;
  }

  // limits' Storage.incr as a script op (strategy code 4: a fixed window
  // that never rejects, its window `expiry_nanos` long).
  static Op* NewIncrOp(Engine* e, std::string_view key, int64_t expiry_nanos,
                       int64_t amount, int64_t now) {
    Limit unused;
    Request r;
    r.strategy = Strategy::kFixedWindow;
    r.limit = &unused;
    r.key = key;
    r.cost = amount;
    Op* op = e->NewScriptOp(&r, 1, now, Mode::kHit, true, expiry_nanos);
    op->single = Op::Single::kIncr;
    return op;
  }

  void ClearDeferred(const Strategy* strategies, size_t n, std::string_view key,
                     SingleCallback done, void* context) override {
    Engine* e = Acquire();
    std::vector<std::string> keys;
    RunSingle(e, NewRawOp(e, ClearArgv(e, strategies, n, key, &keys)), done,
              context);
  }

  // The DEL of `key`'s states under strategies[0..n), which are first
  // forgotten in process (blocked-key cache, fallback store); its
  // arguments point into `*keys`. One command: a key's states share its
  // hash tag, and so a cluster slot.
  static std::vector<std::string_view> ClearArgv(
      Engine* e, const Strategy* strategies, size_t n, std::string_view key,
      std::vector<std::string>* keys) {
    keys->clear();
    keys->reserve(n);
    for (size_t i = 0; i < n; ++i) {
      e->cache.Erase(strategies[i], key);
      if (e->fallback != nullptr) e->fallback->Clear(strategies[i], key);
      keys->push_back(e->KeyFor(strategies[i], key));
    }
    std::vector<std::string_view> argv{"DEL"};
    argv.insert(argv.end(), keys->begin(), keys->end());
    return argv;
  }

  void PingDeferred(SingleCallback done, void* context) override {
    Engine* e = Acquire();
    RunSingle(e, NewRawOp(e, {"PING"}), done, context);
  }

  void ForgetInProcess() override { Forget(Acquire()); }

  void ScanDeferred(std::string_view cursor, SingleCallback done,
                    void* context) override {
    Engine* e = Acquire();
    std::string pattern;
    RunSingle(e, NewRawOp(e, ScanArgv(cursor, &pattern)), done, context);
  }

  void UnlinkDeferred(const std::vector<std::string>& keys, SingleCallback done,
                      void* context) override {
    Engine* e = Acquire();
    RunSingle(e, NewRawOp(e, UnlinkArgv(keys)), done, context);
  }

  static void Forget(Engine* e) {
    e->cache.Clear();
    if (e->fallback != nullptr) e->fallback->Reset();
  }

  // One page of this store's keys, every strategy's (see ParseScan); the
  // arguments point into `*pattern` and `cursor`.
  std::vector<std::string_view> ScanArgv(std::string_view cursor,
                                         std::string* pattern) const {
    *pattern = options_.key_prefix + CodePattern() + "{*";
    return {"SCAN", cursor, "MATCH", *pattern, "COUNT", "1000"};
  }

  static std::vector<std::string_view> UnlinkArgv(
      const std::vector<std::string>& keys) {
    std::vector<std::string_view> argv;
    argv.reserve(keys.size() + 1);
    argv.push_back("UNLINK");
    for (const std::string& k : keys) argv.push_back(k);
    return argv;
  }

  Op* NewRawOp(Engine* e, const std::vector<std::string_view>& argv) {
    auto* op = new Op(e, Op::Kind::kRaw);
    op->single = Op::Single::kRaw;  // answered by FinishSingle if async
    op->deadline = MonoNanos() + options_.command_timeout_nanos;
    Resp resp(&op->args);
    resp.Array(argv.size());
    for (std::string_view a : argv) resp.Bulk(a);
    return op;
  }

  // BlockedCache::Read, counted as a cache hit.
  bool ReadCached(Engine* e, const Request& request, int64_t now,
                  WindowState* out) {
    if (!e->cache.Read(request, now, out)) return false;
    Add(counters_.cache_hits);
    return true;
  }

  static void RunSingle(Engine* e, Op* op, SingleCallback done, void* context) {
    op->async = true;
    op->single_callback = done;
    op->context = context;
    e->RunAsync(op, /*defer=*/true);
  }

  bool RawArgv(Engine* e, const std::vector<std::string_view>& argv,
               RawReply* reply) {
    Op* op = NewRawOp(e, argv);
    const bool completed = e->RunSync(op);
    const bool ok = completed && op->result == Op::Result::kOk;
    if (ok) *reply = std::move(op->raw);
    Release(op);
    return ok && reply->type != REDIS_REPLY_ERROR;
  }

  bool Raw(Engine* e, std::initializer_list<std::string_view> argv,
           RawReply* reply) {
    return RawArgv(e, std::vector<std::string_view>(argv), reply);
  }

  // Calls `fn` with batches of this store's keys (one SCAN over them all).
  // False when a SCAN got no answer: the batches seen are then not all.
  template <class Fn>
  bool ForEachKeyBatch(Engine* e, Fn fn) {
    std::string pattern;
    std::string cursor = "0";
    std::vector<std::string> keys;
    do {
      RawReply reply;
      if (!RawArgv(e, ScanArgv(cursor, &pattern), &reply) ||
          !ParseScan(reply, options_.key_prefix.size(), &cursor, &keys)) {
        return false;
      }
      if (!keys.empty()) fn(keys);
    } while (cursor != "0");
    return true;
  }

  RedisStoreOptions options_;
  Counters counters_;
  std::mutex engine_mu_;
  std::atomic<Engine*> engine_{nullptr};
  // The engine Reinit is starting, until it becomes engine_.
  std::atomic<Engine*> starting_{nullptr};
  bool closed_ = false;
};

// The registry and the name lookups are held across fork() so that the
// child's copies are whole.
void ForkPrepare() {
  StoresMutex().lock();
  LookupsForkPrepare();
  FilesMutex().lock();
}
void ForkParent() {
  FilesMutex().unlock();
  LookupsForkParent();
  StoresMutex().unlock();
}
void ForkChild() {
  FilesMutex().unlock();
  LookupsForkChild();
  g_fork_generation.fetch_add(1, std::memory_order_relaxed);
  for (RedisStoreImpl* store : Stores()) {
    store->ResetLockAfterFork();
    store->CloseInheritedFiles();
  }
  StoresMutex().unlock();
}

}  // namespace
}  // namespace redis

DecisionSource RedisStore::LastSource() { return redis::tl_last_source; }

const std::string& RedisStore::LastError() { return redis::tl_last_error; }
bool RedisStore::LastTimedOut() { return redis::tl_last_timed_out; }

bool RedisStoreAvailable() { return true; }

std::unique_ptr<RedisStore> NewRedisStore(const RedisStoreOptions& options,
                                          std::string* error) {
  if (options.pool_size < 1 || options.pool_size > 64) {
    *error = "pool_size must be between 1 and 64";
    return nullptr;
  }
  if (options.command_timeout_nanos <= 0 ||
      options.connect_timeout_nanos <= 0) {
    *error = "timeouts must be positive";
    return nullptr;
  }
  for (char c : options.key_prefix) {
    if (c == '{' || c == '}' || c == '*' || c == '?' || c == '[' || c == ']' ||
        c == '\\') {
      *error = "key_prefix must not contain '{', '}' or glob characters";
      return nullptr;
    }
  }
  return std::make_unique<redis::RedisStoreImpl>(options);
}

}  // namespace rapidlimit
