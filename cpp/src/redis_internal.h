// Internals of the Redis store shared by its source files and its tests.
#ifndef RAPIDLIMIT_SRC_REDIS_INTERNAL_H_
#define RAPIDLIMIT_SRC_REDIS_INTERNAL_H_

#include <netdb.h>

#include <atomic>
#include <charconv>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "rapidlimit/algorithms.h"
#include "rapidlimit/clock.h"
#include "rapidlimit/limit.h"
#include "rapidlimit/redis_store.h"
#include "rapidlimit/store.h"

namespace rapidlimit::redis {

// ------------------------------------------------------------------ RESP

// Appends RESP2 request frames to a string.
class Resp {
 public:
  explicit Resp(std::string* out) : out_(out) {}
  void Array(size_t n) { Header('*', n); }
  void Bulk(std::string_view s) {
    Header('$', s.size());
    out_->append(s);
    out_->append("\r\n", 2);
  }
  // A bulk string announced as `len` bytes; the caller appends exactly
  // that many, then calls EndBulk.
  void BeginBulk(size_t len) { Header('$', len); }
  void EndBulk() { out_->append("\r\n", 2); }
  void Int(int64_t v) {
    char buf[24];
    const auto res = std::to_chars(buf, buf + sizeof(buf), v);
    Bulk(std::string_view(buf, static_cast<size_t>(res.ptr - buf)));
  }

 private:
  void Header(char kind, size_t n) {
    char buf[24];
    buf[0] = kind;
    const auto res = std::to_chars(buf + 1, buf + sizeof(buf) - 2, n);
    char* p = res.ptr;
    *p++ = '\r';
    *p++ = '\n';
    out_->append(buf, static_cast<size_t>(p - buf));
  }
  std::string* out_;
};

// ---------------------------------------------------------------- script

// The Lua script (cpp/src/lua/decide.lua) and its SHA1, embedded at build
// time.
std::string_view ScriptBody();
std::string_view ScriptSha1();

// The script's argument is an array of little-endian doubles.
constexpr int kValuesPerItem = 7;  // per limit, in the argument and reply
// Per request: n (-n in test mode), now_s, now_ns, then n limits, then
// slack_ms.
constexpr int kFixedArgs = 4;

// Appends `v` as a little-endian double (exact for |v| < 2^53).
void AppendDouble(int64_t v, std::string* out);
// Reads `n` little-endian doubles from `data` as integers; false if one is
// not finite.
bool ReadDoubles(const char* data, size_t n, int64_t* out);

// The script's reply is, per request, a flag byte per processed limit
// followed by that limit's state as little-endian doubles: the value the
// script found as it was stored (3 or 4 doubles: creating no string costs
// Redis least) or x1 .. x5 packed. Every request has a limit.
constexpr uint8_t kReplyAllowed = 1;
constexpr uint8_t kReplyFresh = 2;
constexpr uint8_t kReplyLast = 4;  // the request's last processed limit
constexpr uint8_t kReplyKindMask = 24;
constexpr uint8_t kReplyPacked = 0;
constexpr uint8_t kReplyFound3 = 8;
constexpr uint8_t kReplyFound4 = 16;
constexpr uint8_t kReplyNone = 24;  // no values: fresh only
// In place of a request's blocks: Redis refused one of its keys (a value
// of another type, an ACL), or the key holds a string the script did not
// write. Its limit number (from 1) and the message's length follow as
// doubles, then the message. The request wrote nothing.
constexpr uint8_t kReplyError = 32;
// When the call has one request (`alone`) with one limit, a reply of
// exactly 3 or 4 doubles (which no single block is) is its block without
// the flag byte: a fixed window or token bucket allowed on a value found;
// whether that value was fresh follows from `now` (the request's time).
// Reads one request's block at `*pos` of `reply` into `values` (processed,
// then kValuesPerItem per processed limit: allowed, fresh, x1 .. x5) and
// moves `*pos` past it; false if the block is malformed or has more than
// `items` limits. A refused request (kReplyError), or one whose block
// holds numbers no state has (a foreign string of a state's length), reads
// as {0, the index of the limit whose key was refused}, with the message
// in `*error`.
bool ReadReplyBlock(std::string_view reply, size_t* pos, size_t items,
                    int64_t now, bool alone, std::vector<int64_t>* values,
                    std::string* error);

// One limit of a batch, owned by the batch.
struct Item {
  Strategy strategy = Strategy::kFixedWindow;
  bool incr = false;        // limits' Storage.incr on the fixed-window key
  int64_t incr_period = 0;  // its expiry in ns
  Limit limit;              // amount, period and burst only
  int64_t cost = 1;
  std::string key;  // the caller's key (the memory fallback uses it)
};

// Appends the kValuesPerItem argument values of `item` at `now`.
void AppendItemArgs(const Item& item, int64_t now, std::string* out);

// The state a key is left in, for the blocked-key cache.
struct PostState {
  CounterState counter;
  SlidingState sliding;
  int64_t moving_blocker = 0;
};

// The decision for `item` from the script's kValuesPerItem values `v`,
// computed by the memory store's code from the state the script found.
// `*script_allowed` gets the script's own verdict (which was charged).
Decision InterpretDecision(const Item& item, int64_t now, bool charge,
                           const int64_t* v, PostState* post,
                           bool* script_allowed);
// Inspect's answer from a test-mode evaluation of `item`.
WindowState InterpretInspect(const Item& item, int64_t now, const int64_t* v);
// Incr's answer (count and expiry) from a hit-mode incr item.
int64_t InterpretIncr(const Item& item, int64_t now, const int64_t* v,
                      int64_t* expiry_at);

int64_t FloorDivNanos(int64_t a, int64_t b);

// ---------------------------------------------------------------- socket

// Monotonic nanoseconds, for deadlines.
int64_t MonoNanos();

// What a wait of the I/O thread also attends to while it connects:
// requests queued meanwhile must get their answer at their deadline, not
// when the connect ends.
struct WaitHook {
  int fd = -1;                   // readable: call `run` now
  std::function<int64_t()> run;  // returns when to call it next (MonoNanos)
  int64_t next = 0;              // when to call it next
  // Set when `run` returned kCancelWait: the store is closing, and its
  // Close() must not wait for a connect to a server that does not answer.
  bool cancelled = false;
};

// What WaitHook::run returns to end the wait at once: WaitFd then returns
// -1 with errno ECANCELED.
inline constexpr int64_t kCancelWait = -1;

// Connects (non-blocking, TCP_NODELAY) by `options` before `deadline`
// (MonoNanos), the name lookup included, attending to `hook` (if non-null)
// while it waits. Returns the fd, or -1 with `error` set. `in_progress`
// (if non-null) holds the socket while it connects, -1 once it is closed
// (set before closing): a forked child closes its copy of a connect the
// parent had in flight, or Redis would keep that connection open for as
// long as the child lives.
int ConnectSocket(const RedisStoreOptions& options, int64_t deadline,
                  std::string* error, WaitHook* hook = nullptr,
                  std::atomic<int>* in_progress = nullptr);

// The name lookup ConnectSocket uses (getaddrinfo); tests put a resolver
// that does not answer in its place.
using GetAddrInfoFunction = int (*)(const char*, const char*, const addrinfo*,
                                    addrinfo**);
extern std::atomic<GetAddrInfoFunction> g_getaddrinfo;

// Tests only: when set, an I/O thread's successful connect calls it once
// the new connection is published (up and accepting requests), before the
// connect returns, so that a test can act on the connection meanwhile.
extern std::atomic<void (*)()> g_connected_hook;

// Name lookups in flight are shared by every connect to the same host and
// port, in all stores. Around fork() (the store's pthread_atfork
// handlers): the child gets their table whole, without the lookups (their
// threads are the parent's).
void LookupsForkPrepare();
void LookupsForkParent();
void LookupsForkChild();

// Held around every creation of a store's socket or eventfd with the
// publishing of its number, and every withdrawal of a number with the close
// of its file; and across fork() (the store's pthread_atfork handlers).
// Linux copies the file table before the memory, and other threads run on
// in between: without it a child could find a published number that its
// table does not have, or has for another file, and close that. Never held
// while waiting.
std::mutex& FilesMutex();
// Under FilesMutex: closes `*fd` (if >= 0) and sets it to -1.
void CloseFile(int* fd);
// Under FilesMutex: withdraws `fd` from `published` (if non-null), then
// closes it.
void CloseFile(int fd, std::atomic<int>* published);

// Waits until `fd` is ready for `events` (poll) or the deadline passes,
// attending to `hook` (if non-null). Returns >0 ready, 0 timeout, <0
// error.
int WaitFd(int fd, short events, int64_t deadline, WaitHook* hook = nullptr);

}  // namespace rapidlimit::redis

#endif  // RAPIDLIMIT_SRC_REDIS_INTERNAL_H_
