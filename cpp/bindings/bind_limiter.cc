// RateLimiter: a strategy bound to a store. hit/test/decide/decide_many are
// raw METH_FASTCALL methods: pybind11's generic dispatch costs more than
// the whole in-memory decision, and these are called once per request.
#include <pybind11/stl.h>

#include <climits>
#include <cstdint>
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
  thread_local std::string key;
  if (!BuildKey(*item, args + 1, static_cast<size_t>(nargs - 1), &key)) {
    return nullptr;
  }
  int64_t now = 0;
  if (!NowFromPython(now_obj, &now)) return nullptr;
  Request r;
  if (!CheckStrategyLimit(limiter->strategy, item->limit)) return nullptr;
  r.strategy = limiter->strategy;
  r.limit = &item->limit;
  r.key = key;
  r.cost = cost;
  Decision d;
  limiter->store->Decide(
      &r, 1, now, kAnswer == Answer::kTest ? Mode::kTest : Mode::kHit, &d);
  if constexpr (kAnswer == Answer::kDecide) {
    if (RaiseIfFailClosed(d)) return nullptr;
    return MakeDecision(d);
  } else {
    return PyBool_FromLong(d.allowed);
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
  PyObject* now_obj = nargs > 1 ? args[1] : nullptr;
  PyObject* test_obj = nargs > 2 ? args[2] : nullptr;
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
        return nullptr;
      }
    }
  }
  bool test = false;
  if (test_obj != nullptr) {
    const int truth = PyObject_IsTrue(test_obj);
    if (truth < 0) return nullptr;
    test = truth == 1;
  }
  int64_t now = 0;
  if (!NowFromPython(now_obj, &now)) return nullptr;

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
    if (item == nullptr || !CostFromPython(PyTuple_GET_ITEM(entry, 2), &cost) ||
        !BuildKey(*item, &identity, 1, &keys[i])) {
      Py_DECREF(seq);
      return nullptr;
    }
    if (!CheckStrategyLimit(limiter->strategy, item->limit)) {
      Py_DECREF(seq);
      return nullptr;
    }
    requests[i].strategy = limiter->strategy;
    requests[i].limit = &item->limit;
    requests[i].key = keys[i];
    requests[i].cost = cost;
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

// The four rate-limit header names of a Limiter, with ready (name, value)
// pairs for small values: most responses then only take references.
// Built whole at construction and never changed, so any thread may read it.
struct HeaderNamesHandle {
  static constexpr int64_t kCached = 256;
  enum Field { kLimit, kRemaining, kReset, kRetryAfter, kFields };
  py::object names[kFields];
  py::object pairs[kFields][kCached];  // kReset has none: it is an epoch
};

PyTypeObject* g_names_type = nullptr;

// The last reset pair this thread made: consecutive requests of a client
// share their window's reset. The pair holds its name, so a name object
// seen here cannot have been freed and reused for another name.
thread_local PyObject* tl_reset_pair = nullptr;
thread_local int64_t tl_reset_value = 0;

// A new reference to a (name, b"<value>") pair.
PyObject* NewPair(const HeaderNamesHandle& h, int field, int64_t value) {
  if (field != HeaderNamesHandle::kReset && value >= 0 &&
      value < HeaderNamesHandle::kCached) {
    PyObject* pair = h.pairs[field][value].ptr();
    Py_INCREF(pair);
    return pair;
  }
  const bool reset = field == HeaderNamesHandle::kReset;
  if (reset && tl_reset_pair != nullptr && tl_reset_value == value &&
      PyTuple_GET_ITEM(tl_reset_pair, 0) == h.names[field].ptr()) {
    Py_INCREF(tl_reset_pair);
    return tl_reset_pair;
  }
  // Decimal digits by hand: snprintf cost more than the whole decision.
  char digits[24];
  char* end = digits + sizeof(digits);
  char* p = end;
  uint64_t magnitude = value < 0 ? 0 - static_cast<uint64_t>(value)
                                 : static_cast<uint64_t>(value);
  do {
    *--p = static_cast<char>('0' + magnitude % 10);
    magnitude /= 10;
  } while (magnitude != 0);
  if (value < 0) *--p = '-';
  PyObject* bytes = PyBytes_FromStringAndSize(p, end - p);
  if (bytes == nullptr) return nullptr;
  PyObject* name = h.names[field].ptr();
  Py_INCREF(name);
  PyObject* pair = PyTuple_New(2);
  if (pair == nullptr) {
    Py_DECREF(name);
    Py_DECREF(bytes);
    return nullptr;
  }
  PyTuple_SET_ITEM(pair, 0, name);
  PyTuple_SET_ITEM(pair, 1, bytes);
  if (reset) {
    Py_XSETREF(tl_reset_pair, pair);  // never released: one per thread
    Py_INCREF(pair);
    tl_reset_value = value;
  }
  return pair;
}

// Python's int(x) for the header values: truncation toward zero, clamped
// (a reset time is at most ~1e10, so the clamp never applies in practice).
int64_t Truncate(double x) {
  if (!(x > -9.0e18)) return x != x ? 0 : INT64_MIN;
  if (x >= 9.0e18) return INT64_MAX;
  return static_cast<int64_t>(x);
}

// decide_headers(item, identity, cost, now, names)
//   -> (allowed, limit, remaining, reset_time, retry_after, headers)
PyObject* DecideHeaders(PyObject* self, PyObject* const* args,
                        Py_ssize_t nargsf, PyObject* kwnames) {
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if (nargs != 5 || (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_SetString(PyExc_TypeError,
                    "decide_headers(item, identity, cost, now, names) takes "
                    "exactly 5 positional arguments");
    return nullptr;
  }
  auto* limiter = SelfHandle(self);
  if (limiter == nullptr) return nullptr;
  auto* item = static_cast<ItemHandle*>(
      UnwrapFast(args[0], g_item_type, "RateLimitItem"));
  if (item == nullptr) return nullptr;
  auto* names = static_cast<HeaderNamesHandle*>(
      UnwrapFast(args[4], g_names_type, "HeaderNames"));
  if (names == nullptr) return nullptr;
  int64_t cost = 0;
  if (!CostFromPython(args[2], &cost)) return nullptr;
  // The header formulas use the caller's float, as Python would.
  const double now_seconds = PyFloat_AsDouble(args[3]);
  if (now_seconds == -1.0 && PyErr_Occurred()) return nullptr;
  int64_t now = 0;
  if (!NowFromPython(args[3], &now)) return nullptr;
  thread_local std::string key;
  if (!BuildKey(*item, args + 1, 1, &key)) return nullptr;
  if (!CheckStrategyLimit(limiter->strategy, item->limit)) return nullptr;
  Request r;
  r.strategy = limiter->strategy;
  r.limit = &item->limit;
  r.key = key;
  r.cost = cost;
  Decision d;
  limiter->store->Decide(&r, 1, now, Mode::kHit, &d);
  if (RaiseIfFailClosed(d)) return nullptr;

  const double reset_time = NanosToSeconds(d.reset_nanos);
  const double reset_in = 1.0 + reset_time;
  PyObject* headers = PyList_New(4);
  if (headers == nullptr) return nullptr;
  const int64_t values[4] = {d.limit, d.remaining, Truncate(reset_in),
                             Truncate(reset_in - now_seconds)};
  for (int field = 0; field < HeaderNamesHandle::kFields; ++field) {
    PyObject* pair = NewPair(*names, field, values[field]);
    if (pair == nullptr) {
      Py_DECREF(headers);
      return nullptr;
    }
    PyList_SET_ITEM(headers, field, pair);
  }
  PyObject* out = PyTuple_New(6);
  if (out == nullptr) {
    Py_DECREF(headers);
    return nullptr;
  }
  PyObject* allowed = d.allowed ? Py_True : Py_False;
  Py_INCREF(allowed);
  PyTuple_SET_ITEM(out, 0, allowed);
  PyTuple_SET_ITEM(out, 5, headers);
  PyObject* fields[4] = {
      PyLong_FromLongLong(d.limit), PyLong_FromLongLong(d.remaining),
      PyFloat_FromDouble(reset_time),
      PyFloat_FromDouble(static_cast<double>(d.retry_after_nanos) /
                         kNanosPerSecond)};
  for (int i = 0; i < 4; ++i) {
    if (fields[i] == nullptr) {
      for (int j = i + 1; j < 4; ++j) Py_XDECREF(fields[j]);
      for (int j = i; j < 4; ++j) {
        Py_INCREF(Py_None);
        PyTuple_SET_ITEM(out, j + 1, Py_None);
      }
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, i + 1, fields[i]);
  }
  return out;
}

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
     "Like hit, returning the full decision."},
    {"decide_headers",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(DecideHeaders)),
     METH_FASTCALL | METH_KEYWORDS,
     "decide_headers(item, identity, cost, now, names) -> tuple\n\n"
     "Like decide(item, identity, cost=cost, now=now), returning (allowed, "
     "limit, remaining, reset_time, retry_after, headers): headers is a new "
     "list of the four (name, value) pairs of `names` (a HeaderNames), with "
     "the values int(1 + reset_time) and int(1 + reset_time - now) for reset "
     "and retry-after."},
    {"decide_many",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(DecideMany)),
     METH_FASTCALL | METH_KEYWORDS,
     "decide_many(requests, now=None, test=False) -> list[Decision]\n\n"
     "Decides (item, identity, cost) requests in order, stopping at the "
     "first rejection unless `test`."},
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

PyObject* MakeDecision(const Decision& d) {
  PyObject* out = PyStructSequence_New(g_decision_type);
  if (out == nullptr) return nullptr;
  PyObject* allowed = d.allowed ? Py_True : Py_False;
  Py_INCREF(allowed);
  PyStructSequence_SetItem(out, 0, allowed);
  PyStructSequence_SetItem(out, 1, PyLong_FromLongLong(d.limit));
  PyStructSequence_SetItem(out, 2, PyLong_FromLongLong(d.remaining));
  PyStructSequence_SetItem(out, 3,
                           PyFloat_FromDouble(NanosToSeconds(d.reset_nanos)));
  PyStructSequence_SetItem(
      out, 4,
      PyFloat_FromDouble(static_cast<double>(d.retry_after_nanos) /
                         kNanosPerSecond));
  return out;
}

bool KeywordIs(PyObject* name, PyObject* interned) {
  return name == interned || PyUnicode_Compare(name, interned) == 0;
}

bool CostFromPython(PyObject* obj, int64_t* cost) {
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) return false;
  if (v < 0 || v > kMaxAmount) {
    PyErr_Format(PyExc_ValueError, "cost must be between 0 and %lld, got %lld",
                 static_cast<long long>(kMaxAmount), v);
    return false;
  }
  *cost = v;
  return true;
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
  g_item_type =
      reinterpret_cast<PyTypeObject*>(py::type::of<ItemHandle>().ptr());

  py::class_<HeaderNamesHandle> names_cls(m, "HeaderNames");
  names_cls
      .def(py::init([](py::bytes limit, py::bytes remaining, py::bytes reset,
                       py::bytes retry_after) {
             auto h = std::make_unique<HeaderNamesHandle>();
             const py::bytes given[HeaderNamesHandle::kFields] = {
                 limit, remaining, reset, retry_after};
             for (int f = 0; f < HeaderNamesHandle::kFields; ++f) {
               h->names[f] = given[f];
               if (f == HeaderNamesHandle::kReset) continue;
               for (int64_t v = 0; v < HeaderNamesHandle::kCached; ++v) {
                 h->pairs[f][v] =
                     py::make_tuple(given[f], py::bytes(std::to_string(v)));
               }
             }
             return h;
           }),
           py::arg("limit"), py::arg("remaining"), py::arg("reset"),
           py::arg("retry_after"))
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
      .def_property_readonly("retry_after", [](const HeaderNamesHandle& h) {
        return h.names[HeaderNamesHandle::kRetryAfter];
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
      .def("clear",
           [](LimiterHandle& h, const ItemHandle& item, const py::args& ids) {
             h.store->Clear(h.strategy, KeyFromArgs(item, ids));
           });
  g_limiter_type = reinterpret_cast<PyTypeObject*>(cls.ptr());
  for (PyMethodDef* def = kFastMethods; def->ml_name != nullptr; ++def) {
    PyObject* descr = PyDescr_NewMethod(g_limiter_type, def);
    if (descr == nullptr) throw py::error_already_set();
    const int rc = PyObject_SetAttrString(cls.ptr(), def->ml_name, descr);
    Py_DECREF(descr);
    if (rc != 0) throw py::error_already_set();
  }
}

}  // namespace rapidlimit::bindings
