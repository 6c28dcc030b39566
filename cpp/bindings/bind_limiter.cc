// RateLimiter: a strategy bound to a store. hit/test/decide/decide_many are
// raw METH_FASTCALL methods: pybind11's generic dispatch costs more than
// the whole in-memory decision, and these are called once per request.
#include <pybind11/stl.h>
#include <structmember.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "handles.h"
#include "rapidlimit/algorithms.h"
#include "rapidlimit/clock.h"

namespace rapidlimit::bindings {
namespace {

PyTypeObject* g_limiter_type = nullptr;
PyTypeObject* g_item_type = nullptr;
PyTypeObject* g_decision_type = nullptr;
PyObject* g_str_cost = nullptr;
PyObject* g_str_now = nullptr;
PyObject* g_str_test = nullptr;
// The ASGI scope's keys read by decide_scope, and get_remote_address's
// address for a request without a peer.
PyObject* g_str_state = nullptr;
PyObject* g_str_path = nullptr;
PyObject* g_str_client = nullptr;
PyObject* g_str_localhost = nullptr;
PyObject* g_str_raw_headers = nullptr;

PyStructSequence_Field kDecisionFields[] = {
    {"allowed", "whether the request may proceed"},
    {"limit", "the limit's amount"},
    {"remaining", "hits left in the window"},
    {"reset_time", "epoch seconds at which the window resets"},
    {"retry_after", "seconds until a retry can succeed; 0.0 when allowed"},
    {nullptr, nullptr}};

PyStructSequence_Desc kDecisionDesc = {
    "rapidlimit._core.Decision",
    "Everything a response needs about one limit after one request.",
    kDecisionFields, 5};

// CPython's method descriptor has already checked that `self` is a
// RateLimiter (or a subclass) before calling us: only the pointer is read.
LimiterHandle* SelfHandle(PyObject* self) {
  auto* inst = reinterpret_cast<py::detail::instance*>(self);
  void* value = inst->simple_layout ? inst->simple_value_holder[0]
                                    : inst->get_value_and_holder().value_ptr();
  if (value == nullptr) {
    PyErr_SetString(PyExc_TypeError,
                    "RateLimiter was not initialised (missing __init__?)");
  }
  return static_cast<LimiterHandle*>(value);
}

// Whether a METH_FASTCALL call passed exactly `n` positional arguments
// and no keywords; else a TypeError naming `signature` is set.
bool ExactlyPositional(Py_ssize_t nargsf, PyObject* kwnames, Py_ssize_t n,
                       const char* signature) {
  if (PyVectorcall_NARGS(nargsf) == n &&
      (kwnames == nullptr || PyTuple_GET_SIZE(kwnames) == 0)) {
    return true;
  }
  PyErr_Format(PyExc_TypeError, "%s takes exactly %zd positional arguments",
               signature, n);
  return false;
}

// The key's bytes for a store that takes no fingerprints, valid until the
// thread's next call here.
bool SetKeyBytes(const ItemHandle& item, PyObject* const* ids, size_t n,
                 Request* r) {
  thread_local std::string key;
  if (!BuildKey(item, ids, n, &key)) return false;
  r->key = key;
  return true;
}

// The key of one request for item.key_for(*ids): a fingerprint for a
// store that takes them (the memory store: no key string is built), else
// the key's bytes. Always inline: GCC kept it out of line once it hashed,
// and the call and its register saves cost 4% of the hit's instructions.
[[gnu::always_inline]] inline bool SetKey(const LimiterHandle& limiter,
                                          const ItemHandle& item,
                                          PyObject* const* ids, size_t n,
                                          Request* r) {
  if (!limiter.fingerprints) return SetKeyBytes(item, ids, n, r);
  // FingerprintKey's usual case, one ASCII str (its bytes are its UTF-8),
  // here without its call and its loop over identifiers, a twelfth of its
  // cost.
  if (n == 1 && PyUnicode_Check(ids[0]) && PyUnicode_IS_COMPACT_ASCII(ids[0])) {
    internal::SipHasher13 hasher = item.prefix_hasher;
    hasher.Update(PyUnicode_DATA(ids[0]),
                  static_cast<size_t>(PyUnicode_GET_LENGTH(ids[0])));
    const internal::Hash128 h = hasher.FinishWith(item.suffix_words);
    r->fingerprint = KeyFingerprint{h.lo, h.hi};
    r->has_fingerprint = true;
    return true;
  }
  return FingerprintKey(item, ids, n, r);
}

enum class Answer { kHit, kTest, kDecide };

// hit/test/decide(item, *identifiers, cost=1, now=None)
template <Answer kAnswer>
PyObject* DecideSingle(PyObject* self, PyObject* const* args, Py_ssize_t nargsf,
                       PyObject* kwnames) {
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  auto* limiter = SelfHandle(self);
  if (limiter == nullptr) return nullptr;
  if (nargs < 1) {
    PyErr_SetString(PyExc_TypeError, "missing required argument 'item'");
    return nullptr;
  }
  auto* item = static_cast<ItemHandle*>(
      UnwrapFast(args[0], g_item_type, "RateLimitItem"));
  if (item == nullptr) return nullptr;
  int64_t cost = 1;
  PyObject* now_obj = nullptr;
  if (kwnames != nullptr) {
    const Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < nkw; ++i) {
      PyObject* name = PyTuple_GET_ITEM(kwnames, i);
      PyObject* value = args[nargs + i];
      if (KeywordIs(name, g_str_cost)) {
        if (!CostFromPython(value, &cost)) return nullptr;
      } else if (KeywordIs(name, g_str_now)) {
        now_obj = value;
      } else {
        PyErr_Format(PyExc_TypeError, "unexpected keyword argument '%U'", name);
        return nullptr;
      }
    }
  }
  Request r;
  if (!SetKey(*limiter, *item, args + 1, static_cast<size_t>(nargs - 1), &r)) {
    return nullptr;
  }
  int64_t now = 0;
  if (!NowFromPython(now_obj, &now)) return nullptr;
  if (!CheckStrategyLimit(limiter->strategy, item->limit)) return nullptr;
  r.strategy = limiter->strategy;
  r.limit = &item->limit;
  r.cost = cost;
  Decision d;
  limiter->store->Decide(
      &r, 1, now, kAnswer == Answer::kTest ? Mode::kTest : Mode::kHit, &d);
  if constexpr (kAnswer == Answer::kDecide) {
    if (RaiseIfFailClosed(d)) return nullptr;
    return MakeDecision(d);
  } else {
    // Not PyBool_FromLong: a call into libpython for one reference.
    PyObject* result = d.allowed ? Py_True : Py_False;
    Py_INCREF(result);
    return result;
  }
}

// decide_many(requests, now=None, test=False)
PyObject* DecideMany(PyObject* self, PyObject* const* args, Py_ssize_t nargsf,
                     PyObject* kwnames) {
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  auto* limiter = SelfHandle(self);
  if (limiter == nullptr) return nullptr;
  if (nargs < 1 || nargs > 3) {
    PyErr_SetString(PyExc_TypeError,
                    "decide_many(requests, now=None, test=False)");
    return nullptr;
  }
  bool test = false;
  int64_t now = 0;
  if (!NowAndTestArgs(args, nargs, kwnames, 1, &now, &test)) return nullptr;

  PyObject* seq = PySequence_Fast(args[0], "requests must be a sequence");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** entries = PySequence_Fast_ITEMS(seq);
  // Reused per thread: a request allocates nothing once warm.
  thread_local std::vector<std::string> keys;
  thread_local std::vector<Request> requests;
  thread_local std::vector<Decision> decisions;
  if (keys.size() < static_cast<size_t>(n)) keys.resize(n);
  requests.resize(n);
  decisions.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* entry = entries[i];
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3) {
      Py_DECREF(seq);
      PyErr_SetString(PyExc_TypeError,
                      "each request must be a tuple (item, identity, cost)");
      return nullptr;
    }
    auto* item = static_cast<ItemHandle*>(
        UnwrapFast(PyTuple_GET_ITEM(entry, 0), g_item_type, "RateLimitItem"));
    int64_t cost = 0;
    PyObject* identity = PyTuple_GET_ITEM(entry, 1);
    Request& r = requests[i];
    r = Request{};
    if (item == nullptr || !CostFromPython(PyTuple_GET_ITEM(entry, 2), &cost)) {
      Py_DECREF(seq);
      return nullptr;
    }
    if (limiter->fingerprints) {
      if (!FingerprintKey(*item, &identity, 1, &r)) {
        Py_DECREF(seq);
        return nullptr;
      }
    } else {
      if (!BuildKey(*item, &identity, 1, &keys[i])) {
        Py_DECREF(seq);
        return nullptr;
      }
      r.key = keys[i];
    }
    if (!CheckStrategyLimit(limiter->strategy, item->limit)) {
      Py_DECREF(seq);
      return nullptr;
    }
    r.strategy = limiter->strategy;
    r.limit = &item->limit;
    r.cost = cost;
  }
  const size_t first_reject =
      limiter->store->Decide(requests.data(), static_cast<size_t>(n), now,
                             test ? Mode::kTest : Mode::kHit, decisions.data());
  Py_DECREF(seq);
  const size_t written = (!test && first_reject < static_cast<size_t>(n))
                             ? first_reject + 1
                             : static_cast<size_t>(n);
  if (written > 0 && RaiseIfFailClosed(decisions[written - 1])) return nullptr;
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(written));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < written; ++i) {
    PyObject* d = MakeDecision(decisions[i]);
    if (d == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), d);
  }
  return out;
}

// ------------------------------------------------------ decide_headers

// Ready objects for the values [0, kCached), shared by every HeaderNames:
// b"<v>" and int v (CPython itself only keeps the ints up to 256).
constexpr int64_t kCached = 1024;
PyObject* g_value_bytes[kCached] = {};
PyObject* g_value_ints[kCached] = {};
PyObject* g_zero_float = nullptr;  // retry_after of every allowed decision
// Bumped by each BindLimiter: a thread cache filled by an earlier
// interpreter (embedders may finalise and start again) is forgotten.
uint64_t g_generation = 0;

// The four rate-limit header names of a Limiter, with ready (name, value)
// pairs for the values below kCached: most responses only take references.
// Built whole at construction and never changed, so any thread may read it.
struct HeaderNamesHandle {
  enum Field { kLimit, kRemaining, kReset, kRetryAfter, kFields };
  py::object names[kFields];
  py::object pairs[kFields][kCached];  // kReset has none: it is an epoch
  // decide_view's class and the offset of its `_data` slot; null when
  // HeaderNames was made without one.
  py::object view_type;
  Py_ssize_t view_data_offset = 0;
};

PyTypeObject* g_names_type = nullptr;

// The last objects made for values beyond the tables: consecutive
// requests share their limit and, per client, their window's reset (and a
// rejected client its Retry-After). Trivial, so reading it needs no guard;
// the few objects it holds are never released. With a GIL one cache is
// enough (and cheaper than thread-local storage): only one thread runs
// here at a time and each lookup takes its reference before anything that
// could let another thread in. Free-threaded builds keep one per thread.
struct ObjectCache {
  uint64_t generation;
  PyObject* pair[HeaderNamesHandle::kFields];  // strong; holds its name
  int64_t pair_value[HeaderNamesHandle::kFields];
  PyObject* limit;  // strong int
  int64_t limit_value;
  PyObject* reset_time;  // strong float
  int64_t reset_nanos;
};
#ifdef Py_GIL_DISABLED
thread_local ObjectCache g_cache;
#else
ObjectCache g_cache;
#endif

ObjectCache& Cache() {
  ObjectCache& c = g_cache;
  if (c.generation != g_generation) {
    c = ObjectCache{};  // the old objects belonged to a finished interpreter
    c.generation = g_generation;
  }
  return c;
}

// Stores `obj` (a new strong reference) for `key` in a slot of the object
// cache. The old object is released last: until then the cache is
// consistent, whatever its release lets run.
void Keep(PyObject** slot, int64_t* slot_key, PyObject* obj, int64_t key) {
  PyObject* old = *slot;
  Py_INCREF(obj);
  *slot = obj;
  *slot_key = key;
  Py_XDECREF(old);
}

// "00" to "99".
constexpr char kDigitPairs[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536"
    "37383940414243444546474849505152535455565758596061626364656667686970717273"
    "7475767778798081828384858687888990919293949596979899";

// b"<value>" as a new bytes object. Digits by hand, two at a time:
// snprintf cost more than the whole decision.
PyObject* NewDecimal(int64_t value) {
  char digits[24];
  char* end = digits + sizeof(digits);
  char* p = end;
  uint64_t magnitude = value < 0 ? 0 - static_cast<uint64_t>(value)
                                 : static_cast<uint64_t>(value);
  while (magnitude >= 100) {
    const uint64_t pair = magnitude % 100;
    magnitude /= 100;
    p -= 2;
    std::memcpy(p, kDigitPairs + 2 * pair, 2);
  }
  if (magnitude >= 10) {
    p -= 2;
    std::memcpy(p, kDigitPairs + 2 * magnitude, 2);
  } else {
    *--p = static_cast<char>('0' + magnitude);
  }
  if (value < 0) *--p = '-';
  return PyBytes_FromStringAndSize(p, end - p);
}

// A new reference to the pair (names[field], b"<value>").
PyObject* NewPair(const HeaderNamesHandle& h, ObjectCache& cache, int field,
                  int64_t value) {
  if (value >= 0 && value < kCached && field != HeaderNamesHandle::kReset) {
    PyObject* pair = h.pairs[field][value].ptr();
    Py_INCREF(pair);
    return pair;
  }
  PyObject* name = h.names[field].ptr();
  // The cached pair holds its name, so a name seen here cannot have been
  // freed and its address reused by another name.
  PyObject* last = cache.pair[field];
  if (last != nullptr && cache.pair_value[field] == value &&
      PyTuple_GET_ITEM(last, 0) == name) {
    Py_INCREF(last);
    return last;
  }
  PyObject* bytes = NewDecimal(value);
  if (bytes == nullptr) return nullptr;
  PyObject* pair = PyTuple_New(2);
  if (pair == nullptr) {
    Py_DECREF(bytes);
    return nullptr;
  }
  Py_INCREF(name);
  PyTuple_SET_ITEM(pair, 0, name);
  PyTuple_SET_ITEM(pair, 1, bytes);
  Keep(&cache.pair[field], &cache.pair_value[field], pair, value);
  return pair;
}

// A new reference to int(value).
PyObject* NewInt(int64_t value) {
  if (value >= 0 && value < kCached) {
    PyObject* obj = g_value_ints[value];
    Py_INCREF(obj);
    return obj;
  }
  return PyLong_FromLongLong(value);
}

// retry_after in seconds, as Decision carries it.
PyObject* NewRetryAfter(int64_t nanos) {
  if (nanos == 0) {
    Py_INCREF(g_zero_float);
    return g_zero_float;
  }
  return PyFloat_FromDouble(static_cast<double>(nanos) / kNanosPerSecond);
}

// Python's int(x) for the header values: truncation toward zero, clamped
// (a reset time is at most ~1e10, so the clamp never applies in practice).
int64_t Truncate(double x) {
  if (!(x > -9.0e18)) return x != x ? 0 : INT64_MIN;
  if (x >= 9.0e18) return INT64_MAX;
  return static_cast<int64_t>(x);
}

// The int of a decision's limit: one item's amount, so usually the last.
PyObject* NewLimit(ObjectCache& cache, int64_t value) {
  if (value < kCached) return NewInt(value);
  if (cache.limit != nullptr && cache.limit_value == value) {
    Py_INCREF(cache.limit);
    return cache.limit;
  }
  PyObject* obj = PyLong_FromLongLong(value);
  if (obj == nullptr) return nullptr;
  Keep(&cache.limit, &cache.limit_value, obj, value);
  return obj;
}

bool NowFromTimeModule(double* seconds, int64_t* nanos);

// Fills the 6 slots of decide_headers' result `out` (a new tuple) for a
// decision of `strategy`; false with a Python error set (and some slots
// left empty) on failure.
bool FillResult(const Decision& d, double now_seconds, Strategy strategy,
                const HeaderNamesHandle& names, PyObject* out) {
  ObjectCache& cache = Cache();
  PyObject* allowed = d.allowed ? Py_True : Py_False;
  Py_INCREF(allowed);
  PyTuple_SET_ITEM(out, 0, allowed);
  PyObject* limit = NewLimit(cache, d.limit);
  if (limit == nullptr) return false;
  PyTuple_SET_ITEM(out, 1, limit);
  PyObject* remaining = NewInt(d.remaining);
  if (remaining == nullptr) return false;
  PyTuple_SET_ITEM(out, 2, remaining);
  // The reset time: the same window's for consecutive requests.
  double reset_time;
  PyObject* reset_obj = cache.reset_time;
  if (reset_obj != nullptr && cache.reset_nanos == d.reset_nanos) {
    reset_time = PyFloat_AS_DOUBLE(reset_obj);
    Py_INCREF(reset_obj);
  } else {
    reset_time = NanosToSeconds(d.reset_nanos);
    reset_obj = PyFloat_FromDouble(reset_time);
    if (reset_obj == nullptr) return false;
    Keep(&cache.reset_time, &cache.reset_nanos, reset_obj, d.reset_nanos);
  }
  PyTuple_SET_ITEM(out, 3, reset_obj);
  PyObject* retry_after = NewRetryAfter(d.retry_after_nanos);
  if (retry_after == nullptr) return false;
  PyTuple_SET_ITEM(out, 4, retry_after);

  // A tuple, not a list: one allocation less per request (they are read,
  // copied or appended to a response's headers, never changed).
  PyObject* headers = PyTuple_New(HeaderNamesHandle::kFields);
  if (headers == nullptr) return false;
  PyTuple_SET_ITEM(out, 5, headers);
  // int(1 + reset_time) and int(1 + reset_time - now), in doubles.
  const double reset_in = 1.0 + reset_time;
  double retry_in = reset_in - now_seconds;
  // A token bucket's reset is when it is full again, long after it has
  // room for the refused cost: a client that obeys Retry-After should come
  // back then, not after a whole period. The same formula, from that time.
  const bool to_room = !d.allowed && strategy == Strategy::kTokenBucket;
  if (to_room) {
    // The decision's retry_after as Python reads it (NewRetryAfter).
    retry_in = 1.0 + static_cast<double>(d.retry_after_nanos) / kNanosPerSecond;
  }
  // slowapi reads the clock again for Retry-After, after the hit: on a
  // request that opens a window (the reset a whole period away) the real
  // clock has moved on and the whole seconds are one fewer (60, not 61),
  // while a frozen clock gives the same reading (61). So does time.time()
  // read again here, only then (elsewhere a microsecond changes nothing)
  // and only when `now` was that clock's reading (not a caller's own time).
  if (std::fabs(retry_in - std::nearbyint(retry_in)) < 1e-6) {
    double later;
    int64_t later_nanos;
    if (!NowFromTimeModule(&later, &later_nanos)) {
      PyErr_Clear();  // a broken replacement clock: the request's time
    } else if (later >= now_seconds && later - now_seconds < 0.5) {
      retry_in = to_room ? retry_in - (later - now_seconds) : reset_in - later;
    }
  }
  const int64_t values[HeaderNamesHandle::kFields] = {
      d.limit, d.remaining, Truncate(reset_in), Truncate(retry_in)};
  for (int field = 0; field < HeaderNamesHandle::kFields; ++field) {
    PyObject* pair = NewPair(names, cache, field, values[field]);
    if (pair == nullptr) return false;
    PyTuple_SET_ITEM(headers, field, pair);
  }
  return true;
}

}  // namespace

bool ViewNowFromPython(PyObject* now_obj, double* seconds, int64_t* nanos) {
  // The header formulas use the caller's float, as Python would; `now` is
  // required (None is a TypeError here, not the system clock).
  if (PyFloat_CheckExact(now_obj)) {
    *seconds = PyFloat_AS_DOUBLE(now_obj);
    // NowFromPython's check and conversion, without reading it again.
    if (!std::isfinite(*seconds) || std::fabs(*seconds) > 9.0e9) {
      PyErr_SetString(PyExc_ValueError, "now must be finite epoch seconds");
      return false;
    }
    *nanos = SecondsToNanos(*seconds);
    return true;
  }
  *seconds = PyFloat_AsDouble(now_obj);
  if (*seconds == -1.0 && PyErr_Occurred()) return false;
  return NowFromPython(now_obj, nanos);
}

namespace {

// time.time as the module holds it now, and the builtin it was at import:
// the clock is read here while nobody has replaced it (freezegun...).
PyObject* g_time_dict = nullptr;
PyObject* g_time_time = nullptr;
PyObject* g_str_time = nullptr;

// time.time(): epoch seconds as Python computes them, and nanoseconds as
// decide_view derives them from those seconds. Calls a replaced time.time.
bool NowFromTimeModule(double* seconds, int64_t* nanos) {
#if PY_VERSION_HEX < 0x030C0000
  // A dict's version tag changes with every write to it: while the time
  // module's keeps the one it had when time.time was last seen to be the
  // builtin, it still is, without the lookup (a tenth of the decision).
  static uint64_t builtin_seen_at = 0;
  const uint64_t version =
      reinterpret_cast<PyDictObject*>(g_time_dict)->ma_version_tag;
  PyObject* func = version == builtin_seen_at
                       ? g_time_time
                       : PyDict_GetItemWithError(g_time_dict, g_str_time);
  if (func == g_time_time) builtin_seen_at = version;
#else
  PyObject* func = PyDict_GetItemWithError(g_time_dict, g_str_time);
#endif
  if (func == g_time_time) {
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    const int64_t t = static_cast<int64_t>(ts.tv_sec) * kNanosPerSecond +
                      static_cast<int64_t>(ts.tv_nsec);
    // _PyTime_AsSecondsDouble's rounding, for the same float: the
    // conversion to double rounded before the division (volatile, as
    // there).
    volatile double d;
    if (t % kNanosPerSecond == 0) {
      d = static_cast<double>(t / kNanosPerSecond);
    } else {
      d = static_cast<double>(t);
      d = d / 1e9;
    }
    *seconds = d;
    *nanos = SecondsToNanos(*seconds);
    return true;
  }
  if (func == nullptr) {
    if (!PyErr_Occurred()) {
      PyErr_SetString(PyExc_AttributeError,
                      "module 'time' has no attribute 'time'");
    }
    return false;
  }
  Py_INCREF(func);
  PyObject* now = PyObject_CallNoArgs(func);
  Py_DECREF(func);
  if (now == nullptr) return false;
  const bool ok = ViewNowFromPython(now, seconds, nanos);
  Py_DECREF(now);
  return ok;
}

// decide_headers' work for the key of `ids`: the result tuple, or null with
// a Python error set. `now_obj` null: time.time() (NowFromTimeModule).
PyObject* DecideWithHeaders(LimiterHandle* limiter, PyObject* item_obj,
                            PyObject* const* ids, size_t n_ids,
                            PyObject* cost_obj, PyObject* now_obj,
                            const HeaderNamesHandle& names) {
  auto* item = static_cast<ItemHandle*>(
      UnwrapFast(item_obj, g_item_type, "RateLimitItem"));
  if (item == nullptr) return nullptr;
  int64_t cost = 0;
  if (!CostFromPython(cost_obj, &cost)) return nullptr;
  double now_seconds;
  int64_t now = 0;
  if (now_obj == nullptr ? !NowFromTimeModule(&now_seconds, &now)
                         : !ViewNowFromPython(now_obj, &now_seconds, &now)) {
    return nullptr;
  }
  Request r;
  if (!SetKey(*limiter, *item, ids, n_ids, &r)) return nullptr;
  if (!CheckStrategyLimit(limiter->strategy, item->limit)) return nullptr;
  r.strategy = limiter->strategy;
  r.limit = &item->limit;
  r.cost = cost;
  Decision d;
  limiter->store->Decide(&r, 1, now, Mode::kHit, &d);
  if (RaiseIfFailClosed(d)) return nullptr;

  PyObject* out = PyTuple_New(6);
  if (out == nullptr) return nullptr;
  if (!FillResult(d, now_seconds, r.strategy, names, out)) {
    Py_DECREF(out);  // empty slots are fine: tuples and lists skip them
    return nullptr;
  }
  return out;
}

// decide_headers(item, identity, cost, now, names)
//   -> (allowed, limit, remaining, reset_time, retry_after, headers)
PyObject* DecideHeaders(PyObject* self, PyObject* const* args,
                        Py_ssize_t nargsf, PyObject* kwnames) {
  if (!ExactlyPositional(nargsf, kwnames, 5,
                         "decide_headers(item, identity, cost, now, names)"))
    return nullptr;
  auto* limiter = SelfHandle(self);
  if (limiter == nullptr) return nullptr;
  auto* names = static_cast<HeaderNamesHandle*>(
      UnwrapFast(args[4], g_names_type, "HeaderNames"));
  if (names == nullptr) return nullptr;
  return DecideWithHeaders(limiter, args[0], args + 1, 1, args[2], args[3],
                           *names);
}

// A new instance of names' view class whose `_data` slot holds (limit,
// prefix, key, scope, result); takes the reference to `result`. Null with
// a Python error set.
PyObject* MakeView(const HeaderNamesHandle& names, PyObject* result,
                   PyObject* limit, PyObject* prefix, PyObject* key,
                   PyObject* scope) {
  PyObject* data = PyTuple_New(5);
  if (data == nullptr) {
    Py_DECREF(result);
    return nullptr;
  }
  PyObject* const parts[4] = {limit, prefix, key, scope};
  for (int i = 0; i < 4; ++i) {
    Py_INCREF(parts[i]);
    PyTuple_SET_ITEM(data, i, parts[i]);
  }
  PyTuple_SET_ITEM(data, 4, result);
  auto* type = reinterpret_cast<PyTypeObject*>(names.view_type.ptr());
  PyObject* view = type->tp_alloc(type, 0);
  if (view == nullptr) {
    Py_DECREF(data);
    return nullptr;
  }
  // The slot of a fresh object is empty: it takes our reference.
  *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(view) +
                                names.view_data_offset) = data;
  return view;
}

// The HeaderNames of `obj` when it has a view class; null with TypeError
// set otherwise.
const HeaderNamesHandle* ViewNames(PyObject* obj, const char* caller) {
  auto* names = static_cast<HeaderNamesHandle*>(
      UnwrapFast(obj, g_names_type, "HeaderNames"));
  if (names == nullptr) return nullptr;
  if (!names->view_type) {
    PyErr_Format(PyExc_TypeError, "%s needs HeaderNames made with a view class",
                 caller);
    return nullptr;
  }
  return names;
}

// decide_view(item, key, scope, cost, now, names, limit, prefix) -> view
//
// decide_headers for the identity "prefix/key/scope" ("key/scope" when
// prefix is empty), returned inside a new instance of names' view class
// whose `_data` slot holds (limit, prefix, key, scope, result): the
// decorator's per-request object, made here because building it in Python
// cost more than the decision.
PyObject* DecideView(PyObject* self, PyObject* const* args, Py_ssize_t nargsf,
                     PyObject* kwnames) {
  if (!ExactlyPositional(
          nargsf, kwnames, 8,
          "decide_view(item, key, scope, cost, now, names, limit, prefix)"))
    return nullptr;
  auto* limiter = SelfHandle(self);
  if (limiter == nullptr) return nullptr;
  const HeaderNamesHandle* names = ViewNames(args[5], "decide_view");
  if (names == nullptr) return nullptr;
  PyObject* key = args[1];
  PyObject* scope = args[2];
  PyObject* prefix = args[7];
  const int has_prefix = PrefixIsSet(prefix);
  if (has_prefix < 0) return nullptr;
  PyObject* const with_prefix[3] = {prefix, key, scope};
  PyObject* const result =
      has_prefix ? DecideWithHeaders(limiter, args[0], with_prefix, 3, args[3],
                                     args[4], *names)
                 : DecideWithHeaders(limiter, args[0], with_prefix + 1, 2,
                                     args[3], args[4], *names);
  if (result == nullptr) return nullptr;
  return MakeView(*names, result, args[6], prefix, key, scope);
}

// decide_scope's `spec`, built once per route (Limiter._fast_spec): the
// route's limit, the state keys, and the limiter's settings whose change
// empties the route's slot, so none is read per request.
enum SpecField : Py_ssize_t {
  kSpecPlan,
  kSpecLimit,
  kSpecItem,
  kSpecCost,
  kSpecNames,
  kSpecScopeName,
  kSpecEndpointName,
  kSpecDoneKey,
  kSpecByKey,
  kSpecViewKey,
  kSpecCore,
  kSpecPrefix,
  kSpecBy,
  kSpecFilters,
  kSpecResponseType,
  kSpecMergeNames,
  kSpecHeaders,
  kSpecFused,
  kSpecMergeFallback,
  kSpecSend,
  kSpecFields
};

// The middleware's send wrapper's `spec` (Limiter._send_spec), shared by
// every request of a limiter: what adds the headers when the response
// starts.
enum SendField : Py_ssize_t {
  kSendNames,       // HeaderNames, with the view class
  kSendViewKey,     // the state's key of the request's view
  kSendMergeNames,  // set: a response header of these names is merged
  kSendFused,       // True: the core's formatted Retry-After applies
  kSendFallback,    // callable(message, view): every other case
  kSendMarkKey,     // state[mark_key] = mark_value: the middleware adds
  kSendMarkValue,   //   the headers (the decorator then leaves them)
  kSendFields
};

// decide_scope(scope, spec[, conn]) -> view | False | RedisWaiter | None
//
// The decorator's whole check of one simple limit keyed by the peer's
// address (get_remote_address), from the ASGI scope: what the wrapper did
// in Python in about as many instructions as the decision. `spec` is
// Limiter._fast_spec's tuple (SpecField); scope_name is the limit's static
// scope or None, endpoint_name None to key by the request path. Reads
// time.time, marks scope["state"] (made if missing) as checked by `by`
// (done_key: True, by_key: by), decides, stores the view under view_key
// and returns it when the request is allowed, False when it is rejected.
// Returns None, having changed nothing else, whenever anything is unusual
// (a state that is not a dict, a request checked already, an empty path,
// a peer that is not a str, request filters, a `core` that is not a
// RateLimiter): the caller's general path then handles the request.
// Errors of the decision itself are raised after the state was marked, as
// the general path would have it.
//
// On a RedisStorage the decision is awaited: given the request `conn`
// (decide_scope's third argument) and a running asyncio loop, the check is
// RedisStorage.decide_view_async's with its five extra arguments (state,
// view_key, by, conn, plan) and its waiter is returned, which resolves to
// the view of an allowed request and otherwise to what by's
// _finish_endpoint makes of it. Without `conn` or `mw` (mw_decide), or
// without an asyncio loop (trio), None.
//
// mw_route's Redis decision (`mw`): the waiter's conn is (scope, receive,
// send), made only then, and mw->finisher stands in for `by` as the object
// whose _finish_endpoint(view, exc, conn, plan) ends a check the waiter did
// not allow (the middleware has no Request to give).
struct MwParts {
  PyObject* receive;
  PyObject* send;
  PyObject* finisher;
};

PyObject* DecideScopeFor(PyObject* scope, PyObject* spec,
                         PyObject* conn = nullptr,
                         const MwParts* mw = nullptr) {
  if (!PyDict_CheckExact(scope) || !PyTuple_CheckExact(spec) ||
      PyTuple_GET_SIZE(spec) != kSpecFields) {
    Py_RETURN_NONE;
  }
  PyObject* const core = PyTuple_GET_ITEM(spec, kSpecCore);
  PyObject* const filters = PyTuple_GET_ITEM(spec, kSpecFilters);
  if (!PyObject_TypeCheck(core, g_limiter_type) ||
      !PyList_CheckExact(filters) || PyList_GET_SIZE(filters) != 0) {
    Py_RETURN_NONE;
  }
  PyObject* const limit = PyTuple_GET_ITEM(spec, kSpecLimit);
  PyObject* const item = PyTuple_GET_ITEM(spec, kSpecItem);
  PyObject* const cost = PyTuple_GET_ITEM(spec, kSpecCost);
  PyObject* const names_obj = PyTuple_GET_ITEM(spec, kSpecNames);
  PyObject* const scope_name = PyTuple_GET_ITEM(spec, kSpecScopeName);
  PyObject* const endpoint_name = PyTuple_GET_ITEM(spec, kSpecEndpointName);
  PyObject* const done_key = PyTuple_GET_ITEM(spec, kSpecDoneKey);
  PyObject* const by_key = PyTuple_GET_ITEM(spec, kSpecByKey);
  PyObject* const view_key = PyTuple_GET_ITEM(spec, kSpecViewKey);
  PyObject* const prefix = PyTuple_GET_ITEM(spec, kSpecPrefix);
  PyObject* const by = PyTuple_GET_ITEM(spec, kSpecBy);
  if (Py_TYPE(names_obj) != g_names_type) Py_RETURN_NONE;
  auto* names = static_cast<HeaderNamesHandle*>(
      UnwrapFast(names_obj, g_names_type, "HeaderNames"));
  if (names == nullptr) return nullptr;
  if (!names->view_type) Py_RETURN_NONE;

  // Everything that could send the request to the general path first:
  // nothing is written until the decision is certain to be made here.
  PyObject* state = PyDict_GetItemWithError(scope, g_str_state);
  if (state == nullptr) {
    if (PyErr_Occurred()) return nullptr;
    // As the general path would: scope["state"] = {} (some clients, such
    // as httpx's ASGITransport, send none).
    PyObject* fresh = PyDict_New();
    if (fresh == nullptr) return nullptr;
    const int rc = PyDict_SetItem(scope, g_str_state, fresh);
    Py_DECREF(fresh);  // the scope holds it
    if (rc != 0) return nullptr;
    state = fresh;
  } else if (!PyDict_CheckExact(state)) {
    Py_RETURN_NONE;
  }
  PyObject* endpoint_key = endpoint_name;
  if (endpoint_key == Py_None) {
    endpoint_key = PyDict_GetItemWithError(scope, g_str_path);
    if (endpoint_key == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NONE;
    }
    if (!PyUnicode_CheckExact(endpoint_key) ||
        PyUnicode_GET_LENGTH(endpoint_key) == 0) {
      Py_RETURN_NONE;
    }
  }
  // (scope.get("client") or ("",))[0] or "127.0.0.1"
  PyObject* key = g_str_localhost;
  PyObject* const client = PyDict_GetItemWithError(scope, g_str_client);
  if (client == nullptr) {
    if (PyErr_Occurred()) return nullptr;
  } else if (PyTuple_CheckExact(client)) {
    if (PyTuple_GET_SIZE(client) > 0) {
      PyObject* const host = PyTuple_GET_ITEM(client, 0);
      if (PyUnicode_CheckExact(host)) {
        if (PyUnicode_GET_LENGTH(host) > 0) key = host;
      } else if (host != Py_None) {
        Py_RETURN_NONE;  // keyed as f"{host}": the general path's business
      }
    }
  } else if (client != Py_None) {
    Py_RETURN_NONE;
  }
  PyObject* const name = scope_name == Py_None ? endpoint_key : scope_name;
  const int has_prefix = PrefixIsSet(prefix);
  if (has_prefix < 0) return nullptr;
  auto* limiter = SelfHandle(core);
  if (limiter == nullptr) return nullptr;
  PyObject* loop = nullptr;  // a RedisStorage's: the loop that awaits
  if (IsRedisStorage(limiter->storage.ptr())) {
    if (conn == nullptr && mw == nullptr) Py_RETURN_NONE;
    loop = RunningAsyncioLoop();
    if (loop == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NONE;
    }
  }

  // References of our own: the writes below may run arbitrary code
  // (__eq__ of a key already in the state) that could drop the scope's.
  Py_INCREF(state);
  Py_INCREF(key);
  Py_INCREF(name);
  PyObject* view = nullptr;
  PyObject* allowed = nullptr;
  // state.setdefault(done_key, True): one lookup both tests whether the
  // request was checked already (then the state keeps its size and nothing
  // was written) and marks it.
  const Py_ssize_t size = PyDict_GET_SIZE(state);
  PyObject* const marked = PyDict_SetDefault(state, done_key, Py_True);
  const bool checked_before =
      marked != nullptr && PyDict_GET_SIZE(state) == size;
  const bool awaited = loop != nullptr;
  PyObject* waiter = nullptr;  // awaited: the decision's RedisWaiter
  if (marked != nullptr && !checked_before &&
      PyDict_SetItem(state, by_key, by) == 0) {
    double now_seconds;
    int64_t now;
    if (!awaited) {
      PyObject* const with_prefix[3] = {prefix, key, name};
      PyObject* const result =
          has_prefix ? DecideWithHeaders(limiter, item, with_prefix, 3, cost,
                                         nullptr, *names)
                     : DecideWithHeaders(limiter, item, with_prefix + 1, 2,
                                         cost, nullptr, *names);
      if (result != nullptr) {
        allowed = PyTuple_GET_ITEM(result, 0);
        view = MakeView(*names, result, limit, prefix, key, name);
        if (view != nullptr && PyDict_SetItem(state, view_key, view) != 0) {
          Py_CLEAR(view);
        }
      }
    } else if (NowFromTimeModule(&now_seconds, &now)) {
      PyObject* const parts =
          mw != nullptr ? PyTuple_Pack(3, scope, mw->receive, mw->send)
                        : nullptr;
      if (mw == nullptr || parts != nullptr) {
        PyObject* const finisher = mw != nullptr ? mw->finisher : by;
        PyObject* const request = mw != nullptr ? parts : conn;
        PyObject* const plan = PyTuple_GET_ITEM(spec, kSpecPlan);
        // decide_view_async's arguments; `now` (None) is read above.
        PyObject* const args[14] = {core,     item,      key,     name,   cost,
                                    Py_None,  names_obj, limit,   prefix, state,
                                    view_key, finisher,  request, plan};
        waiter = DecideViewWaiter(limiter->storage.ptr(), loop, args,
                                  now_seconds, now);
        loop = nullptr;  // DecideViewWaiter took it
        Py_XDECREF(parts);
      }
    }
  }
  Py_XDECREF(loop);
  Py_DECREF(name);
  Py_DECREF(key);
  Py_DECREF(state);
  if (checked_before) Py_RETURN_NONE;
  if (awaited) return waiter;
  if (view != nullptr && allowed != Py_True) {
    // The state holds the view: the caller's rejection path reads it there.
    Py_DECREF(view);
    Py_RETURN_FALSE;
  }
  return view;
}

PyObject* DecideScope(PyObject* /*module*/, PyObject* const* args,
                      Py_ssize_t nargsf, PyObject* kwnames) {
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if ((nargs != 2 && nargs != 3) ||
      (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_SetString(PyExc_TypeError,
                    "decide_scope(scope, spec[, conn]) takes 2 or 3 "
                    "positional arguments");
    return nullptr;
  }
  return DecideScopeFor(args[0], args[1], nargs == 3 ? args[2] : nullptr);
}

// HeaderSend(send, state, spec): the middleware's `send`, adding the
// rate-limit headers of state[view_key] to the response's start message
// (spec: SendField). A C callable rather than a Python closure: it runs
// for every message of every response, and as Python it cost more than
// the decision.
struct HeaderSendObject {
  PyObject ob_base;  // PyObject_HEAD
  vectorcallfunc vectorcall;
  PyObject* send;
  PyObject* state;
  PyObject* spec;
};

PyTypeObject* g_header_send_type = nullptr;
PyObject* g_str_type = nullptr;
PyObject* g_str_headers = nullptr;
constexpr char kResponseStart[] = "http.response.start";

bool IsResponseStart(PyObject* type) {
  constexpr Py_ssize_t kLength = sizeof(kResponseStart) - 1;
  return PyUnicode_CheckExact(type) && PyUnicode_IS_COMPACT_ASCII(type) &&
         PyUnicode_GET_LENGTH(type) == kLength &&
         std::memcmp(PyUnicode_DATA(type), kResponseStart, kLength) == 0;
}

// The core's formatted header pairs of `view` (a tuple), when it is a view
// of spec's HeaderNames carrying a decision of the core; null otherwise.
// Borrowed.
PyObject* FormattedPairs(PyObject* view, PyObject* names_obj) {
  if (Py_TYPE(names_obj) != g_names_type) return nullptr;
  auto* inst = reinterpret_cast<py::detail::instance*>(names_obj);
  if (!inst->simple_layout || inst->simple_value_holder[0] == nullptr) {
    return nullptr;
  }
  const auto* names =
      static_cast<const HeaderNamesHandle*>(inst->simple_value_holder[0]);
  if (!names->view_type ||
      reinterpret_cast<PyObject*>(Py_TYPE(view)) != names->view_type.ptr()) {
    return nullptr;
  }
  PyObject* const data = *reinterpret_cast<PyObject**>(
      reinterpret_cast<char*>(view) + names->view_data_offset);
  if (data == nullptr || !PyTuple_CheckExact(data) ||
      PyTuple_GET_SIZE(data) != 5) {
    return nullptr;
  }
  PyObject* const result = PyTuple_GET_ITEM(data, 4);
  if (!PyTuple_CheckExact(result) || PyTuple_GET_SIZE(result) != 6) {
    return nullptr;
  }
  PyObject* const pairs = PyTuple_GET_ITEM(result, 5);
  return PyTuple_CheckExact(pairs) ? pairs : nullptr;
}

// Appends `pairs` (a tuple) to the header list `raw` when none of its
// names is in `merge_names`: 1 when appended, 0 when a name is there or a
// header is not a (name, value) tuple (the caller's fallback merges them),
// -1 with a Python error set.
int AppendUnlessNamed(PyObject* raw, PyObject* pairs, PyObject* merge_names) {
  Py_INCREF(raw);  // a set lookup can run code that drops the caller's
  int status = 1;
  // (a loop by index: a set lookup can run code that edits the list)
  for (Py_ssize_t i = 0; status == 1 && i < PyList_GET_SIZE(raw); ++i) {
    PyObject* const pair = PyList_GET_ITEM(raw, i);
    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) < 1) {
      status = 0;
      break;
    }
    Py_INCREF(pair);
    const int found = PySet_Contains(merge_names, PyTuple_GET_ITEM(pair, 0));
    Py_DECREF(pair);
    if (found != 0) status = found < 0 ? -1 : 0;
  }
  // Appended one by one: cheaper than a slice assignment for four, and the
  // first append makes room for four.
  for (Py_ssize_t i = 0; status == 1 && i < PyTuple_GET_SIZE(pairs); ++i) {
    if (PyList_Append(raw, PyTuple_GET_ITEM(pairs, i)) != 0) status = -1;
  }
  Py_DECREF(raw);
  return status;
}

// Adds the headers to a start message (a dict): appended in place to its
// header list when it has none of their names, else by spec's fallback.
// False with a Python error set.
bool AddHeaders(PyObject* message, PyObject* state, PyObject* spec) {
  PyObject* const view =
      PyDict_GetItemWithError(state, PyTuple_GET_ITEM(spec, kSendViewKey));
  if (view == nullptr) return !PyErr_Occurred();
  if (view == Py_None) return true;
  Py_INCREF(view);  // a set lookup below can run code that drops it
  PyObject* pairs = nullptr;
  if (PyTuple_GET_ITEM(spec, kSendFused) == Py_True) {
    pairs = FormattedPairs(view, PyTuple_GET_ITEM(spec, kSendNames));
  }
  int appended = 0;
  if (pairs != nullptr) {
    PyObject* const headers = PyDict_GetItemWithError(message, g_str_headers);
    if (headers != nullptr && PyList_CheckExact(headers)) {
      appended = AppendUnlessNamed(headers, pairs,
                                   PyTuple_GET_ITEM(spec, kSendMergeNames));
    } else if (headers == nullptr && PyErr_Occurred()) {
      appended = -1;
    }
  }
  if (appended == 0) {
    PyObject* const call_args[2] = {message, view};
    PyObject* const out = PyObject_Vectorcall(
        PyTuple_GET_ITEM(spec, kSendFallback), call_args, 2, nullptr);
    appended = out == nullptr ? -1 : 1;
    Py_XDECREF(out);
  }
  Py_DECREF(view);
  return appended == 1;
}

PyObject* HeaderSendCall(PyObject* callable, PyObject* const* args,
                         size_t nargsf, PyObject* kwnames) {
  auto* self = reinterpret_cast<HeaderSendObject*>(callable);
  if (PyVectorcall_NARGS(nargsf) != 1 ||
      (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_SetString(PyExc_TypeError, "send(message) takes 1 argument");
    return nullptr;
  }
  PyObject* const message = args[0];
  PyObject* const send = self->send;
  if (send == nullptr) {  // cleared as part of a garbage cycle
    PyErr_SetString(PyExc_RuntimeError, "HeaderSend was cleared");
    return nullptr;
  }
  // Our references: the headers' code may drop the object's.
  Py_INCREF(send);
  if (PyDict_CheckExact(message)) {
    PyObject* const type = PyDict_GetItemWithError(message, g_str_type);
    bool ok = type != nullptr || !PyErr_Occurred();
    if (type != nullptr && IsResponseStart(type)) {
      PyObject* const state = self->state;
      PyObject* const spec = self->spec;
      Py_INCREF(state);
      Py_INCREF(spec);
      ok = AddHeaders(message, state, spec);
      Py_DECREF(spec);
      Py_DECREF(state);
    }
    if (!ok) {
      Py_DECREF(send);
      return nullptr;
    }
  }
  PyObject* const out = PyObject_Vectorcall(send, args, 1, nullptr);
  Py_DECREF(send);
  return out;
}

// A new HeaderSend; null with a Python error set.
PyObject* NewHeaderSend(PyObject* send, PyObject* state, PyObject* spec) {
  if (!PyDict_CheckExact(state) || !PyTuple_CheckExact(spec) ||
      PyTuple_GET_SIZE(spec) != kSendFields) {
    PyErr_SetString(PyExc_TypeError,
                    "HeaderSend(send, state, spec): state must be a dict and "
                    "spec a send spec");
    return nullptr;
  }
  auto* self = PyObject_GC_New(HeaderSendObject, g_header_send_type);
  if (self == nullptr) return nullptr;
  self->vectorcall = HeaderSendCall;
  Py_INCREF(send);
  self->send = send;
  Py_INCREF(state);
  self->state = state;
  Py_INCREF(spec);
  self->spec = spec;
  PyObject_GC_Track(self);
  return reinterpret_cast<PyObject*>(self);
}

PyObject* HeaderSendNew(PyTypeObject* /*type*/, PyObject* args,
                        PyObject* kwargs) {
  PyObject* send = nullptr;
  PyObject* state = nullptr;
  PyObject* spec = nullptr;
  if ((kwargs != nullptr && PyDict_GET_SIZE(kwargs) != 0) ||
      !PyArg_UnpackTuple(args, "HeaderSend", 3, 3, &send, &state, &spec)) {
    if (!PyErr_Occurred()) {
      PyErr_SetString(PyExc_TypeError,
                      "HeaderSend(send, state, spec) takes no keywords");
    }
    return nullptr;
  }
  return NewHeaderSend(send, state, spec);
}

int HeaderSendTraverse(PyObject* obj, visitproc visit, void* arg) {
  auto* self = reinterpret_cast<HeaderSendObject*>(obj);
  Py_VISIT(Py_TYPE(obj));
  Py_VISIT(self->send);
  Py_VISIT(self->state);
  Py_VISIT(self->spec);
  return 0;
}

int HeaderSendClear(PyObject* obj) {
  auto* self = reinterpret_cast<HeaderSendObject*>(obj);
  Py_CLEAR(self->send);
  Py_CLEAR(self->state);
  Py_CLEAR(self->spec);
  return 0;
}

void HeaderSendDealloc(PyObject* obj) {
  PyTypeObject* const type = Py_TYPE(obj);
  PyObject_GC_UnTrack(obj);
  HeaderSendClear(obj);
  PyObject_GC_Del(obj);
  Py_DECREF(type);
}

PyMemberDef kHeaderSendMembers[] = {
    {"__vectorcalloffset__", T_PYSSIZET,
     static_cast<Py_ssize_t>(offsetof(HeaderSendObject, vectorcall)), READONLY,
     nullptr},
    {nullptr, 0, 0, 0, nullptr}};

PyType_Slot kHeaderSendSlots[] = {
    {Py_tp_new, reinterpret_cast<void*>(HeaderSendNew)},
    {Py_tp_call, reinterpret_cast<void*>(PyVectorcall_Call)},
    {Py_tp_traverse, reinterpret_cast<void*>(HeaderSendTraverse)},
    {Py_tp_clear, reinterpret_cast<void*>(HeaderSendClear)},
    {Py_tp_dealloc, reinterpret_cast<void*>(HeaderSendDealloc)},
    {Py_tp_members, kHeaderSendMembers},
    {Py_tp_doc,
     const_cast<char*>(
         "HeaderSend(send, state, spec)\n\n"
         "The middleware's send: adds the rate-limit headers of the "
         "request's view (state[spec's view key]) to the response's start "
         "message, then calls send (see rapidlimit.middleware).")},
    {0, nullptr}};

PyType_Spec kHeaderSendSpec = {
    "rapidlimit._core.HeaderSend", sizeof(HeaderSendObject), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    kHeaderSendSlots};

// The send mw_decide gives the application of a request it allowed.
PyObject* MwSend(PyObject* scope, PyObject* spec, PyObject* send) {
  if (PyTuple_GET_ITEM(spec, kSpecHeaders) != Py_True) {
    Py_INCREF(send);
    return send;
  }
  PyObject* const send_spec = PyTuple_GET_ITEM(spec, kSpecSend);
  // decide_scope made the state a dict when it allowed the request.
  PyObject* const state = PyDict_GetItemWithError(scope, g_str_state);
  if (state == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyError, "state");
    return nullptr;
  }
  if (!PyTuple_CheckExact(send_spec) ||
      PyTuple_GET_SIZE(send_spec) != kSendFields) {
    PyErr_SetString(PyExc_TypeError, "mw_decide: spec has no send spec");
    return nullptr;
  }
  Py_INCREF(state);
  const int rc =
      PyDict_SetItem(state, PyTuple_GET_ITEM(send_spec, kSendMarkKey),
                     PyTuple_GET_ITEM(send_spec, kSendMarkValue));
  PyObject* const out =
      rc == 0 ? NewHeaderSend(send, state, send_spec) : nullptr;
  Py_DECREF(state);
  return out;
}

// mw_decide(scope, spec, send) -> send | False | None
//
// The middleware's decide_scope: when the request is allowed, returns the
// send the application is to get: `send` itself with headers off, else a
// HeaderSend of spec's send spec, the state marked as the middleware's to
// add them to. False and None as decide_scope.
//
// Given `receive` and a finisher (mw_route's), a decision on a RedisStorage
// is submitted and (waiter, send to give the application) returned: the
// waiter resolves to the view of an allowed request, else to what
// finisher._finish_endpoint(view, exc, (scope, receive, send), plan) returns.
// The state is marked for the headers before the answer: it is only read
// once the application runs, which it does only after that answer.
PyObject* MwDecideWith(PyObject* scope, PyObject* spec, PyObject* send,
                       PyObject* receive = nullptr,
                       PyObject* finisher = nullptr) {
  const MwParts parts = {receive, send, finisher};
  PyObject* const view = DecideScopeFor(scope, spec, nullptr,
                                        receive != nullptr ? &parts : nullptr);
  if (view == nullptr || view == Py_None || view == Py_False) return view;
  if (IsRedisWaiter(view)) {
    PyObject* const sent = MwSend(scope, spec, send);
    PyObject* const out =
        sent != nullptr ? PyTuple_Pack(2, view, sent) : nullptr;
    Py_XDECREF(sent);
    Py_DECREF(view);
    return out;
  }
  Py_DECREF(view);  // the state holds it
  return MwSend(scope, spec, send);
}

PyObject* MwDecide(PyObject* /*module*/, PyObject* const* args,
                   Py_ssize_t nargsf, PyObject* kwnames) {
  if (!ExactlyPositional(nargsf, kwnames, 3, "mw_decide(scope, spec, send)"))
    return nullptr;
  return MwDecideWith(args[0], args[1], args[2]);
}

// mw_route's `routes`: the middleware's view of its application
// (SlowAPIASGIMiddleware._fast_state), remade whenever one changes.
enum RouteField : Py_ssize_t {
  kRouteApp,          // the application the middleware wraps
  kRouteRoutesApp,    // the application whose routes are cached
  kRouteLimiter,      // the limiter= argument, or None
  kRouteStateValues,  // app.state's dict, or None
  kRouteStateObject,  // app.state
  kRouteRoutes,       // the application's route list, or None
  kRouteRoutesLen,    // its length when the endpoint cache was made
  kRouteRouters,      // ((included router, its _routes_version), ...)
  kRouteEndpoints,    // {(type, method, root_path, path): (endpoint, ...)}
  kRouteFinish,       // a Redis decision's finisher (see MwDecideWith)
  kRouteFields
};

PyObject* g_str_http = nullptr;
PyObject* g_str_app = nullptr;
PyObject* g_str_method = nullptr;
PyObject* g_str_root_path = nullptr;
PyObject* g_str_empty = nullptr;
PyObject* g_str_limiter = nullptr;
PyObject* g_str_endpoint_plans = nullptr;
PyObject* g_str_fast = nullptr;
PyObject* g_str_routes_version = nullptr;

// scope[key] (borrowed), or `fallback` when it is missing; null on error.
PyObject* ScopeGet(PyObject* scope, PyObject* key, PyObject* fallback) {
  PyObject* const value = PyDict_GetItemWithError(scope, key);
  if (value == nullptr && !PyErr_Occurred()) return fallback;
  return value;
}

// Whether an included router got routes since the cache was made
// (getattr(router, "_routes_version", 0) != version); -1 on error.
int RoutersChanged(PyObject* routers) {
  if (!PyTuple_CheckExact(routers)) return -1;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(routers); ++i) {
    PyObject* const entry = PyTuple_GET_ITEM(routers, i);
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2) return -1;
    PyObject* now =
        PyObject_GetAttr(PyTuple_GET_ITEM(entry, 0), g_str_routes_version);
    if (now == nullptr) {
      if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
      PyErr_Clear();
      now = PyLong_FromLong(0);
      if (now == nullptr) return -1;
    }
    const int same =
        PyObject_RichCompareBool(now, PyTuple_GET_ITEM(entry, 1), Py_EQ);
    Py_DECREF(now);
    if (same != 1) return same < 0 ? -1 : 1;
  }
  return 0;
}

// The mw_decide spec of the route `scope` asks for (a new reference), as
// SlowAPIASGIMiddleware's Python lookup finds it; null, with no error set,
// whenever that lookup would find none or anything is unusual: the
// caller's Python path then looks again and decides.
PyObject* RouteSpec(PyObject* scope, PyObject* routes_state) {
  PyObject* const type = PyDict_GetItemWithError(scope, g_str_type);
  if (type == nullptr || !PyUnicode_CheckExact(type) ||
      (type != g_str_http && PyUnicode_Compare(type, g_str_http) != 0)) {
    return nullptr;
  }
  PyObject* const* const st = &PyTuple_GET_ITEM(routes_state, 0);
  PyObject* app = ScopeGet(scope, g_str_app, Py_None);
  if (app == nullptr) return nullptr;
  if (app == Py_None) app = st[kRouteApp];
  if (app != st[kRouteRoutesApp]) return nullptr;
  PyObject* limiter = st[kRouteLimiter];
  if (limiter == Py_None) {
    PyObject* const values = st[kRouteStateValues];
    if (!PyDict_CheckExact(values)) return nullptr;
    PyObject* const state = PyObject_GetAttr(app, g_str_state);
    if (state == nullptr) return nullptr;
    Py_DECREF(state);  // compared by identity only
    if (state != st[kRouteStateObject]) return nullptr;
    limiter = PyDict_GetItemWithError(values, g_str_limiter);
    if (limiter == nullptr || limiter == Py_None) return nullptr;
  }
  PyObject* const routes = st[kRouteRoutes];
  if (!PyList_CheckExact(routes) || !PyLong_CheckExact(st[kRouteRoutesLen]) ||
      PyList_GET_SIZE(routes) != PyLong_AsSsize_t(st[kRouteRoutesLen])) {
    return nullptr;
  }
  if (RoutersChanged(st[kRouteRouters]) != 0) return nullptr;
  PyObject* const method = ScopeGet(scope, g_str_method, Py_None);
  PyObject* const root_path = ScopeGet(scope, g_str_root_path, g_str_empty);
  PyObject* const path = PyDict_GetItemWithError(scope, g_str_path);
  PyObject* const endpoints = st[kRouteEndpoints];
  if (method == nullptr || root_path == nullptr || path == nullptr ||
      !PyDict_CheckExact(endpoints)) {
    return nullptr;
  }
  PyObject* const key = PyTuple_Pack(4, type, method, root_path, path);
  if (key == nullptr) return nullptr;
  PyObject* const found = PyDict_GetItemWithError(endpoints, key);
  Py_DECREF(key);
  if (found == nullptr || !PyTuple_CheckExact(found) ||
      PyTuple_GET_SIZE(found) != 2) {
    return nullptr;
  }
  // Ours: the lookups below can run code that drops the borrowed ones.
  Py_INCREF(found);
  Py_INCREF(limiter);
  PyObject* const plans = PyObject_GetAttr(limiter, g_str_endpoint_plans);
  PyObject* spec = nullptr;
  if (plans != nullptr && PyDict_CheckExact(plans)) {
    PyObject* const plan =
        PyDict_GetItemWithError(plans, PyTuple_GET_ITEM(found, 0));
    if (plan != nullptr) {
      spec = PyObject_GetAttr(plan, g_str_fast);
      if (spec != nullptr && (!PyTuple_CheckExact(spec) ||
                              PyTuple_GET_SIZE(spec) != kSpecFields)) {
        Py_CLEAR(spec);  // not worked out yet, or the general path's
      }
    }
  }
  Py_XDECREF(plans);
  Py_DECREF(limiter);
  Py_DECREF(found);
  return spec;
}

// mw_route(scope, receive, send, routes)
//     -> send | (waiter, send) | False | None
//
// SlowAPIASGIMiddleware's usual request in one call: finds the route's
// mw_decide spec as the middleware's Python lookup would (routes:
// RouteField), then decides as mw_decide, which on a RedisStorage submits
// the decision and returns (waiter, send) (see MwDecideWith). None, having
// changed nothing, when the lookup finds no spec (the middleware's Python
// path looks again and takes it from there); False when the request is
// rejected; errors of the decision are raised after the state was marked.
PyObject* MwRoute(PyObject* /*module*/, PyObject* const* args,
                  Py_ssize_t nargsf, PyObject* kwnames) {
  if (!ExactlyPositional(nargsf, kwnames, 4,
                         "mw_route(scope, receive, send, routes)"))
    return nullptr;
  PyObject* const scope = args[0];
  PyObject* const routes_state = args[3];
  if (!PyDict_CheckExact(scope) || !PyTuple_CheckExact(routes_state) ||
      PyTuple_GET_SIZE(routes_state) != kRouteFields) {
    Py_RETURN_NONE;
  }
  Py_INCREF(routes_state);  // the lookup and the decision run Python code
  PyObject* const spec = RouteSpec(scope, routes_state);
  PyObject* out = nullptr;
  if (spec == nullptr) {
    PyErr_Clear();  // the Python path looks again, and raises what it must
    Py_INCREF(Py_None);
    out = Py_None;
  } else {
    out = MwDecideWith(scope, spec, args[2], args[1],
                       PyTuple_GET_ITEM(routes_state, kRouteFinish));
    Py_DECREF(spec);
  }
  Py_DECREF(routes_state);
  return out;
}

// isinstance(obj, type), without its __class__ lookup for the objects an
// endpoint usually returns or FastAPI passes (a dict, None...): builtins
// whose __class__ is their type.
int IsInstance(PyObject* obj, PyObject* type) {
  if (PyType_CheckExact(type)) {
    if (PyObject_TypeCheck(obj, reinterpret_cast<PyTypeObject*>(type))) {
      return 1;
    }
    if (obj == Py_None || PyDict_CheckExact(obj) || PyList_CheckExact(obj) ||
        PyTuple_CheckExact(obj) || PyUnicode_CheckExact(obj) ||
        PyBytes_CheckExact(obj) || PyLong_CheckExact(obj)) {
      return 0;
    }
  }
  return PyObject_IsInstance(obj, type);
}

// merge_headers(returned, response, view, spec) -> None
//
// The decorator's headers for a request decide_scope allowed, after the
// endpoint ran: when spec's headers are on, view's formatted rate-limit
// headers are appended to the raw headers of the Response the endpoint
// returned, else of its `response` parameter (FastAPI merges that one),
// if either is a spec response_type. Anything else (headers of those names
// there already, an HTTP-date Retry-After, an odd view or header list)
// goes to spec's merge_fallback(carrier, view), in Python.
PyObject* MergeHeaders(PyObject* /*module*/, PyObject* const* args,
                       Py_ssize_t nargsf, PyObject* kwnames) {
  if (!ExactlyPositional(nargsf, kwnames, 4,
                         "merge_headers(returned, response, view, spec)"))
    return nullptr;
  PyObject* const spec = args[3];
  if (!PyTuple_CheckExact(spec) || PyTuple_GET_SIZE(spec) != kSpecFields) {
    PyErr_SetString(PyExc_TypeError, "merge_headers: spec is not a route spec");
    return nullptr;
  }
  if (PyTuple_GET_ITEM(spec, kSpecHeaders) != Py_True) Py_RETURN_NONE;
  PyObject* const response_type = PyTuple_GET_ITEM(spec, kSpecResponseType);
  PyObject* carrier = args[0];
  int is_response = IsInstance(carrier, response_type);
  if (is_response < 0) return nullptr;
  if (is_response == 0) {
    carrier = args[1];
    is_response = IsInstance(carrier, response_type);
    if (is_response < 0) return nullptr;
    if (is_response == 0) Py_RETURN_NONE;
  }
  PyObject* const view = args[2];
  if (PyTuple_GET_ITEM(spec, kSpecFused) == Py_True) {
    PyObject* const pairs =
        FormattedPairs(view, PyTuple_GET_ITEM(spec, kSpecNames));
    if (pairs != nullptr) {
      PyObject* const raw = PyObject_GetAttr(carrier, g_str_raw_headers);
      if (raw == nullptr) return nullptr;
      const int appended =
          PyList_CheckExact(raw)
              ? AppendUnlessNamed(raw, pairs,
                                  PyTuple_GET_ITEM(spec, kSpecMergeNames))
              : 0;
      Py_DECREF(raw);
      if (appended < 0) return nullptr;
      if (appended == 1) Py_RETURN_NONE;
    }
  }
  PyObject* const fallback = PyTuple_GET_ITEM(spec, kSpecMergeFallback);
  PyObject* const call_args[2] = {carrier, view};
  PyObject* const out = PyObject_Vectorcall(fallback, call_args, 2, nullptr);
  if (out == nullptr) return nullptr;
  Py_DECREF(out);
  Py_RETURN_NONE;
}

PyMethodDef kMergeHeadersDef = {
    "merge_headers",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(MergeHeaders)),
    METH_FASTCALL | METH_KEYWORDS,
    "merge_headers(returned, response, view, spec) -> None\n\n"
    "The decorator's rate-limit headers for a request decide_scope allowed, "
    "added to the response the endpoint returned or to its `response` "
    "parameter (see rapidlimit.extension)."};

PyMethodDef kDecideScopeDef = {
    "decide_scope",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(DecideScope)),
    METH_FASTCALL | METH_KEYWORDS,
    "decide_scope(scope, spec[, conn]) -> view | False | RedisWaiter | None"
    "\n\n"
    "The decorator's check of one simple limit keyed by the peer's address, "
    "straight from the ASGI scope (see rapidlimit.extension): the view when "
    "the request is allowed, False when it is rejected; on a RedisStorage, "
    "given the request conn, the waiter of its decision. None when the "
    "request needs the general path; nothing was changed then."};

PyMethodDef kMwDecideDef = {
    "mw_decide",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(MwDecide)),
    METH_FASTCALL | METH_KEYWORDS,
    "mw_decide(scope, spec, send) -> send | False | None\n\n"
    "The middleware's decide_scope: when the request is allowed, the send "
    "to give the application (a HeaderSend adding the rate-limit headers "
    "when they are on). False when it is rejected, None when the request "
    "needs the general path (see rapidlimit.middleware)."};

PyMethodDef kMwRouteDef = {
    "mw_route",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(MwRoute)),
    METH_FASTCALL | METH_KEYWORDS,
    "mw_route(scope, receive, send, routes) -> send | (waiter, send) | "
    "False | None\n\n"
    "The middleware's usual request in one call: the route's mw_decide spec "
    "found from `routes` (SlowAPIASGIMiddleware._fast_state), then "
    "mw_decide; on a RedisStorage, the waiter of the submitted decision and "
    "the send to give the application once it allows the request. None "
    "when the lookup finds no spec (nothing was changed)."};

PyMethodDef kFastMethods[] = {
    {"hit",
     reinterpret_cast<PyCFunction>(
         reinterpret_cast<void (*)()>(DecideSingle<Answer::kHit>)),
     METH_FASTCALL | METH_KEYWORDS,
     "hit(item, *identifiers, cost=1, now=None) -> bool\n\n"
     "Consumes `cost` of the limit; True if it fit."},
    {"test",
     reinterpret_cast<PyCFunction>(
         reinterpret_cast<void (*)()>(DecideSingle<Answer::kTest>)),
     METH_FASTCALL | METH_KEYWORDS,
     "test(item, *identifiers, cost=1, now=None) -> bool\n\n"
     "Whether `cost` would fit now; consumes nothing."},
    {"decide",
     reinterpret_cast<PyCFunction>(
         reinterpret_cast<void (*)()>(DecideSingle<Answer::kDecide>)),
     METH_FASTCALL | METH_KEYWORDS,
     "decide(item, *identifiers, cost=1, now=None) -> Decision\n\n"
     "Like hit, returning the full decision. Raises RedisUnavailableError "
     "when a Redis storage answers by its fail-closed policy."},
    {"decide_headers",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(DecideHeaders)),
     METH_FASTCALL | METH_KEYWORDS,
     "decide_headers(item, identity, cost, now, names) -> tuple\n\n"
     "Like decide(item, identity, cost=cost, now=now), returning (allowed, "
     "limit, remaining, reset_time, retry_after, headers): headers is a "
     "tuple of the four (name, value) pairs of `names` (a HeaderNames), with "
     "the values int(1 + reset_time) and int(1 + reset_time - now) for reset "
     "and retry-after. Raises RedisUnavailableError like decide."},
    {"decide_view",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(DecideView)),
     METH_FASTCALL | METH_KEYWORDS,
     "decide_view(item, key, scope, cost, now, names, limit, prefix) -> "
     "view\n\n"
     "decide_headers(item, identity, cost, now, names) with identity "
     "'prefix/key/scope' ('key/scope' when prefix is empty; key and scope "
     "are str), returned in a new instance of names.view_type whose _data "
     "slot is (limit, prefix, key, scope, result)."},
    {"decide_many",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(DecideMany)),
     METH_FASTCALL | METH_KEYWORDS,
     "decide_many(requests, now=None, test=False) -> list[Decision]\n\n"
     "Decides (item, identity, cost) requests in order, stopping at the "
     "first rejection unless `test`. Raises RedisUnavailableError when a "
     "Redis storage answers by its fail-closed policy."},
    {nullptr, nullptr, 0, nullptr}};

int64_t NowArg(const py::kwargs& kwargs) {
  int64_t now = 0;
  PyObject* value = nullptr;
  for (auto item : kwargs) {
    const std::string name = py::str(item.first);
    if (name != "now")
      throw py::type_error("unexpected keyword argument '" + name + "'");
    value = item.second.ptr();
  }
  if (!NowFromPython(value, &now)) throw py::error_already_set();
  return now;
}

std::string KeyFromArgs(const ItemHandle& item, const py::args& ids) {
  std::string key;
  if (!BuildKey(item, PySequence_Fast_ITEMS(ids.ptr()),
                static_cast<size_t>(ids.size()), &key)) {
    throw py::error_already_set();
  }
  return key;
}

}  // namespace

bool ViewNamesReady(PyObject* names) {
  return ViewNames(names, "decide_view_async") != nullptr;
}

PyObject* NewDecisionView(const Decision& d, double now_seconds,
                          Strategy strategy, PyObject* names_obj,
                          PyObject* limit, PyObject* prefix, PyObject* key,
                          PyObject* scope) {
  const HeaderNamesHandle* names = ViewNames(names_obj, "decide_view_async");
  if (names == nullptr) return nullptr;
  PyObject* result = PyTuple_New(6);
  if (result == nullptr) return nullptr;
  if (!FillResult(d, now_seconds, strategy, *names, result)) {
    Py_DECREF(result);
    return nullptr;
  }
  return MakeView(*names, result, limit, prefix, key, scope);
}

PyObject* MakeDecision(const Decision& d) {
  PyObject* out = PyStructSequence_New(g_decision_type);
  if (out == nullptr) return nullptr;
  PyObject* allowed = d.allowed ? Py_True : Py_False;
  Py_INCREF(allowed);
  PyStructSequence_SetItem(out, 0, allowed);
  PyStructSequence_SetItem(out, 1, NewInt(d.limit));
  PyStructSequence_SetItem(out, 2, NewInt(d.remaining));
  PyStructSequence_SetItem(out, 3,
                           PyFloat_FromDouble(NanosToSeconds(d.reset_nanos)));
  PyStructSequence_SetItem(out, 4, NewRetryAfter(d.retry_after_nanos));
  if (PyErr_Occurred()) {  // an allocation failed: a slot is empty
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

bool KeywordIs(PyObject* name, PyObject* interned) {
  return name == interned || PyUnicode_Compare(name, interned) == 0;
}

bool NowAndTestArgs(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
                    Py_ssize_t fixed, int64_t* now, bool* test) {
  PyObject* now_obj = nargs > fixed ? args[fixed] : nullptr;
  PyObject* test_obj = nargs > fixed + 1 ? args[fixed + 1] : nullptr;
  if (kwnames != nullptr) {
    const Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < nkw; ++i) {
      PyObject* name = PyTuple_GET_ITEM(kwnames, i);
      if (KeywordIs(name, g_str_now)) {
        now_obj = args[nargs + i];
      } else if (KeywordIs(name, g_str_test)) {
        test_obj = args[nargs + i];
      } else {
        PyErr_Format(PyExc_TypeError, "unexpected keyword argument '%U'", name);
        return false;
      }
    }
  }
  *test = false;
  if (test_obj != nullptr) {
    const int truth = PyObject_IsTrue(test_obj);
    if (truth < 0) return false;
    *test = truth == 1;
  }
  return NowFromPython(now_obj, now);
}

bool CostFromPython(PyObject* obj, int64_t* cost) {
  long long v;
  if (PyFloat_Check(obj)) {
    // Counts are whole hits: 2.0 (say, from a cost computed by division) is
    // 2, and a fraction is refused rather than silently rounded either way.
    const double d = PyFloat_AS_DOUBLE(obj);
    if (!(d >= 0 && d <= static_cast<double>(kMaxAmount)) ||
        d != static_cast<double>(static_cast<long long>(d))) {
      PyErr_Format(PyExc_ValueError,
                   "cost must be a whole number between 0 and %lld, got %R",
                   static_cast<long long>(kMaxAmount), obj);
      return false;
    }
    v = static_cast<long long>(d);
  } else {
    v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred()) return false;
  }
  if (v < 0 || v > kMaxAmount) {
    PyErr_Format(PyExc_ValueError, "cost must be between 0 and %lld, got %lld",
                 static_cast<long long>(kMaxAmount), v);
    return false;
  }
  *cost = v;
  return true;
}

// The offset of the `_data` slot of `view_type`, a class whose instances
// decide_view makes without calling it: it must be a plain class with
// `__slots__` holding `_data` and no __init__ work that would be skipped.
Py_ssize_t ViewDataOffset(const py::object& view_type) {
  if (!PyType_Check(view_type.ptr())) {
    throw py::type_error("view_type must be a class");
  }
  auto* type = reinterpret_cast<PyTypeObject*>(view_type.ptr());
  PyObject* descr = PyDict_GetItemString(type->tp_dict, "_data");  // borrowed
  if (descr == nullptr || !PyObject_TypeCheck(descr, &PyMemberDescr_Type)) {
    throw py::type_error("view_type must declare __slots__ = ('_data',)");
  }
  const PyMemberDef* member =
      reinterpret_cast<PyMemberDescrObject*>(descr)->d_member;
  if (member->type != T_OBJECT_EX || (member->flags & READONLY) != 0) {
    throw py::type_error("view_type's _data must be a writable slot");
  }
  return member->offset;
}

void BindLimiter(py::module_& m) {
  g_decision_type = PyStructSequence_NewType(&kDecisionDesc);
  if (g_decision_type == nullptr) throw py::error_already_set();
  m.add_object("Decision", py::reinterpret_steal<py::object>(
                               reinterpret_cast<PyObject*>(g_decision_type)));
  Py_INCREF(g_decision_type);  // the module keeps one; so do we

  g_str_cost = PyUnicode_InternFromString("cost");
  g_str_now = PyUnicode_InternFromString("now");
  g_str_test = PyUnicode_InternFromString("test");
  g_str_state = PyUnicode_InternFromString("state");
  g_str_path = PyUnicode_InternFromString("path");
  g_str_client = PyUnicode_InternFromString("client");
  g_str_localhost = PyUnicode_InternFromString("127.0.0.1");
  g_str_raw_headers = PyUnicode_InternFromString("raw_headers");
  g_str_type = PyUnicode_InternFromString("type");
  g_str_http = PyUnicode_InternFromString("http");
  g_str_app = PyUnicode_InternFromString("app");
  g_str_method = PyUnicode_InternFromString("method");
  g_str_root_path = PyUnicode_InternFromString("root_path");
  g_str_empty = PyUnicode_InternFromString("");
  g_str_limiter = PyUnicode_InternFromString("limiter");
  g_str_endpoint_plans = PyUnicode_InternFromString("_endpoint_plans");
  g_str_fast = PyUnicode_InternFromString("fast");
  g_str_routes_version = PyUnicode_InternFromString("_routes_version");
  g_str_headers = PyUnicode_InternFromString("headers");
  g_str_time = PyUnicode_InternFromString("time");
  {
    PyObject* time_module = PyImport_ImportModule("time");
    if (time_module == nullptr) throw py::error_already_set();
    g_time_dict = PyModule_GetDict(time_module);  // borrowed
    Py_INCREF(g_time_dict);
    g_time_time = PyDict_GetItemWithError(g_time_dict, g_str_time);
    Py_DECREF(time_module);
    if (g_time_time == nullptr) {
      if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_ImportError, "time.time is missing");
      }
      throw py::error_already_set();
    }
    Py_INCREF(g_time_time);
  }
  g_item_type =
      reinterpret_cast<PyTypeObject*>(py::type::of<ItemHandle>().ptr());

  // Shared value objects, built once per interpreter.
  ++g_generation;
  for (int64_t v = 0; v < kCached; ++v) {
    g_value_ints[v] = PyLong_FromLongLong(v);
    g_value_bytes[v] = NewDecimal(v);
    if (g_value_ints[v] == nullptr || g_value_bytes[v] == nullptr) {
      throw py::error_already_set();
    }
  }
  g_zero_float = PyFloat_FromDouble(0.0);
  if (g_zero_float == nullptr) throw py::error_already_set();

  py::class_<HeaderNamesHandle> names_cls(
      m, "HeaderNames",
      "The four rate-limit header names (bytes), with ready (name, value) "
      "pairs for small values, for RateLimiter.decide_headers. Immutable.");
  names_cls
      .def(py::init([](py::bytes limit, py::bytes remaining, py::bytes reset,
                       py::bytes retry_after, py::object view_type) {
             auto h = std::make_unique<HeaderNamesHandle>();
             if (!view_type.is_none()) {
               h->view_data_offset = ViewDataOffset(view_type);
               h->view_type = view_type;
             }
             const py::bytes given[HeaderNamesHandle::kFields] = {
                 limit, remaining, reset, retry_after};
             for (int f = 0; f < HeaderNamesHandle::kFields; ++f) {
               // Plain bytes (a subclass is copied): headers for ASGI.
               h->names[f] = PyBytes_CheckExact(given[f].ptr())
                                 ? py::object(given[f])
                                 : py::bytes(std::string(given[f]));
               if (f == HeaderNamesHandle::kReset) continue;
               for (int64_t v = 0; v < kCached; ++v) {
                 PyObject* pair =
                     PyTuple_Pack(2, h->names[f].ptr(), g_value_bytes[v]);
                 if (pair == nullptr) throw py::error_already_set();
                 // Bytes only: nothing for the cycle collector to visit.
                 PyObject_GC_UnTrack(pair);
                 h->pairs[f][v] = py::reinterpret_steal<py::object>(pair);
               }
             }
             return h;
           }),
           py::arg("limit"), py::arg("remaining"), py::arg("reset"),
           py::arg("retry_after"), py::arg("view_type") = py::none())
      .def_property_readonly("limit",
                             [](const HeaderNamesHandle& h) {
                               return h.names[HeaderNamesHandle::kLimit];
                             })
      .def_property_readonly("remaining",
                             [](const HeaderNamesHandle& h) {
                               return h.names[HeaderNamesHandle::kRemaining];
                             })
      .def_property_readonly("reset",
                             [](const HeaderNamesHandle& h) {
                               return h.names[HeaderNamesHandle::kReset];
                             })
      .def_property_readonly("retry_after",
                             [](const HeaderNamesHandle& h) {
                               return h.names[HeaderNamesHandle::kRetryAfter];
                             })
      .def_property_readonly("view_type",
                             [](const HeaderNamesHandle& h) {
                               return h.view_type ? h.view_type : py::none();
                             })
      .def("__repr__", [](const HeaderNamesHandle& h) {
        return py::str("HeaderNames({!r}, {!r}, {!r}, {!r})")
            .format(h.names[0], h.names[1], h.names[2], h.names[3]);
      });
  g_names_type = reinterpret_cast<PyTypeObject*>(names_cls.ptr());

  py::class_<LimiterHandle> cls(m, "RateLimiter");
  cls.def(py::init([](py::object storage, const std::string& strategy) {
            const auto parsed = StrategyFromName(strategy);
            if (!parsed) {
              throw py::value_error("unknown strategy '" + strategy +
                                    "': expected fixed-window, moving-window, "
                                    "sliding-window-counter or token-bucket");
            }
            // Test fix: a clear TypeError (e.g. for a limits storage)
            // instead of pybind11's "Unable to cast ... to C++ type '?'".
            if (!py::isinstance<StorageHandle>(storage)) {
              throw py::type_error(
                  "storage must be a rapidlimit storage (MemoryStorage, "
                  "RedisStorage or storage_from_string(...)), got " +
                  py::str(py::type::handle_of(storage).attr("__qualname__"))
                      .cast<std::string>());
            }
            auto& handle = storage.cast<StorageHandle&>();
            LimiterHandle h;
            h.store = handle.store;
            h.storage = std::move(storage);
            h.strategy = *parsed;
            h.fingerprints = h.store->AcceptsFingerprints();
            return h;
          }),
          py::arg("storage"), py::arg("strategy"))
      .def_property_readonly("storage",
                             [](const LimiterHandle& h) { return h.storage; })
      .def_property_readonly("strategy",
                             [](const LimiterHandle& h) {
                               return std::string(StrategyName(h.strategy));
                             })
      .def("get_window_stats",
           [](LimiterHandle& h, const ItemHandle& item, const py::args& ids,
              const py::kwargs& kwargs) {
             const int64_t now = NowArg(kwargs);
             const std::string key = KeyFromArgs(item, ids);
             Request r;
             r.strategy = h.strategy;
             r.limit = &item.limit;
             r.key = key;
             const WindowState state = h.store->Inspect(r, now);
             const WindowStats stats =
                 StatsFromState(h.strategy, item.limit, state, now);
             return std::make_tuple(NanosToSeconds(stats.reset_nanos),
                                    stats.remaining);
           })
      .def("clear", [](LimiterHandle& h, const ItemHandle& item,
                       const py::args& ids) {
        bool existed = false;
        if (!h.store->TryClear(h.strategy, KeyFromArgs(item, ids), &existed)) {
          RaiseStoreUnreachable("clear");
        }
      });
  g_limiter_type = reinterpret_cast<PyTypeObject*>(cls.ptr());
  for (PyMethodDef* def = kFastMethods; def->ml_name != nullptr; ++def) {
    PyObject* descr = PyDescr_NewMethod(g_limiter_type, def);
    if (descr == nullptr) throw py::error_already_set();
    const int rc = PyObject_SetAttrString(cls.ptr(), def->ml_name, descr);
    Py_DECREF(descr);
    if (rc != 0) throw py::error_already_set();
  }
  PyObject* decide_scope =
      PyCFunction_NewEx(&kDecideScopeDef, nullptr, m.attr("__name__").ptr());
  if (decide_scope == nullptr) throw py::error_already_set();
  m.add_object("decide_scope", py::reinterpret_steal<py::object>(decide_scope));
  PyObject* merge_headers =
      PyCFunction_NewEx(&kMergeHeadersDef, nullptr, m.attr("__name__").ptr());
  if (merge_headers == nullptr) throw py::error_already_set();
  m.add_object("merge_headers",
               py::reinterpret_steal<py::object>(merge_headers));
  PyObject* mw_decide =
      PyCFunction_NewEx(&kMwDecideDef, nullptr, m.attr("__name__").ptr());
  if (mw_decide == nullptr) throw py::error_already_set();
  m.add_object("mw_decide", py::reinterpret_steal<py::object>(mw_decide));
  PyObject* mw_route =
      PyCFunction_NewEx(&kMwRouteDef, nullptr, m.attr("__name__").ptr());
  if (mw_route == nullptr) throw py::error_already_set();
  m.add_object("mw_route", py::reinterpret_steal<py::object>(mw_route));
  PyObject* header_send = PyType_FromSpec(&kHeaderSendSpec);
  if (header_send == nullptr) throw py::error_already_set();
  g_header_send_type = reinterpret_cast<PyTypeObject*>(header_send);
  Py_INCREF(header_send);  // the module keeps one; so do we
  m.add_object("HeaderSend", py::reinterpret_steal<py::object>(header_send));
}

}  // namespace rapidlimit::bindings
