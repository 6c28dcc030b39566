#include <pybind11/stl.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "handles.h"
#include "rapidlimit/clock.h"
#include "rapidlimit/memory_store.h"

namespace rapidlimit::bindings {

int64_t NowArg(const py::object& now) {
  int64_t out = 0;
  if (!NowFromPython(now.ptr(), &out)) throw py::error_already_set();
  return out;
}

// Bounded as parsed periods are (past about 292 years the nanoseconds
// would overflow).
void CheckExpiry(double expiry_seconds, int at_least) {
  if (!std::isfinite(expiry_seconds) || expiry_seconds < at_least ||
      expiry_seconds > static_cast<double>(kMaxPeriodSeconds)) {
    throw py::value_error("expiry must be between " + std::to_string(at_least) +
                          " and " + std::to_string(kMaxPeriodSeconds) +
                          " seconds");
  }
}

Limit WindowLimit(int64_t amount, double expiry_seconds) {
  CheckExpiry(expiry_seconds, 1);
  Limit l;
  l.amount = amount;
  l.multiples = static_cast<int64_t>(expiry_seconds);
  l.granularity = Granularity::kSecond;
  return l;
}

Request MakeRequest(Strategy s, const Limit& l, const std::string& key,
                    int64_t cost) {
  Request r;
  r.strategy = s;
  r.limit = &l;
  r.key = key;
  r.cost = cost;
  return r;
}

Request AcquireRequest(Strategy s, const std::string& key, int64_t limit,
                       double expiry, int64_t amount, Limit* l) {
  *l = WindowLimit(limit, expiry);
  if (!CheckStrategyLimit(s, *l)) throw py::error_already_set();
  return MakeRequest(s, *l, key, amount);
}

Request ReadRequest(WindowRead read, const std::string& key, int64_t limit,
                    double expiry, Limit* l) {
  switch (read) {
    case WindowRead::kCount:
    case WindowRead::kExpiry:
      *l = WindowLimit(0, 1);
      return MakeRequest(Strategy::kFixedWindow, *l, key, 0);
    case WindowRead::kMovingWindow:
      *l = WindowLimit(limit, expiry);
      return MakeRequest(Strategy::kMovingWindow, *l, key, 0);
    case WindowRead::kSlidingWindow:
      break;
  }
  *l = WindowLimit(0, expiry);
  return MakeRequest(Strategy::kSlidingWindowCounter, *l, key, 0);
}

PyObject* ReadResult(WindowRead read, const WindowState& w) {
  switch (read) {
    case WindowRead::kCount:
      return PyLong_FromLongLong(w.count);
    case WindowRead::kExpiry:
      return PyFloat_FromDouble(NanosToSeconds(w.time_nanos));
    case WindowRead::kMovingWindow:
      return Py_BuildValue("(dL)", NanosToSeconds(w.time_nanos),
                           static_cast<long long>(w.count));
    case WindowRead::kSlidingWindow:
      break;
  }
  return Py_BuildValue("(LdLd)", static_cast<long long>(w.previous_count),
                       NanosToSeconds(w.previous_ttl_nanos),
                       static_cast<long long>(w.count),
                       NanosToSeconds(w.current_ttl_nanos));
}

PyObject* AcquireStats(const Decision& d, const Limit& l) {
  const int64_t period = l.PeriodNanos();
  const bool decided = d.source == DecisionSource::kStore ||
                       d.source == DecisionSource::kFallback;
  const int64_t count = d.limit - d.remaining;
  // An allowed hit leaves at most `limit` entries (the log keeps the newest
  // `limit`), so its count is exact when it filled the window too.
  const bool known = decided && (d.remaining > 0 || d.allowed) && count > 0 &&
                     d.reset_nanos != std::numeric_limits<int64_t>::max();
  return Py_BuildValue("(OdLd)", d.allowed ? Py_True : Py_False,
                       known ? NanosToSeconds(d.reset_nanos - period) : 0.0,
                       static_cast<long long>(known ? count : -1),
                       known ? NanosToSeconds(d.reset_nanos) : 0.0);
}

namespace {

// The state `read` reads (see ReadRequest for `limit` and `expiry`).
py::object Read(StorageHandle& h, WindowRead read, const std::string& key,
                int64_t limit, double expiry, const py::object& now) {
  Limit l;
  const Request r = ReadRequest(read, key, limit, expiry, &l);
  return Steal(ReadResult(read, h.store->Inspect(r, NowArg(now))));
}

Decision Acquire(StorageHandle& h, Strategy s, const std::string& key,
                 int64_t limit, double expiry, int64_t amount,
                 const py::object& now, Limit* l) {
  const Request r = AcquireRequest(s, key, limit, expiry, amount, l);
  Decision d;
  h.store->Decide(&r, 1, NowArg(now), Mode::kHit, &d);
  return d;
}

}  // namespace

void BindStorage(py::module_& m) {
  py::class_<StorageHandle>(m, "Storage")
      .def("check", [](StorageHandle&) { return true; })
      .def("reset",
           [](StorageHandle& h) {
             size_t dropped = 0;
             if (!h.store->TryReset(&dropped)) RaiseStoreUnreachable("reset");
             return dropped;
           })
      .def("__len__",
           [](StorageHandle& h) {
             size_t size = 0;
             if (!h.store->TrySize(&size)) RaiseStoreUnreachable("len");
             return size;
           })
      // A store is true even when empty, as limits' storages are: code
      // such as `limiter._storage or MemoryStorage()` must keep it.
      .def("__bool__", [](StorageHandle&) { return true; })
      .def(
          "incr",
          [](StorageHandle& h, const std::string& key, double expiry,
             int64_t amount, const py::object& now) {
            CheckExpiry(expiry, 0);
            return h.store->Incr(key, SecondsToNanos(expiry), amount,
                                 NowArg(now), nullptr);
          },
          py::arg("key"), py::arg("expiry"), py::arg("amount") = 1,
          py::arg("now") = py::none())
      .def(
          "incr_expiry",
          [](StorageHandle& h, const std::string& key, double expiry,
             int64_t amount, const py::object& now) {
            CheckExpiry(expiry, 0);
            int64_t at = 0;
            const int64_t count = h.store->Incr(key, SecondsToNanos(expiry),
                                                amount, NowArg(now), &at);
            return std::make_tuple(count, NanosToSeconds(at));
          },
          py::arg("key"), py::arg("expiry"), py::arg("amount") = 1,
          py::arg("now") = py::none())
      .def(
          "get",
          [](StorageHandle& h, const std::string& key, const py::object& now) {
            return Read(h, WindowRead::kCount, key, 0, 0, now);
          },
          py::arg("key"), py::arg("now") = py::none())
      .def(
          "get_expiry",
          [](StorageHandle& h, const std::string& key, const py::object& now) {
            return Read(h, WindowRead::kExpiry, key, 0, 0, now);
          },
          py::arg("key"), py::arg("now") = py::none())
      .def(
          "clear",
          [](StorageHandle& h, const std::string& key) {
            // limits' clear forgets counters and moving-window logs alike.
            size_t cleared = 0;
            if (!h.store->TryClearMany(kStrategies, std::size(kStrategies), key,
                                       &cleared)) {
              RaiseStoreUnreachable("clear");
            }
          },
          py::arg("key"))
      .def(
          "acquire_entry",
          [](StorageHandle& h, const std::string& key, int64_t limit,
             double expiry, int64_t amount, const py::object& now) {
            Limit l;
            return Acquire(h, Strategy::kMovingWindow, key, limit, expiry,
                           amount, now, &l)
                .allowed;
          },
          py::arg("key"), py::arg("limit"), py::arg("expiry"),
          py::arg("amount") = 1, py::arg("now") = py::none())
      .def(
          "acquire_entry_stats",
          [](StorageHandle& h, const std::string& key, int64_t limit,
             double expiry, int64_t amount, const py::object& now) {
            Limit l;
            const Decision d = Acquire(h, Strategy::kMovingWindow, key, limit,
                                       expiry, amount, now, &l);
            return Steal(AcquireStats(d, l));
          },
          py::arg("key"), py::arg("limit"), py::arg("expiry"),
          py::arg("amount") = 1, py::arg("now") = py::none())
      .def(
          "get_moving_window",
          [](StorageHandle& h, const std::string& key, int64_t limit,
             double expiry, const py::object& now) {
            return Read(h, WindowRead::kMovingWindow, key, limit, expiry, now);
          },
          py::arg("key"), py::arg("limit"), py::arg("expiry"),
          py::arg("now") = py::none())
      .def(
          "acquire_sliding_window_entry",
          [](StorageHandle& h, const std::string& key, int64_t limit,
             double expiry, int64_t amount, const py::object& now) {
            Limit l;
            return Acquire(h, Strategy::kSlidingWindowCounter, key, limit,
                           expiry, amount, now, &l)
                .allowed;
          },
          py::arg("key"), py::arg("limit"), py::arg("expiry"),
          py::arg("amount") = 1, py::arg("now") = py::none())
      .def(
          "get_sliding_window",
          [](StorageHandle& h, const std::string& key, double expiry,
             const py::object& now) {
            return Read(h, WindowRead::kSlidingWindow, key, 0, expiry, now);
          },
          py::arg("key"), py::arg("expiry"), py::arg("now") = py::none())
      .def(
          "clear_sliding_window",
          [](StorageHandle& h, const std::string& key, double) {
            bool existed = false;
            if (!h.store->TryClear(Strategy::kSlidingWindowCounter, key,
                                   &existed)) {
              RaiseStoreUnreachable("clear");
            }
          },
          py::arg("key"), py::arg("expiry"));

  py::class_<MemoryStorageHandle, StorageHandle>(m, "MemoryStorage")
      .def(py::init([](int64_t max_keys, int64_t shards) {
             if (max_keys <= 0) throw py::value_error("max_keys must be > 0");
             if (shards <= 0 || shards > 65536) {
               throw py::value_error("shards must be between 1 and 65536");
             }
             MemoryStorageHandle h;
             h.max_keys = static_cast<size_t>(max_keys);
             h.shards = static_cast<size_t>(shards);
             MemoryStoreOptions options;
             options.max_keys = h.max_keys;
             options.shards = h.shards;
             h.store = NewMemoryStore(options);
             return h;
           }),
           py::arg("max_keys") = 1'000'000, py::arg("shards") = 64)
      .def_property_readonly(
          "max_keys", [](const MemoryStorageHandle& h) { return h.max_keys; })
      .def("memory_bytes", [](const MemoryStorageHandle& h) {
        return MemoryStoreBytes(*h.store);
      });
}

}  // namespace rapidlimit::bindings
