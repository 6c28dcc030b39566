// Types shared by the binding files. Bindings only: no algorithm lives here.
#ifndef RAPIDLIMIT_BINDINGS_HANDLES_H_
#define RAPIDLIMIT_BINDINGS_HANDLES_H_

#include <pybind11/pybind11.h>

#include <iterator>
#include <memory>
#include <string>

#include "rapidlimit/algorithms.h"
#include "rapidlimit/clock.h"
#include "rapidlimit/limit.h"
#include "rapidlimit/store.h"
#include "siphash.h"

namespace rapidlimit::bindings {

namespace py = pybind11;

// A parsed limit plus the key fragments every hit needs, built once.
struct ItemHandle {
  explicit ItemHandle(Limit l) : limit(std::move(l)) {
    key_prefix = limit.namespace_ + "/";
    limit.AppendKeySuffix(&key_suffix);
    prefix_hasher.Update(key_prefix.data(), key_prefix.size());
    suffix_words = internal::SipSuffix(key_suffix.data(), key_suffix.size());
  }
  Limit limit;
  std::string key_prefix;  // "LIMITER/"
  std::string key_suffix;  // "/5/1/minute"
  // The memory store's key hash, having absorbed key_prefix: every key of
  // this item starts with it, so each hit resumes from here.
  internal::SipHasher13 prefix_hasher{internal::ProcessSipKey()};
  // key_suffix, which ends every key with identifiers, ready to hash.
  internal::SipSuffix suffix_words;
};

// Raises RedisUnavailableError: a store kept elsewhere could not reach all
// of its state for `what` (reset, clear, len), which must not pass for a
// whole answer whatever the failure policy of decisions is.
[[noreturn]] void RaiseStoreUnreachable(const char* what);
// That error, made (new reference) rather than raised; null with a Python
// error set.
PyObject* MakeStoreUnreachable(const char* what);

// Base of every Python-visible storage.
struct StorageHandle {
  virtual ~StorageHandle() = default;
  std::shared_ptr<Store> store;
};

struct MemoryStorageHandle : StorageHandle {
  size_t max_keys = 0;
  size_t shards = 0;
};

struct LimiterHandle {
  std::shared_ptr<Store> store;
  py::object storage;  // keeps the Python storage object alive and visible
  Strategy strategy = Strategy::kFixedWindow;
  bool fingerprints = false;  // store->AcceptsFingerprints(), read once
};

// The C++ object behind a pybind11 instance of a bound type, fast: the
// hot path cannot afford pybind11's general caster. `type` must be the
// bound type; instances of Python subclasses are accepted. Returns null
// (with a Python error set) when `obj` is not one or is not initialised.
void* UnwrapSlow(PyObject* obj, PyTypeObject* type, const char* what);
inline void* UnwrapFast(PyObject* obj, PyTypeObject* type, const char* what) {
  // Inline for the usual case, an initialised instance of exactly `type`.
  if (Py_TYPE(obj) == type) {
    auto* inst = reinterpret_cast<py::detail::instance*>(obj);
    if (inst->simple_layout && inst->simple_value_holder[0] != nullptr) {
      return inst->simple_value_holder[0];
    }
  }
  return UnwrapSlow(obj, type, what);
}

// Epoch nanoseconds from `now` in seconds. Returns false with a Python
// error set on a bad value.
bool NowFromSeconds(PyObject* now, int64_t* out);
// Epoch nanoseconds from an optional `now` in seconds (None: system clock).
// Returns false with a Python error set on a bad value. Inline: most calls
// take the system clock, and the call cost half as much as the read.
inline bool NowFromPython(PyObject* now, int64_t* out) {
  if (now == nullptr || now == Py_None) {
    *out = SystemNowNanos();
    return true;
  }
  return NowFromSeconds(now, out);
}

// bool(prefix) for a key prefix, answered without a call for the usual
// str; -1 with a Python error set.
inline int PrefixIsSet(PyObject* prefix) {
  return PyUnicode_CheckExact(prefix) ? PyUnicode_GET_LENGTH(prefix) != 0
                                      : PyObject_IsTrue(prefix);
}

// Appends str(obj) (bytes are decoded as UTF-8, like limits' safe_string).
bool AppendIdentifier(PyObject* obj, std::string* out);

// Writes item.key_for(*ids) into `out` (cleared first).
bool BuildKey(const ItemHandle& item, PyObject* const* ids, size_t n,
              std::string* out);

// Sets r->fingerprint to the memory store's fingerprint of
// item.key_for(*ids), without building the key when the identifiers are
// str, and r->has_fingerprint. False with a Python error set on failure.
bool FingerprintKey(const ItemHandle& item, PyObject* const* ids, size_t n,
                    Request* r);

// A new rapidlimit._core.Decision, or null with a Python error set.
PyObject* MakeDecision(const Decision& d);
// Keyword `name` equals the interned string `interned`.
bool KeywordIs(PyObject* name, PyObject* interned);
// The optional `now=None, test=False` of a vectorcall whose first `fixed`
// arguments are positional: after them by position, or by keyword. False
// with a Python error set (an unknown keyword, a bad `now`).
bool NowAndTestArgs(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
                    Py_ssize_t fixed, int64_t* now, bool* test);
// A cost in [0, kMaxAmount]; false with a Python error set otherwise.
bool CostFromPython(PyObject* obj, int64_t* cost);

// The limits adapter's arguments (bind_storage.cc), throwing
// error_already_set or ValueError: `now` in epoch seconds (None: the
// system clock) as nanoseconds; an `expiry` in seconds checked to lie in
// [at_least, kMaxPeriodSeconds]; a window of `expiry_seconds` whole
// seconds; and a request of `l` (kept by reference) for `key`.
int64_t NowArg(const py::object& now);
void CheckExpiry(double expiry_seconds, int at_least);
Limit WindowLimit(int64_t amount, double expiry_seconds);
Request MakeRequest(Strategy s, const Limit& l, const std::string& key,
                    int64_t cost);

// The limits adapter's reads of a key's state: get, get_expiry,
// get_moving_window, get_sliding_window.
enum class WindowRead : uint8_t {
  kCount,
  kExpiry,
  kMovingWindow,
  kSlidingWindow,
};
// The request `read` makes for `key` (`limit` and `expiry` as limits
// passes them; the fixed window's reads have neither), its window in `*l`.
Request ReadRequest(WindowRead read, const std::string& key, int64_t limit,
                    double expiry, Limit* l);
// The request of an acquire (limits' acquire_entry,
// acquire_sliding_window_entry): `amount` of `limit` per `expiry` seconds
// for `key` under `s`, its window in `*l`; throws error_already_set for a
// limit the strategy refuses.
Request AcquireRequest(Strategy s, const std::string& key, int64_t limit,
                       double expiry, int64_t amount, Limit* l);
// What `read` returns for the state `w`; null with a Python error set.
PyObject* ReadResult(WindowRead read, const WindowState& w);

// `obj` (a new reference) as a py::object; error_already_set when null.
inline py::object Steal(PyObject* obj) {
  if (obj == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(obj);
}

// acquire_entry_stats' answer for the moving-window decision `d` under
// `l`: (allowed, window start, entries in the window, until), times in
// epoch seconds: the middle two are what get_moving_window reads right
// after it, until the oldest entry leaves the window. The count is -1 when
// `d` cannot tell: a refusal with no room left (after a lowered limit a
// window may hold more than it), an empty window (whose start is the
// reading's time), or an answer the store did not decide (fail-open
// invents one).
PyObject* AcquireStats(const Decision& d, const Limit& l);

// True, with RedisUnavailableError set, when `d` was answered by a Redis
// store's fail-closed policy: callers that return decisions raise instead.
bool RaiseIfFailClosed(const Decision& d);

// Sets ValueError for a moving-window limit above kMaxMovingWindowAmount;
// returns false.
bool RaiseMovingWindowTooLarge(const Limit& limit);
// False, with ValueError set, for a limit `strategy` cannot hold. Inline:
// every decision checks, and only the moving window can fail.
inline bool CheckStrategyLimit(Strategy strategy, const Limit& limit) {
  return strategy != Strategy::kMovingWindow ||
         limit.amount <= kMaxMovingWindowAmount ||
         RaiseMovingWindowTooLarge(limit);
}

// RateLimiter.decide_view's parts, for the Redis storage's awaitable
// form. ViewNamesReady: `names` is a HeaderNames made with a view class
// (TypeError otherwise). NewDecisionView: the view for decision `d` of
// `strategy` made at `now_seconds`, or null with a Python error set; takes
// no references.
bool ViewNamesReady(PyObject* names);
PyObject* NewDecisionView(const Decision& d, double now_seconds,
                          Strategy strategy, PyObject* names, PyObject* limit,
                          PyObject* prefix, PyObject* key, PyObject* scope);
// `now` as epoch seconds (a float, or a number) and nanoseconds; None is
// a TypeError. False with a Python error set.
bool ViewNowFromPython(PyObject* now, double* seconds, int64_t* nanos);

// decide_scope's Redis part (bind_redis.cc), for the decorator's usual
// request on a RedisStorage. IsRedisStorage: `storage` (a LimiterHandle's)
// is one, whose decisions are awaited. RunningAsyncioLoop: asyncio's
// running loop, a new reference; null with no Python error set where none
// runs (trio), with one set on any other failure. DecideViewWaiter:
// RedisStorage.decide_view_async(*args) for its 14 arguments (args[5],
// `now`, is not read: the time is `now_seconds` and `now` in nanoseconds),
// queued on `loop` (a reference it takes); the waiter, or null with a
// Python error set. IsRedisWaiter: `obj` is such a waiter.
bool IsRedisStorage(PyObject* storage);
bool IsRedisWaiter(PyObject* obj);
PyObject* RunningAsyncioLoop();
PyObject* DecideViewWaiter(PyObject* storage, PyObject* loop,
                           PyObject* const* args, double now_seconds,
                           int64_t now);

void BindLimit(py::module_& m);
void BindStorage(py::module_& m);
void BindLimiter(py::module_& m);
void BindRedis(py::module_& m);  // after BindLimiter: uses Decision

}  // namespace rapidlimit::bindings

#endif  // RAPIDLIMIT_BINDINGS_HANDLES_H_
