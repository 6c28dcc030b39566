// A Store shared by many processes through a Redis (or Valkey) server.
//
// Every Decide is one atomic Lua script call (EVALSHA, reloaded
// transparently after NOSCRIPT) that evaluates all of a request's limits
// in order, with the memory store's semantics. Calls from any thread are
// pipelined by a connection-owning I/O thread: whatever arrives while a
// batch is on the wire goes out together in the next write. Time is the
// caller's `now`, as for every Store (see redis_store.cc for why).
//
// When Redis cannot answer within the timeout, the configured policy
// decides: fail-open, fail-closed, or an in-process memory store, until
// the connection is back. Available only when built with hiredis.
#ifndef RAPIDLIMIT_REDIS_STORE_H_
#define RAPIDLIMIT_REDIS_STORE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "rapidlimit/memory_store.h"
#include "rapidlimit/store.h"

namespace rapidlimit {

// What a decision gets when Redis cannot answer in time.
enum class RedisFailurePolicy : uint8_t {
  kFailOpen,    // allow (DecisionSource::kFailOpen), log and count
  kFailClosed,  // reject with retry_after (DecisionSource::kFailClosed)
  kFallback,    // decide in an in-process memory store (kFallback)
};

// "fail-open", "fail-closed", "fallback".
std::string_view RedisFailurePolicyName(RedisFailurePolicy policy);

enum class RedisLogLevel : uint8_t { kDebug, kInfo, kWarning, kError };

struct RedisStoreOptions {
  // TCP endpoint, unless `unix_path` is set.
  std::string host = "localhost";
  int port = 6379;
  std::string unix_path;
  std::string username;  // Redis 6 ACL user; empty: AUTH with password only
  std::string password;  // empty: no AUTH
  int64_t db = 0;

  int64_t connect_timeout_nanos = 500'000'000;  // connect + handshake
  int64_t command_timeout_nanos = 200'000'000;  // submit to reply
  int64_t reconnect_min_nanos = 50'000'000;     // backoff after a failure,
  int64_t reconnect_max_nanos = 2'000'000'000;  // doubling up to this
  // Connections, each with its own I/O thread (1 is enough for a process:
  // a connection pipelines hundreds of thousands of decisions a second).
  size_t pool_size = 1;

  // Prepended to every Redis key. No '{', '}' or glob characters. Set by
  // ApplyRedisOption, a prefix ending in a letter or digit gets ':'.
  std::string key_prefix = "rapidlimit:";
  // Extra lifetime given to Redis keys beyond the end of their state, so
  // that clock skew between app instances never loses live state.
  int64_t ttl_slack_nanos = 1'000'000'000;

  RedisFailurePolicy on_error = RedisFailurePolicy::kFailClosed;
  int64_t fail_closed_retry_after_nanos = 1'000'000'000;
  MemoryStoreOptions fallback;  // for kFallback

  // Answer requests for a key known to be over its limit until time T in
  // process until T, without a Redis command.
  bool blocked_cache = true;
  size_t blocked_cache_max_keys = 100'000;

  // Called around every wait for Redis on the calling thread (the Python
  // binding releases the GIL): `before_blocking` returns a token handed
  // to `after_blocking`. Both may be null.
  void* (*before_blocking)() = nullptr;
  void (*after_blocking)(void* token) = nullptr;

  // Bracket each run of DecideAsync callbacks that one pass over the
  // replies produces (on the thread running them, usually an I/O thread),
  // so that callbacks can leave their wake-ups to the end of the run and
  // wake a waiting thread once for all its replies rather than once per
  // reply. Both may be null; callbacks run outside a bracket too (a
  // request that fails when submitted).
  void (*completions_begin)() = nullptr;
  void (*completions_end)() = nullptr;

  // Connection events and errors; called from any thread, must not block
  // or call back into the store. Null: silent.
  std::function<void(RedisLogLevel, const std::string&)> log;
};

// Parses `redis://[[user]:password@]host[:port][/db][?option=value...]`,
// `redis+unix:///path.sock[?db=N...]`, `unix:///path.sock`, and the same
// with `valkey` for `redis` and an optional `rapidlimit+` prefix, into
// `options` (query options go through ApplyRedisOption). Unsupported
// schemes (TLS, cluster, sentinel) and malformed URIs return false with
// `error` naming the URI.
bool ParseRedisUri(std::string_view uri, RedisStoreOptions* options,
                   std::string* error);

// `uri` with its password (if any) replaced by "***", for messages.
std::string RedactRedisUri(std::string_view uri);

// Sets one option by the name storage_options use: timeout (alias
// socket_timeout), connect_timeout (socket_connect_timeout), pool_size,
// key_prefix, on_error (fail-open | fail-closed | fallback),
// fail_closed_retry_after, blocked_cache, blocked_cache_size,
// reconnect_min, reconnect_max, ttl_slack, fallback_max_keys, db,
// username, password (durations in seconds). redis-py options without a
// meaning here are accepted and ignored; `*ignored` (if non-null) is set
// for them. Unknown names and bad values return false with `error`.
bool ApplyRedisOption(std::string_view name, std::string_view value,
                      RedisStoreOptions* options, std::string* error,
                      bool* ignored = nullptr);

// Whether this build has the Redis store (hiredis was found).
bool RedisStoreAvailable();

struct RedisStoreStats {
  uint64_t decisions = 0;     // requests decided (a batch counts each)
  uint64_t calls = 0;         // requests' script calls sent to Redis
  uint64_t scripts = 0;       // script commands (several calls may share
                              // one when requests wait together)
  uint64_t writes = 0;        // socket writes carrying commands (batches)
  uint64_t inline_calls = 0;  // calls done on the caller's thread
  uint64_t loop_writes = 0;   // batches an event loop sent itself
  uint64_t cache_hits =
      0;  // requests and reads answered by the blocked-key cache
  uint64_t fail_open = 0;       // requests allowed by the failure policy
  uint64_t fail_closed = 0;     // requests rejected by the failure policy
  uint64_t fallback = 0;        // requests decided by the fallback store
  uint64_t timeouts = 0;        // commands that exceeded the timeout
  uint64_t errors = 0;          // error replies and protocol failures, and
                                // requests whose key Redis refused
  uint64_t disconnects = 0;     // connections lost
  uint64_t reconnects = 0;      // connections (re)established
  uint64_t script_reloads = 0;  // NOSCRIPT replies answered by EVAL
  uint64_t mismatches = 0;      // script vs. C++ disagreements (must stay 0)
};

class RedisStore : public Store {
 public:
  // Stops the I/O threads and closes the connections; later calls get the
  // failure policy. Bounded by the connect timeout. Idempotent.
  virtual void Close() = 0;
  // Round trip of a PING through the same pipeline; false if unavailable.
  virtual bool Ping(int64_t* rtt_nanos) = 0;
  // Whether a connection is up now.
  virtual bool Connected() const = 0;
  virtual RedisStoreStats Stats() const = 0;
  virtual const RedisStoreOptions& options() const = 0;

  // The Redis key holding `key`'s state for `strategy` (for tests/tools).
  virtual std::string RedisKey(Strategy strategy,
                               std::string_view key) const = 0;

  // DecideAsync that leaves the command in the queue until Flush() (or
  // the I/O thread's next wake-up), so that what an event loop's tasks ask
  // for in one iteration goes out in one script call; the loop calls
  // Flush() once per iteration. The I/O thread is still woken at once
  // when 32 commands are waiting, so that Redis works on them while the
  // loop prepares more.
  virtual void DecideAsyncDeferred(const Request* requests, size_t n,
                                   int64_t now_nanos, Mode mode,
                                   DecideCallback done, void* context) = 0;
  virtual void Flush() = 0;

  // The limits adapter's single calls, asynchronously and deferred as
  // DecideAsyncDeferred is: Decide of one request in hit mode, Inspect and
  // Incr. `done` runs once, with what the synchronous call would return
  // and LastSource() / LastError() / LastTimedOut() say after it, on the thread
  // that completes the call (the caller's own, before this returns, for a
  // request the blocked-key cache answers or that fails at once); it must
  // not block. `request.key` and the limit are copied.
  struct SingleAnswer {
    Decision decision;  // DecideOneDeferred
    // InspectDeferred; DecideOneDeferred of a sliding window that Redis
    // decided (`has_window`): the state a read right after it gets.
    WindowState window;
    bool has_window = false;
    int64_t count = 0;            // IncrDeferred: the counter after the call
    int64_t expiry_at_nanos = 0;  // IncrDeferred: when the counter expires
    DecisionSource source = DecisionSource::kStore;
    std::string error;       // a failure policy's answer: Redis's error, if any
    bool timed_out = false;  // a failure policy's answer: no reply in time
    // ClearDeferred, PingDeferred, ScanDeferred, UnlinkDeferred: Redis
    // answered (no policy answers them; `error` and `timed_out` say why
    // not). ClearDeferred, UnlinkDeferred: `count` keys were removed.
    bool answered = false;
    // ScanDeferred: the page's keys and the cursor of the next page ("0"
    // when the scan is complete).
    std::vector<std::string> keys;
    std::string cursor;
  };
  using SingleCallback = void (*)(void* context, const SingleAnswer& answer);
  virtual void DecideOneDeferred(const Request& request, int64_t now_nanos,
                                 SingleCallback done, void* context) = 0;
  // DecideOneDeferred's answer, waited for (with the blocking hooks).
  virtual SingleAnswer DecideOne(const Request& request, int64_t now_nanos) = 0;
  virtual void InspectDeferred(const Request& request, int64_t now_nanos,
                               SingleCallback done, void* context) = 0;
  virtual void IncrDeferred(std::string_view key, int64_t expiry_nanos,
                            int64_t amount, int64_t now_nanos,
                            SingleCallback done, void* context) = 0;
  // TryClear of `key` under strategies[0..n), in one command, and Ping,
  // deferred as the calls above.
  virtual void ClearDeferred(const Strategy* strategies, size_t n,
                             std::string_view key, SingleCallback done,
                             void* context) = 0;
  virtual void PingDeferred(SingleCallback done, void* context) = 0;

  // TryReset in steps an event loop awaits, deferred as the calls above:
  // ForgetInProcess() first (what TryReset forgets before its scan: the
  // blocked-key cache, the fallback store), then the SCAN pages of this
  // store's keys, every strategy's, from cursor "0" until the answer's
  // cursor is "0" again, each page's keys removed with UnlinkDeferred
  // (one command; `keys` are copied). A SCAN returns a key present from
  // the first page to the last at least once, the others at most once.
  virtual void ForgetInProcess() = 0;
  virtual void ScanDeferred(std::string_view cursor, SingleCallback done,
                            void* context) = 0;
  virtual void UnlinkDeferred(const std::vector<std::string>& keys,
                              SingleCallback done, void* context) = 0;

  // An event loop driving the connection itself, which spares the I/O
  // thread's two wake-ups per batch (and, on a CPU the two threads share,
  // the switches between them). Loop thread only. The loop drives the
  // store's first connection, to which deferred requests go while it is
  // up (the others serve the rest, and stand in while it is down).
  //
  // The loop watches the socket `fd` (through a duplicate it owns: the
  // store may close its own at any time, and shuts the connection down
  // when it does) for readability, calling LoopRead; and calls LoopWatch
  // when it says, so that a reply Redis never sends still meets the
  // timeout.
  // `generation` names the connection: a new one (after a reconnect) has
  // a new socket to watch.
  struct LoopConnection {
    int fd = -1;
    uint64_t generation = 0;
  };
  enum class LoopResult {
    kSent,           // the queue went out from this thread
    kNotIdle,        // not sent: Flush() instead (the I/O thread sends)
    kNewConnection,  // not sent: *connection names the socket to watch now
  };
  // Sends what DecideAsyncDeferred queued when the connection is idle (no
  // command in flight, none being sent) and is `connection->generation`.
  virtual LoopResult LoopFlush(LoopConnection* connection) = 0;
  // Reads the replies available on connection `generation`, completing
  // their requests (callbacks run on this thread). False: stop watching
  // (another connection, none of the loop's commands in flight, or the
  // connection broke).
  virtual bool LoopRead(uint64_t generation) = 0;
  // Fails the commands in flight past their deadline (the connection is
  // replaced). Returns in how many nanoseconds to call again, 0 when
  // nothing is in flight, or -1 to stop watching.
  virtual int64_t LoopWatch(uint64_t generation) = 0;

  // Source of the last Decide on the calling thread (any RedisStore).
  static DecisionSource LastSource();
  // When LastSource() is a failure policy: the error Redis answered for
  // that call (such as WRONGTYPE for a key holding another type of value),
  // or empty when Redis did not answer.
  static const std::string& LastError();
  // When LastSource() is a failure policy: whether it answered because no
  // reply came within the command timeout (a connection that hung, a
  // reconnect or a busy Redis outlasting it), rather than for a connection
  // that is down or an error Redis answered.
  static bool LastTimedOut();
};

// Creates a store and connects to Redis (synchronously, bounded by the
// connect timeout). An unreachable server is not an error: the store
// starts degraded and reconnects in the background. Returns null with
// `error` set for invalid options or a build without hiredis.
std::unique_ptr<RedisStore> NewRedisStore(const RedisStoreOptions& options,
                                          std::string* error);

}  // namespace rapidlimit

#endif  // RAPIDLIMIT_REDIS_STORE_H_
