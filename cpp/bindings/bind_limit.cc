#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "handles.h"
#include "rapidlimit/algorithms.h"
#include "rapidlimit/clock.h"
#include "rapidlimit/memory_store.h"

namespace rapidlimit::bindings {

void* UnwrapSlow(PyObject* obj, PyTypeObject* type, const char* what) {
  if (!PyObject_TypeCheck(obj, type)) {
    PyErr_Format(PyExc_TypeError, "expected %s, got %.200s", what,
                 Py_TYPE(obj)->tp_name);
    return nullptr;
  }
  auto* inst = reinterpret_cast<py::detail::instance*>(obj);
  void* value = nullptr;
  if (inst->simple_layout) {
    value = inst->simple_value_holder[0];
  } else {
    value = inst->get_value_and_holder().value_ptr();
  }
  if (value == nullptr) {
    PyErr_Format(PyExc_TypeError, "%s was not initialised (missing __init__?)",
                 what);
  }
  return value;
}

bool NowFromSeconds(PyObject* now, int64_t* out) {
  const double seconds = PyFloat_AsDouble(now);
  if (seconds == -1.0 && PyErr_Occurred()) return false;
  if (!std::isfinite(seconds) || std::fabs(seconds) > 9.0e9) {
    PyErr_SetString(PyExc_ValueError, "now must be finite epoch seconds");
    return false;
  }
  *out = SecondsToNanos(seconds);
  return true;
}

namespace {

// UTF-8 bytes of str(obj) (bytes decoded as UTF-8, like limits' safe_string).
// `holder` keeps a temporary alive while the bytes are used.
const char* IdentifierBytes(PyObject* obj, Py_ssize_t* len, PyObject** holder) {
  *holder = nullptr;
  if (PyUnicode_Check(obj)) return PyUnicode_AsUTF8AndSize(obj, len);
  PyObject* text = PyBytes_Check(obj)
                       ? PyUnicode_DecodeUTF8(PyBytes_AS_STRING(obj),
                                              PyBytes_GET_SIZE(obj), "strict")
                       : PyObject_Str(obj);
  if (text == nullptr) return nullptr;
  *holder = text;
  return PyUnicode_AsUTF8AndSize(text, len);
}

}  // namespace

bool AppendIdentifier(PyObject* obj, std::string* out) {
  Py_ssize_t len = 0;
  PyObject* holder = nullptr;
  const char* data = IdentifierBytes(obj, &len, &holder);
  if (data != nullptr) out->append(data, static_cast<size_t>(len));
  Py_XDECREF(holder);
  return data != nullptr;
}

bool RaiseMovingWindowTooLarge(const Limit& limit) {
  const std::string text = limit.ToString();
  PyErr_Format(PyExc_ValueError,
               "moving-window limit '%s' is too large: the moving window "
               "logs every hit and allows at most %lld per window; use "
               "sliding-window-counter for large quotas",
               text.c_str(), static_cast<long long>(kMaxMovingWindowAmount));
  return false;
}

bool BuildKey(const ItemHandle& item, PyObject* const* ids, size_t n,
              std::string* out) {
  // The common case is one or two str identifiers: size once, copy once.
  constexpr size_t kFastIds = 4;
  if (n <= kFastIds) {
    const char* data[kFastIds];
    Py_ssize_t lens[kFastIds];
    size_t total = item.key_prefix.size() + item.key_suffix.size();
    for (size_t i = 0; i < n; ++i) {
      if (!PyUnicode_Check(ids[i])) goto general;
      data[i] = PyUnicode_AsUTF8AndSize(ids[i], &lens[i]);
      if (data[i] == nullptr) return false;
      total += static_cast<size_t>(lens[i]) + 1;
    }
    --total;  // n ids need n - 1 separators; with none, the suffix loses its
              // '/'
    out->resize(total);
    char* p = out->data();
    std::memcpy(p, item.key_prefix.data(), item.key_prefix.size());
    p += item.key_prefix.size();
    for (size_t i = 0; i < n; ++i) {
      if (i > 0) *p++ = '/';
      std::memcpy(p, data[i], static_cast<size_t>(lens[i]));
      p += lens[i];
    }
    const std::string_view suffix =
        n == 0 ? std::string_view(item.key_suffix).substr(1)
               : std::string_view(item.key_suffix);
    std::memcpy(p, suffix.data(), suffix.size());
    return true;
  }
general:
  out->assign(item.key_prefix);
  for (size_t i = 0; i < n; ++i) {
    if (i > 0) out->push_back('/');
    if (!AppendIdentifier(ids[i], out)) return false;
  }
  // The suffix starts with its own separator, which `limits` only writes
  // between parts.
  const std::string_view suffix = item.key_suffix;
  out->append(n == 0 ? suffix.substr(1) : suffix);
  return true;
}

namespace {

// The UTF-8 bytes of a str, without a call for the usual ASCII case.
const char* StrUtf8(PyObject* str, Py_ssize_t* len) {
  if (PyUnicode_IS_COMPACT_ASCII(str)) {
    *len = PyUnicode_GET_LENGTH(str);
    return static_cast<const char*>(PyUnicode_DATA(str));
  }
  return PyUnicode_AsUTF8AndSize(str, len);
}

}  // namespace

bool FingerprintKey(const ItemHandle& item, PyObject* const* ids, size_t n,
                    Request* r) {
  // The same bytes as BuildKey, fed to the hash piece by piece.
  internal::SipHasher13 hasher = item.prefix_hasher;
  for (size_t i = 0; i < n; ++i) {
    if (!PyUnicode_Check(ids[i])) {
      // Rare (bytes, ints, objects): build the key and hash it whole.
      thread_local std::string key;
      if (!BuildKey(item, ids, n, &key)) return false;
      r->fingerprint = MemoryKeyFingerprint(key);
      r->has_fingerprint = true;
      return true;
    }
    Py_ssize_t len = 0;
    const char* data = StrUtf8(ids[i], &len);
    if (data == nullptr) return false;
    if (i > 0) hasher.Update("/", 1);
    hasher.Update(data, static_cast<size_t>(len));
  }
  internal::Hash128 h;
  if (n != 0) {
    h = hasher.FinishWith(item.suffix_words);
  } else {
    // The suffix starts with its own separator, which `limits` only writes
    // between parts.
    const std::string_view tail = std::string_view(item.key_suffix).substr(1);
    hasher.Update(tail.data(), tail.size());
    h = hasher.Finish();
  }
  r->fingerprint = KeyFingerprint{h.lo, h.hi};
  r->has_fingerprint = true;
  return true;
}

namespace {

Granularity GranularityFromName(const std::string& name) {
  for (Granularity g :
       {Granularity::kSecond, Granularity::kMinute, Granularity::kHour,
        Granularity::kDay, Granularity::kMonth, Granularity::kYear}) {
    if (GranularityName(g) == name) return g;
  }
  throw py::value_error("no granularity matched for " + name);
}

std::string ParseInput(const py::handle& text) {
  if (!py::isinstance<py::str>(text)) {
    throw py::value_error("couldn't parse rate limit string '" +
                          py::str(text).cast<std::string>() + "'");
  }
  return text.cast<std::string>();
}

std::vector<ItemHandle> ParseOrThrow(const py::handle& text, bool first_only) {
  const std::string input = ParseInput(text);
  ParseResult r = first_only ? ParseOne(input) : ParseMany(input);
  if (!r.ok()) {
    // The message quotes the input, which may hold NUL bytes.
    PyErr_SetObject(PyExc_ValueError,
                    py::str(r.error.data(), r.error.size()).ptr());
    throw py::error_already_set();
  }
  std::vector<ItemHandle> items;
  items.reserve(r.limits.size());
  for (Limit& l : r.limits) items.emplace_back(std::move(l));
  return items;
}

}  // namespace

void BindLimit(py::module_& m) {
  // The Python layer refuses larger moving-window limits at decoration.
  m.attr("MAX_MOVING_WINDOW_AMOUNT") = kMaxMovingWindowAmount;
  py::class_<ItemHandle>(m, "RateLimitItem")
      .def(py::init([](int64_t amount, py::object multiples,
                       std::string namespace_, const std::string& granularity,
                       int64_t burst) {
             Limit l;
             if (amount < 0 || amount > kMaxAmount) {
               throw py::value_error("amount out of range: " +
                                     std::to_string(amount));
             }
             l.amount = amount;
             // limits treats a missing or zero multiple as 1.
             l.multiples = multiples.is_none() ? 1 : multiples.cast<int64_t>();
             if (l.multiples == 0) l.multiples = 1;
             l.granularity = GranularityFromName(granularity);
             if (l.multiples < 0 ||
                 l.multiples >
                     kMaxPeriodSeconds / GranularitySeconds(l.granularity)) {
               throw py::value_error("multiples out of range: " +
                                     std::to_string(l.multiples));
             }
             if (burst < 0 || burst > kMaxAmount) {
               throw py::value_error("burst out of range: " +
                                     std::to_string(burst));
             }
             l.burst = burst;
             l.namespace_ = std::move(namespace_);
             return ItemHandle(std::move(l));
           }),
           py::arg("amount"), py::arg("multiples") = 1,
           py::arg("namespace") = "LIMITER", py::kw_only(),
           py::arg("granularity") = "second", py::arg("burst") = 0)
      .def_property_readonly("amount",
                             [](const ItemHandle& h) { return h.limit.amount; })
      .def_property_readonly(
          "multiples", [](const ItemHandle& h) { return h.limit.multiples; })
      .def_property_readonly(
          "granularity",
          [](const ItemHandle& h) {
            return std::string(GranularityName(h.limit.granularity));
          })
      .def_property_readonly(
          "namespace", [](const ItemHandle& h) { return h.limit.namespace_; })
      .def_property_readonly("burst",
                             [](const ItemHandle& h) { return h.limit.burst; })
      .def("with_burst",
           [](const ItemHandle& h, int64_t burst) {
             if (burst < 0 || burst > kMaxAmount) {
               throw py::value_error("burst out of range: " +
                                     std::to_string(burst));
             }
             Limit l = h.limit;
             l.burst = burst;
             return ItemHandle(std::move(l));
           })
      .def("get_expiry",
           [](const ItemHandle& h) { return h.limit.PeriodSeconds(); })
      .def("key_for",
           [](const ItemHandle& h, const py::args& ids) {
             std::string key;
             PyObject** items = PySequence_Fast_ITEMS(ids.ptr());
             if (!BuildKey(h, items, static_cast<size_t>(ids.size()), &key)) {
               throw py::error_already_set();
             }
             return key;
           })
      .def("__str__", [](const ItemHandle& h) { return h.limit.ToString(); })
      .def("__repr__", [](const ItemHandle& h) { return h.limit.ToString(); })
      .def("__eq__",
           [](const ItemHandle& a, py::object other) {
             if (!py::isinstance<ItemHandle>(other)) return false;
             return a.limit == other.cast<const ItemHandle&>().limit;
           })
      .def("__lt__",
           [](const ItemHandle& a, const ItemHandle& b) {
             return GranularitySeconds(a.limit.granularity) <
                    GranularitySeconds(b.limit.granularity);
           })
      .def("__hash__", [](const ItemHandle& h) {
        return static_cast<py::ssize_t>(h.limit.Hash());
      });

  m.def(
      "parse",
      [](const py::object& text) { return ParseOrThrow(text, true).front(); },
      py::arg("text"));
  m.def(
      "parse_many",
      [](const py::object& text) { return ParseOrThrow(text, false); },
      py::arg("text"));
  m.def(
      "granularity_seconds",
      [](const std::string& name) {
        return GranularitySeconds(GranularityFromName(name));
      },
      py::arg("name"));
}

}  // namespace rapidlimit::bindings
