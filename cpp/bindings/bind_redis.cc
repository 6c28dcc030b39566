// RedisStorage: the Redis store as a Storage (so RateLimiter works with it
// unchanged), plus decide_many (raising on fail-closed) and
// decide_many_async (an asyncio future, completed without ever blocking
// the event loop: the store's I/O thread signals an eventfd that the loop
// watches with add_reader). Blocking waits release the GIL.
#include <pthread.h>
#include <pybind11/stl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#ifdef RAPIDLIMIT_HAVE_HIREDIS
#include <fcntl.h>
#include <sys/eventfd.h>
#endif

#include "handles.h"
#include "rapidlimit/clock.h"
#include "rapidlimit/redis_store.h"

namespace rapidlimit::bindings {
namespace {

struct RedisStorageHandle : StorageHandle {
  RedisStore* redis = nullptr;  // owned by `store`
  std::string uri;              // as given, password redacted
};

PyTypeObject* g_item_type = nullptr;
PyTypeObject* g_limiter_type = nullptr;
PyTypeObject* g_redis_type = nullptr;
PyObject* g_unavailable = nullptr;  // RedisUnavailableError
PyObject* g_str_set_result = nullptr;
PyObject* g_str_set_exception = nullptr;
PyObject* g_str_create_future = nullptr;
PyObject* g_str_call_soon = nullptr;
PyObject* g_get_running_loop = nullptr;

// ------------------------------------------------------------ GIL hooks

void* ReleaseGil() {
  if (!PyGILState_Check()) return nullptr;
  return PyEval_SaveThread();
}

void ReacquireGil(void* token) {
  if (token != nullptr)
    PyEval_RestoreThread(static_cast<PyThreadState*>(token));
}

// --------------------------------------------------------------- logging

// The store logs from its I/O thread, which never takes the GIL: messages
// wait here until a Python-facing call forwards them to logging.
std::mutex g_log_mu;
std::deque<std::pair<RedisLogLevel, std::string>> g_log_queue;
std::atomic<bool> g_log_pending{false};

void QueueLog(RedisLogLevel level, const std::string& message) {
  std::lock_guard<std::mutex> lock(g_log_mu);
  if (g_log_queue.size() < 1000) g_log_queue.emplace_back(level, message);
  g_log_pending.store(true, std::memory_order_release);
}

void FlushLogs() {
  if (!g_log_pending.load(std::memory_order_acquire)) return;
  std::deque<std::pair<RedisLogLevel, std::string>> items;
  {
    std::lock_guard<std::mutex> lock(g_log_mu);
    items.swap(g_log_queue);
    g_log_pending.store(false, std::memory_order_release);
  }
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  try {
    py::object logger =
        py::module_::import("logging").attr("getLogger")("rapidlimit.redis");
    for (const auto& [level, message] : items) {
      const int py_level = level == RedisLogLevel::kDebug     ? 10
                           : level == RedisLogLevel::kInfo    ? 20
                           : level == RedisLogLevel::kWarning ? 30
                                                              : 40;
      logger.attr("log")(py_level, "%s", message);
    }
  } catch (py::error_already_set&) {
    PyErr_Clear();
  }
  PyErr_Restore(type, value, tb);
}

// ------------------------------------------------------------- registry

// Live stores, closed at interpreter exit so that no I/O thread outlives
// the interpreter.
std::mutex g_registry_mu;
std::vector<std::weak_ptr<Store>> g_registry;

void CloseAll() {
  std::vector<std::shared_ptr<Store>> live;
  {
    std::lock_guard<std::mutex> lock(g_registry_mu);
    for (auto& w : g_registry) {
      if (auto s = w.lock()) live.push_back(std::move(s));
    }
    g_registry.clear();
  }
  py::gil_scoped_release release;
  for (auto& s : live) static_cast<RedisStore*>(s.get())->Close();
}

// ------------------------------------------------------------ decisions

// RedisUnavailableError("...", retry_after=...), not raised.
PyObject* MakeUnavailable(const char* message, double retry) {
  PyObject* exc = PyObject_CallFunction(g_unavailable, "s", message);
  if (exc == nullptr) return nullptr;
  PyObject* value = PyFloat_FromDouble(retry);
  if (value == nullptr ||
      PyObject_SetAttrString(exc, "retry_after", value) < 0) {
    Py_XDECREF(value);
    Py_DECREF(exc);
    return nullptr;
  }
  Py_DECREF(value);
  return exc;
}

constexpr char kFailClosedMessage[] =
    "redis is unavailable and the storage's policy is fail-closed";
constexpr char kTimedOutMessage[] =
    "redis did not answer within the command timeout and the storage's "
    "policy is fail-closed";

PyObject* MakeUnavailable(const Decision& d) {
  return MakeUnavailable(kFailClosedMessage,
                         static_cast<double>(d.retry_after_nanos) /
                             static_cast<double>(kNanosPerSecond));
}

// The Python result of a decide_many call: a list, or an exception object
// (a new reference; *is_error tells which).
PyObject* BuildResult(const Decision* decisions, size_t written,
                      bool* is_error) {
  *is_error = false;
  if (written > 0 &&
      decisions[written - 1].source == DecisionSource::kFailClosed) {
    *is_error = true;
    return MakeUnavailable(decisions[written - 1]);
  }
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

bool StrategyFromPython(PyObject* obj, Strategy* out) {
  if (PyObject_TypeCheck(obj, g_limiter_type)) {
    auto* limiter = static_cast<LimiterHandle*>(
        UnwrapFast(obj, g_limiter_type, "RateLimiter"));
    if (limiter == nullptr) return false;
    *out = limiter->strategy;
    return true;
  }
  Py_ssize_t len = 0;
  const char* text =
      PyUnicode_Check(obj) ? PyUnicode_AsUTF8AndSize(obj, &len) : nullptr;
  if (text == nullptr) {
    PyErr_Clear();
    PyErr_SetString(PyExc_TypeError,
                    "strategy must be a strategy name or a RateLimiter");
    return false;
  }
  const auto s = StrategyFromName(std::string_view(text, len));
  if (!s) {
    PyErr_Format(PyExc_ValueError,
                 "unknown strategy '%s': expected fixed-window, moving-window, "
                 "sliding-window-counter or token-bucket",
                 text);
    return false;
  }
  *out = *s;
  return true;
}

// Parsed arguments of decide_many(strategy, requests, now=None, test=False).
struct Call {
  RedisStorageHandle* storage = nullptr;
  Strategy strategy = Strategy::kFixedWindow;
  int64_t now = 0;
  bool test = false;
  std::vector<std::string>* keys = nullptr;
  std::vector<Request>* requests = nullptr;
  // Holds the items the requests point to until the store has copied them
  // (PySequence_Fast may have built it from a generator).
  py::object holder;
};

bool ParseCall(PyObject* self, PyObject* const* args, Py_ssize_t nargsf,
               PyObject* kwnames, const char* name, Call* call) {
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  call->storage = static_cast<RedisStorageHandle*>(
      UnwrapFast(self, g_redis_type, "RedisStorage"));
  if (call->storage == nullptr) return false;
  if (nargs < 2 || nargs > 4) {
    PyErr_Format(PyExc_TypeError,
                 "%s(strategy, requests, now=None, test=False)", name);
    return false;
  }
  if (!StrategyFromPython(args[0], &call->strategy) ||
      !NowAndTestArgs(args, nargs, kwnames, 2, &call->now, &call->test)) {
    return false;
  }

  PyObject* seq = PySequence_Fast(args[1], "requests must be a sequence");
  if (seq == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** entries = PySequence_Fast_ITEMS(seq);
  thread_local std::vector<std::string> keys;
  thread_local std::vector<Request> requests;
  if (keys.size() < static_cast<size_t>(n)) keys.resize(n);
  requests.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* entry = entries[i];
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3) {
      Py_DECREF(seq);
      PyErr_SetString(PyExc_TypeError,
                      "each request must be a tuple (item, identity, cost)");
      return false;
    }
    auto* item = static_cast<ItemHandle*>(
        UnwrapFast(PyTuple_GET_ITEM(entry, 0), g_item_type, "RateLimitItem"));
    int64_t cost = 0;
    PyObject* identity = PyTuple_GET_ITEM(entry, 1);
    // A moving-window limit too large for its log is refused here, as the
    // limiters refuse it: the script would write a log it cannot read back
    // and refuse every later hit of the key as a fault of Redis.
    if (item == nullptr || !CheckStrategyLimit(call->strategy, item->limit) ||
        !CostFromPython(PyTuple_GET_ITEM(entry, 2), &cost) ||
        !BuildKey(*item, &identity, 1, &keys[i])) {
      Py_DECREF(seq);
      return false;
    }
    // The store copies limits and keys before it waits or returns, so the
    // items only need to live for the call (seq holds them).
    requests[i].strategy = call->strategy;
    requests[i].limit = &item->limit;
    requests[i].key = keys[i];
    requests[i].cost = cost;
  }
  call->holder = py::reinterpret_steal<py::object>(seq);
  call->keys = &keys;
  call->requests = &requests;
  return true;
}

// decide_many(strategy, requests, now=None, test=False) -> list[Decision]
PyObject* DecideManySync(PyObject* self, PyObject* const* args,
                         Py_ssize_t nargsf, PyObject* kwnames) {
  FlushLogs();
  Call call;
  if (!ParseCall(self, args, nargsf, kwnames, "decide_many", &call)) {
    return nullptr;
  }
  const size_t n = call.requests->size();
  thread_local std::vector<Decision> decisions;
  decisions.resize(n);
  const size_t first_reject = call.storage->store->Decide(
      call.requests->data(), n, call.now, call.test ? Mode::kTest : Mode::kHit,
      decisions.data());
  const size_t written =
      (!call.test && first_reject < n) ? first_reject + 1 : n;
  bool is_error = false;
  PyObject* result = BuildResult(decisions.data(), written, &is_error);
  FlushLogs();
  if (result == nullptr || !is_error) return result;
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(result)), result);
  Py_DECREF(result);
  return nullptr;
}

// ----------------------------------------------------------------- async

#ifdef RAPIDLIMIT_HAVE_HIREDIS

// ---------------------------------------------------------------- Waiter
//
// What decide_view_async returns: a future-like awaitable (asyncio.isfuture
// is true; the Task protocol and the Future methods asyncio's helpers use)
// that Drain completes by calling the waiting task's wake-up itself, in the
// task's context. An asyncio.Future would schedule that wake-up through
// loop.call_soon, a Handle and one more turn of the loop, all in Python,
// for every request: several microseconds each on the hot path. Callbacks
// added to an already finished waiter, and those of a cancelled one, still
// go through call_soon as asyncio's own would.

struct Waiter {
  PyObject_HEAD PyObject* loop;  // strong
  PyObject* result;              // strong, once done
  PyObject* exception;           // strong, once failed
  PyObject* cancel_msg;          // strong or null
  // The first callback (usually the only one: the awaiting task's
  // wake-up) kept inline, the others in a list of (fn, context).
  PyObject* first_fn;
  PyObject* first_context;
  PyObject* callbacks;
  PyObject* weakrefs;
  // The decorator's check (decide_view_async with its five extra
  // arguments): state, view key, limiter, connection, plan; strong, set
  // until the answer is finished (see Finish).
  PyObject* finish[5];
  enum State : char { kPending, kDone, kCancelled } state;
  bool blocking;  // _asyncio_future_blocking
  bool allowed;   // the decision, when finish is set
};

PyTypeObject* g_waiter_type = nullptr;
PyObject* g_cancelled_error = nullptr;
PyObject* g_invalid_state = nullptr;
PyObject* g_str_call_exception_handler = nullptr;
PyObject* g_str_context = nullptr;
PyObject* g_context_kwnames = nullptr;  // ("context",)
PyObject* g_str_finish_endpoint = nullptr;

Waiter* NewWaiter(PyObject* loop) {
  auto* w = PyObject_GC_New(Waiter, g_waiter_type);
  if (w == nullptr) return nullptr;
  Py_INCREF(loop);
  w->loop = loop;
  w->result = nullptr;
  w->exception = nullptr;
  w->cancel_msg = nullptr;
  w->first_fn = nullptr;
  w->first_context = nullptr;
  w->callbacks = nullptr;
  w->weakrefs = nullptr;
  for (PyObject*& part : w->finish) part = nullptr;
  w->state = Waiter::kPending;
  w->blocking = false;
  w->allowed = false;
  PyObject_GC_Track(w);
  return w;
}

int WaiterTraverse(PyObject* self, visitproc visit, void* arg) {
  auto* w = reinterpret_cast<Waiter*>(self);
  Py_VISIT(w->loop);
  Py_VISIT(w->result);
  Py_VISIT(w->exception);
  Py_VISIT(w->cancel_msg);
  Py_VISIT(w->first_fn);
  Py_VISIT(w->first_context);
  Py_VISIT(w->callbacks);
  for (PyObject* part : w->finish) Py_VISIT(part);
  return 0;
}

int WaiterClear(PyObject* self) {
  auto* w = reinterpret_cast<Waiter*>(self);
  Py_CLEAR(w->loop);
  Py_CLEAR(w->result);
  Py_CLEAR(w->exception);
  Py_CLEAR(w->cancel_msg);
  Py_CLEAR(w->first_fn);
  Py_CLEAR(w->first_context);
  Py_CLEAR(w->callbacks);
  for (PyObject*& part : w->finish) Py_CLEAR(part);
  return 0;
}

void WaiterDealloc(PyObject* self) {
  PyObject_GC_UnTrack(self);
  if (reinterpret_cast<Waiter*>(self)->weakrefs != nullptr) {
    PyObject_ClearWeakRefs(self);
  }
  WaiterClear(self);
  PyObject_GC_Del(self);
}

// loop.call_soon(fn, waiter, context=context).
bool CallSoon(Waiter* w, PyObject* fn, PyObject* context) {
  PyObject* meth = PyObject_GetAttr(w->loop, g_str_call_soon);
  if (meth == nullptr) return false;
  PyObject* const args[3] = {fn, reinterpret_cast<PyObject*>(w), context};
  const bool with_context = context != nullptr && context != Py_None;
  PyObject* rc = PyObject_Vectorcall(
      meth, args, 2, with_context ? g_context_kwnames : nullptr);
  Py_DECREF(meth);
  if (rc == nullptr) return false;
  Py_DECREF(rc);
  return true;
}

// Reports a callback's exception as Handle._run would: to the loop's
// exception handler.
void ReportCallbackError(Waiter* w, PyObject* fn) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (tb != nullptr && value != nullptr) PyException_SetTraceback(value, tb);
  PyObject* context =
      Py_BuildValue("{s:s,s:O,s:O,s:O}", "message",
                    "Exception in callback of a rapidlimit RedisStorage waiter",
                    "exception", value != nullptr ? value : Py_None, "future",
                    reinterpret_cast<PyObject*>(w), "callback", fn);
  PyObject* rc = context == nullptr
                     ? nullptr
                     : PyObject_CallMethodOneArg(
                           w->loop, g_str_call_exception_handler, context);
  if (rc == nullptr) PyErr_WriteUnraisable(reinterpret_cast<PyObject*>(w));
  Py_XDECREF(rc);
  Py_XDECREF(context);
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
}

// Runs (or, with `direct` false, schedules) the waiter's callbacks once it
// is no longer pending. A KeyboardInterrupt or SystemExit of a callback is
// kept in *fatal (the first one; new reference) for the caller to re-raise
// once every waiter is complete, as the loop would.
void RunCallback(Waiter* w, PyObject* fn, PyObject* context, bool direct,
                 PyObject** fatal) {
  // A context entered already (the caller's own) cannot be entered
  // again: that callback waits for the next turn of the loop.
  if (!direct || PyContext_Enter(context) < 0) {
    PyErr_Clear();
    if (!CallSoon(w, fn, context)) ReportCallbackError(w, fn);
    return;
  }
  PyObject* rc = PyObject_CallOneArg(fn, reinterpret_cast<PyObject*>(w));
  if (rc == nullptr) {
    if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt) ||
        PyErr_ExceptionMatches(PyExc_SystemExit)) {
      PyObject *type, *value, *tb;
      PyErr_Fetch(&type, &value, &tb);
      PyErr_NormalizeException(&type, &value, &tb);
      if (tb != nullptr) PyException_SetTraceback(value, tb);
      Py_XDECREF(type);
      Py_XDECREF(tb);
      if (*fatal == nullptr) {
        *fatal = value;
      } else {
        Py_XDECREF(value);
      }
    } else {
      ReportCallbackError(w, fn);
    }
  } else {
    Py_DECREF(rc);
  }
  if (PyContext_Exit(context) < 0) PyErr_Clear();
}

void RunCallbacks(Waiter* w, bool direct, PyObject** fatal) {
  PyObject* fn = w->first_fn;
  PyObject* context = w->first_context;
  PyObject* callbacks = w->callbacks;
  w->first_fn = nullptr;
  w->first_context = nullptr;
  w->callbacks = nullptr;
  if (fn != nullptr) {
    RunCallback(w, fn, context, direct, fatal);
    Py_DECREF(fn);
    Py_DECREF(context);
  }
  if (callbacks == nullptr) return;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(callbacks); ++i) {
    PyObject* entry = PyList_GET_ITEM(callbacks, i);
    RunCallback(w, PyTuple_GET_ITEM(entry, 0), PyTuple_GET_ITEM(entry, 1),
                direct, fatal);
  }
  Py_DECREF(callbacks);
}

// Completes a pending waiter with `value` (a result, or an exception when
// `is_error`); steals `value`. Returns false when it was cancelled.
bool WaiterComplete(Waiter* w, PyObject* value, bool is_error) {
  if (w->state != Waiter::kPending) {
    Py_XDECREF(value);
    return false;
  }
  w->state = Waiter::kDone;
  if (is_error) {
    w->exception = value;
  } else {
    w->result = value;
  }
  return true;
}

// The decorator's check, once its answer is in (called by whichever of
// result() and the await comes first, so in the awaiting task's context):
// the view goes into state[view key]; an allowed view is the result, and
// anything else (a rejection, an error of the storage) is what
// limiter._finish_endpoint(view, exc, conn, plan) returns or raises.
void Finish(Waiter* w) {
  if (w->finish[0] == nullptr || w->state != Waiter::kDone) return;
  PyObject* parts[5];
  for (int i = 0; i < 5; ++i) {
    parts[i] = w->finish[i];
    w->finish[i] = nullptr;
  }
  PyObject* view = Py_None;
  PyObject* exc = Py_None;
  PyObject* out = nullptr;
  bool done = false;
  if (w->exception == nullptr) {
    view = w->result;
    if (PyDict_SetItem(parts[0], parts[1], view) < 0) {
      out = nullptr;
      done = true;
    } else if (w->allowed) {
      done = true;
      out = view;
      Py_INCREF(out);
    }
  } else if (PyObject_TypeCheck(w->exception, reinterpret_cast<PyTypeObject*>(
                                                  PyExc_Exception))) {
    exc = w->exception;
  } else {  // a BaseException is raised as it is
    for (PyObject* part : parts) Py_DECREF(part);
    return;
  }
  if (!done) {
    Py_INCREF(view);
    Py_INCREF(exc);
    PyObject* const args[5] = {parts[2], view, exc, parts[3], parts[4]};
    out =
        PyObject_VectorcallMethod(g_str_finish_endpoint, args,
                                  5 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
    Py_DECREF(view);
    Py_DECREF(exc);
  }
  for (PyObject* part : parts) Py_DECREF(part);
  if (out == nullptr) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != nullptr && value != nullptr) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    Py_CLEAR(w->result);
    Py_XSETREF(w->exception, value);
  } else {
    Py_CLEAR(w->exception);
    Py_XSETREF(w->result, out);
  }
}

PyObject* MakeCancelledError(Waiter* w) {
  return w->cancel_msg != nullptr
             ? PyObject_CallOneArg(g_cancelled_error, w->cancel_msg)
             : PyObject_CallNoArgs(g_cancelled_error);
}

// Raises what awaiting a finished waiter raises; false if it is pending.
void RaiseFailure(Waiter* w) {
  if (w->state == Waiter::kCancelled) {
    PyObject* exc = MakeCancelledError(w);
    if (exc != nullptr) {
      PyErr_SetObject(g_cancelled_error, exc);
      Py_DECREF(exc);
    }
    return;
  }
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(w->exception)),
                  w->exception);
}

PyObject* WaiterIterNext(PyObject* self) {
  auto* w = reinterpret_cast<Waiter*>(self);
  if (w->state == Waiter::kPending) {
    w->blocking = true;
    Py_INCREF(self);
    return self;  // to the Task, which adds its wake-up
  }
  Finish(w);
  if (w->state == Waiter::kCancelled || w->exception != nullptr) {
    RaiseFailure(w);
    return nullptr;
  }
  PyObject* result = w->result != nullptr ? w->result : Py_None;
  if (result == Py_None) return nullptr;  // StopIteration(None)
  // StopIteration(result) built explicitly: PyErr_SetObject would unpack
  // a tuple result into arguments.
  PyObject* stop = PyObject_CallOneArg(PyExc_StopIteration, result);
  if (stop == nullptr) return nullptr;
  PyErr_SetObject(PyExc_StopIteration, stop);
  Py_DECREF(stop);
  return nullptr;
}

PyObject* WaiterAwait(PyObject* self) {
  Py_INCREF(self);
  return self;
}

PyObject* WaiterResult(PyObject* self, PyObject*) {
  auto* w = reinterpret_cast<Waiter*>(self);
  if (w->state == Waiter::kPending) {
    PyErr_SetString(g_invalid_state, "Result is not ready.");
    return nullptr;
  }
  Finish(w);
  if (w->state == Waiter::kCancelled || w->exception != nullptr) {
    RaiseFailure(w);
    return nullptr;
  }
  PyObject* result = w->result != nullptr ? w->result : Py_None;
  Py_INCREF(result);
  return result;
}

PyObject* WaiterException(PyObject* self, PyObject*) {
  auto* w = reinterpret_cast<Waiter*>(self);
  if (w->state == Waiter::kPending) {
    PyErr_SetString(g_invalid_state, "Exception is not set.");
    return nullptr;
  }
  Finish(w);
  if (w->state == Waiter::kCancelled) {
    RaiseFailure(w);
    return nullptr;
  }
  PyObject* exc = w->exception != nullptr ? w->exception : Py_None;
  Py_INCREF(exc);
  return exc;
}

PyObject* WaiterDone(PyObject* self, PyObject*) {
  return PyBool_FromLong(reinterpret_cast<Waiter*>(self)->state !=
                         Waiter::kPending);
}

PyObject* WaiterCancelled(PyObject* self, PyObject*) {
  return PyBool_FromLong(reinterpret_cast<Waiter*>(self)->state ==
                         Waiter::kCancelled);
}

PyObject* WaiterGetLoop(PyObject* self, PyObject*) {
  PyObject* loop = reinterpret_cast<Waiter*>(self)->loop;
  Py_INCREF(loop);
  return loop;
}

PyObject* WaiterMakeCancelledError(PyObject* self, PyObject*) {
  return MakeCancelledError(reinterpret_cast<Waiter*>(self));
}

PyObject* WaiterCancel(PyObject* self, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"msg", nullptr};
  PyObject* msg = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:cancel",
                                   const_cast<char**>(kwlist), &msg)) {
    return nullptr;
  }
  auto* w = reinterpret_cast<Waiter*>(self);
  if (w->state != Waiter::kPending) Py_RETURN_FALSE;
  w->state = Waiter::kCancelled;
  if (msg != Py_None) {
    Py_INCREF(msg);
    w->cancel_msg = msg;
  }
  // The request stays queued; Drain finds the waiter cancelled and drops
  // its answer, as set_result on a cancelled future would fail.
  PyObject* fatal = nullptr;
  RunCallbacks(w, /*direct=*/false, &fatal);
  Py_RETURN_TRUE;
}

PyObject* WaiterAddDoneCallback(PyObject* self, PyObject* const* args,
                                Py_ssize_t nargsf, PyObject* kwnames) {
  auto* w = reinterpret_cast<Waiter*>(self);
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  PyObject* context = nullptr;
  if (kwnames != nullptr) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); ++i) {
      PyObject* kw = PyTuple_GET_ITEM(kwnames, i);
      if (!KeywordIs(kw, g_str_context)) {
        PyErr_Format(PyExc_TypeError, "unexpected keyword argument '%U'", kw);
        return nullptr;
      }
      context = args[nargs + i];
    }
  }
  if (nargs != 1) {
    PyErr_SetString(PyExc_TypeError,
                    "add_done_callback(fn, *, context=None) takes one "
                    "positional argument");
    return nullptr;
  }
  PyObject* fn = args[0];
  py::object own_context;
  if (context == nullptr || context == Py_None) {
    context = PyContext_CopyCurrent();
    if (context == nullptr) return nullptr;
    own_context = py::reinterpret_steal<py::object>(context);
  }
  if (w->state != Waiter::kPending) {
    if (!CallSoon(w, fn, context)) return nullptr;
    Py_RETURN_NONE;
  }
  if (w->first_fn == nullptr && w->callbacks == nullptr) {
    Py_INCREF(fn);
    Py_INCREF(context);
    w->first_fn = fn;
    w->first_context = context;
    Py_RETURN_NONE;
  }
  PyObject* entry = PyTuple_Pack(2, fn, context);
  if (entry == nullptr) return nullptr;
  if (w->callbacks == nullptr) {
    w->callbacks = PyList_New(0);
    if (w->callbacks == nullptr) {
      Py_DECREF(entry);
      return nullptr;
    }
  }
  const int rc = PyList_Append(w->callbacks, entry);
  Py_DECREF(entry);
  if (rc < 0) return nullptr;
  Py_RETURN_NONE;
}

PyObject* WaiterRemoveDoneCallback(PyObject* self, PyObject* fn) {
  auto* w = reinterpret_cast<Waiter*>(self);
  long removed = 0;
  if (w->first_fn != nullptr) {
    const int same = PyObject_RichCompareBool(w->first_fn, fn, Py_EQ);
    if (same < 0) return nullptr;
    if (same == 1) {
      Py_CLEAR(w->first_fn);
      Py_CLEAR(w->first_context);
      removed = 1;
    }
  }
  if (w->callbacks == nullptr) return PyLong_FromLong(removed);
  PyObject* kept = PyList_New(0);
  if (kept == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(w->callbacks); ++i) {
    PyObject* entry = PyList_GET_ITEM(w->callbacks, i);
    const int same =
        PyObject_RichCompareBool(PyTuple_GET_ITEM(entry, 0), fn, Py_EQ);
    if (same < 0 || (same == 0 && PyList_Append(kept, entry) < 0)) {
      Py_DECREF(kept);
      return nullptr;
    }
    removed += same;
  }
  Py_SETREF(w->callbacks, kept);
  return PyLong_FromLong(removed);
}

PyObject* WaiterGetBlocking(PyObject* self, void*) {
  return PyBool_FromLong(reinterpret_cast<Waiter*>(self)->blocking);
}

int WaiterSetBlocking(PyObject* self, PyObject* value, void*) {
  if (value == nullptr) {
    PyErr_SetString(PyExc_AttributeError, "cannot delete attribute");
    return -1;
  }
  const int truth = PyObject_IsTrue(value);
  if (truth < 0) return -1;
  reinterpret_cast<Waiter*>(self)->blocking = truth == 1;
  return 0;
}

PyObject* WaiterGetLoopAttr(PyObject* self, void*) {
  return WaiterGetLoop(self, nullptr);
}

PyObject* WaiterGetCancelMessage(PyObject* self, void*) {
  PyObject* msg = reinterpret_cast<Waiter*>(self)->cancel_msg;
  if (msg == nullptr) msg = Py_None;
  Py_INCREF(msg);
  return msg;
}

PyObject* WaiterRepr(PyObject* self) {
  const auto state = reinterpret_cast<Waiter*>(self)->state;
  return PyUnicode_FromFormat("<RedisWaiter %s>",
                              state == Waiter::kPending ? "pending"
                              : state == Waiter::kDone  ? "finished"
                                                        : "cancelled");
}

PyMethodDef kWaiterMethods[] = {
    {"result", WaiterResult, METH_NOARGS, nullptr},
    {"exception", WaiterException, METH_NOARGS, nullptr},
    {"done", WaiterDone, METH_NOARGS, nullptr},
    {"cancelled", WaiterCancelled, METH_NOARGS, nullptr},
    {"get_loop", WaiterGetLoop, METH_NOARGS, nullptr},
    {"_make_cancelled_error", WaiterMakeCancelledError, METH_NOARGS, nullptr},
    {"cancel",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(WaiterCancel)),
     METH_VARARGS | METH_KEYWORDS, nullptr},
    {"add_done_callback",
     reinterpret_cast<PyCFunction>(
         reinterpret_cast<void (*)()>(WaiterAddDoneCallback)),
     METH_FASTCALL | METH_KEYWORDS, nullptr},
    {"remove_done_callback", WaiterRemoveDoneCallback, METH_O, nullptr},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef kWaiterGetSet[] = {
    {"_asyncio_future_blocking", WaiterGetBlocking, WaiterSetBlocking, nullptr,
     nullptr},
    {"_loop", WaiterGetLoopAttr, nullptr, nullptr, nullptr},
    {"_cancel_message", WaiterGetCancelMessage, nullptr, nullptr, nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyAsyncMethods kWaiterAsync = {WaiterAwait, nullptr, nullptr};

PyTypeObject* MakeWaiterType() {
  static PyTypeObject type = [] {
    PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
    t.tp_name = "rapidlimit._core.RedisWaiter";
    t.tp_doc =
        "An awaitable RedisStorage answer: asyncio.isfuture() is true and it "
        "has the Future methods asyncio's helpers use.";
    t.tp_basicsize = sizeof(Waiter);
    t.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
    t.tp_dealloc = WaiterDealloc;
    t.tp_traverse = WaiterTraverse;
    t.tp_clear = WaiterClear;
    t.tp_repr = WaiterRepr;
    t.tp_as_async = &kWaiterAsync;
    t.tp_iter = WaiterAwait;
    t.tp_iternext = WaiterIterNext;
    t.tp_methods = kWaiterMethods;
    t.tp_getset = kWaiterGetSet;
    t.tp_weaklistoffset = offsetof(Waiter, weakrefs);
    return t;
  }();
  if (PyType_Ready(&type) < 0) throw py::error_already_set();
  return &type;
}

struct Pending;

// Bumped in a forked child. A bridge made before the fork belongs to the
// parent: the parent's I/O thread may have held its `mu` (it takes it
// without the GIL) or been growing `done` at that instant, and its eventfd
// is the parent's too, so the child reads none of it and makes its own.
std::atomic<uint64_t> g_bridge_generation{0};

// A Redis store whose connection an event loop drives itself
// (RedisStore::LoopFlush). Loop thread only, with the GIL: the connection
// it watches (`io.fd`, a duplicate of the store's socket, owned by the
// reader callback: closed once the loop has dropped that reader, so that
// its number is not taken while the selector still lists it) and the
// deadline check.
struct DrivenStore {
  std::shared_ptr<Store> store;
  RedisStore::LoopConnection io;
  bool watching = false;
  bool watchdog_armed = false;
  py::object watchdog_callback;
};

// How many stores' connections one loop drives at most; the others' I/O
// threads send (an app has one or two Redis stores).
constexpr size_t kMaxDrivenStores = 4;

// Completions for one event loop: the I/O thread appends and writes the
// eventfd; the loop's reader callback resolves the futures.
struct LoopBridge {
  const uint64_t generation =
      g_bridge_generation.load(std::memory_order_relaxed);
  int efd = -1;
  std::mutex mu;
  std::vector<Pending*> done;
  bool signaled = false;
  bool dead = false;            // the loop is closed or gone: nothing drains
  PyObject* loop = nullptr;     // the key in g_bridges (identity only)
  PyObject* weakref = nullptr;  // to the loop; released by the registry
  // Loop thread only: stores with commands queued during this iteration,
  // flushed by one call_soon callback at its end.
  std::vector<std::shared_ptr<Store>> to_flush;
  py::object flush_callback;
  // Loop thread only: the stores whose connections this loop drives.
  std::vector<std::shared_ptr<DrivenStore>> driven;

  // Made before this process was forked from its parent (see
  // g_bridge_generation): `mu`, `done`, `signaled` and `dead` are never
  // touched here. No completion of this process ever reaches it: the
  // child's first call replaces the parent's engine, and BridgeFor never
  // returns it.
  bool Inherited() const {
    return generation != g_bridge_generation.load(std::memory_order_relaxed);
  }

  // Runs once RetireBridge has emptied `done` and dropped the Python
  // objects, and the loop has dropped its reader (whose number a new
  // eventfd must not take while the loop's selector still lists it): the
  // last owner may be an I/O thread, without the GIL.
  ~LoopBridge() {
    // The parent's thread may have been growing an inherited `done` at
    // fork, between freeing the old buffer and storing the new one: it is
    // forgotten, not freed.
    if (Inherited()) new (&done) std::vector<Pending*>();
    if (efd >= 0) close(efd);
  }
};

struct Pending {
  std::shared_ptr<LoopBridge> bridge;
  PyObject* future = nullptr;  // strong: an asyncio.Future or a Waiter
  bool waiter = false;         // `future` is a Waiter
  std::vector<Decision> decisions;
  bool inline_done = false;
  // decide_view_async: the view's parts (names, limit, prefix, key,
  // scope; strong) and its clock, made into the view on the loop thread.
  PyObject* view[5] = {};
  double now_seconds = 0;
  Strategy strategy = Strategy::kFixedWindow;  // the view's decision's
  // The limits adapter's single calls (get_async ...): what the result
  // is made of, the answer, and the fail-closed policy's retry-after.
  enum class Single : uint8_t {
    kNone,
    kIncr,
    kRead,
    kAcquire,
    kAcquireStats,
    kClear,   // None, or RaiseStoreUnreachable's error
    kCheck,   // whether Redis answered
    kScan,    // (next cursor, keys), or RaiseStoreUnreachable's error
    kUnlink,  // the keys removed, or RaiseStoreUnreachable's error
    kSlidingStats,
  };
  Single single = Single::kNone;
  RedisStore::SingleAnswer answer;
  int64_t retry_after_nanos = 0;
  WindowRead read = WindowRead::kCount;  // kRead: which
  Limit limit;      // kAcquireStats, kSlidingStats: the window
  int64_t now = 0;  // kSlidingStats: the decision's time

  // Deleted with the GIL held (see LoopBridge for the other case).
  ~Pending() {
    for (PyObject* part : view) Py_XDECREF(part);
  }
};

thread_local Pending* tl_submitting = nullptr;

// Answers for a loop that was closed or collected before they came: they
// hold Python objects (the future, which holds the loop), so the thread
// that got them, without the GIL, leaves them to the next decision made
// with it (ReleaseOrphans). Keeping them on the dead loop's queue instead
// kept that loop, its eventfd and everything its tasks referenced alive
// for good: one per test with pytest-asyncio's loop per test.
std::mutex g_orphans_mu;
std::vector<Pending*> g_orphans;
std::atomic<bool> g_orphans_pending{false};

void Orphan(Pending* p) {
  std::lock_guard<std::mutex> lock(g_orphans_mu);
  g_orphans.push_back(p);
  g_orphans_pending.store(true, std::memory_order_release);
}

// Inside a run of completions (RedisStoreOptions::completions_begin/end):
// the bridges owed a wake-up, signalled once at the end of the run. An
// event loop woken at the first of several replies read together would
// preempt the I/O thread on a shared CPU, resume one task, and send its
// next request alone: batches would shrink to one request each way.
thread_local int tl_run_depth = 0;
// The bridge whose loop is completing requests itself (LoopRead,
// LoopWatch): their answers are resolved right after, without a wake-up.
thread_local LoopBridge* tl_direct = nullptr;
thread_local std::vector<std::shared_ptr<LoopBridge>> tl_owed;

void Signal(int efd) {
  const uint64_t one = 1;
  while (write(efd, &one, sizeof(one)) < 0 && errno == EINTR) {
  }
}

void CompletionsBegin() { ++tl_run_depth; }

void CompletionsEnd() {
  if (--tl_run_depth > 0) return;
  for (const auto& bridge : tl_owed) Signal(bridge->efd);
  tl_owed.clear();
}

// Queues `p` on `bridge` (which `p` holds: the loop may take and delete
// `p` as soon as it is queued, so the caller keeps its own reference).
void PushDone(const std::shared_ptr<LoopBridge>& bridge, Pending* p) {
  LoopBridge* const b = bridge.get();
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(b->mu);
    if (b->dead) {
      Orphan(p);
      return;
    }
    b->done.push_back(p);
    if (tl_direct == b) return;
    if (!b->signaled) {
      b->signaled = true;
      wake = true;
    }
  }
  if (!wake) return;
  if (tl_run_depth > 0) {
    tl_owed.push_back(bridge);
    return;
  }
  Signal(b->efd);
}

// `p` has its answer: to its loop (or to Submit, when it came at once).
void Answered(Pending* p) {
  if (tl_submitting == p) {
    p->inline_done = true;  // resolved by decide_many_async itself
    return;
  }
  std::shared_ptr<LoopBridge> bridge = p->bridge;
  PushDone(bridge, p);
}

void OnAsyncDone(void* context, const Decision* d, size_t written, size_t) {
  auto* p = static_cast<Pending*>(context);
  p->decisions.assign(d, d + written);
  Answered(p);
}

void OnSingleDone(void* context, const RedisStore::SingleAnswer& answer) {
  auto* p = static_cast<Pending*>(context);
  p->answer = answer;
  Answered(p);
}

// acquire_sliding_window_entry_stats' answer for `a`, decided at `now`
// under `l`: (allowed, previous count, previous ttl, current count,
// current ttl, until): the middle four are what get_sliding_window reads
// right after it, and until `until` (the end of the window, epoch
// seconds) with both ttls shortened by the time since. The current count
// is -1 when the answer did not come from Redis's state (the blocked-key
// cache, a failure policy).
PyObject* SlidingStats(const RedisStore::SingleAnswer& a, const Limit& l,
                       int64_t now) {
  const WindowState& w = a.window;
  const bool known = a.has_window;
  return Py_BuildValue(
      "(OLdLdd)", a.decision.allowed ? Py_True : Py_False,
      static_cast<long long>(known ? w.previous_count : 0),
      known ? NanosToSeconds(w.previous_ttl_nanos) : 0.0,
      static_cast<long long>(known ? w.count : -1),
      known ? NanosToSeconds(w.current_ttl_nanos) : 0.0,
      known ? NanosToSeconds(now + w.current_ttl_nanos - l.PeriodNanos())
            : 0.0);
}

// A single call's result as the synchronous method returns it, or the
// fail-closed exception (with Redis's error, if it answered one, as
// `redis_error`, and `timed_out`: no reply came within the timeout).
PyObject* BuildSingle(const Pending* p, bool* is_error) {
  const RedisStore::SingleAnswer& a = p->answer;
  if (p->single == Pending::Single::kCheck) return PyBool_FromLong(a.answered);
  if (p->single == Pending::Single::kClear) {
    if (a.answered) Py_RETURN_NONE;
    *is_error = true;
    return MakeStoreUnreachable("clear");
  }
  if (p->single == Pending::Single::kScan ||
      p->single == Pending::Single::kUnlink) {
    if (!a.answered) {
      *is_error = true;
      return MakeStoreUnreachable("reset");
    }
    if (p->single == Pending::Single::kUnlink) {
      return PyLong_FromLongLong(static_cast<long long>(a.count));
    }
    PyObject* keys = PyList_New(static_cast<Py_ssize_t>(a.keys.size()));
    if (keys == nullptr) return nullptr;
    for (size_t i = 0; i < a.keys.size(); ++i) {
      PyObject* key = PyBytes_FromStringAndSize(
          a.keys[i].data(), static_cast<Py_ssize_t>(a.keys[i].size()));
      if (key == nullptr) {
        Py_DECREF(keys);
        return nullptr;
      }
      PyList_SET_ITEM(keys, static_cast<Py_ssize_t>(i), key);
    }
    PyObject* cursor = PyUnicode_FromStringAndSize(
        a.cursor.data(), static_cast<Py_ssize_t>(a.cursor.size()));
    if (cursor == nullptr) {
      Py_DECREF(keys);
      return nullptr;
    }
    return Py_BuildValue("(NN)", cursor, keys);
  }
  if (a.source == DecisionSource::kFailClosed) {
    *is_error = true;
    const std::string message =
        !a.error.empty() ? "redis answered an error: " + a.error +
                               "; the storage's policy is fail-closed"
        : a.timed_out ? std::string(kTimedOutMessage)
                      : std::string(kFailClosedMessage);
    PyObject* exc = MakeUnavailable(message.c_str(),
                                    static_cast<double>(p->retry_after_nanos) /
                                        static_cast<double>(kNanosPerSecond));
    if (exc == nullptr) return nullptr;
    PyObject* error = PyUnicode_FromStringAndSize(
        a.error.data(), static_cast<Py_ssize_t>(a.error.size()));
    if (error == nullptr ||
        PyObject_SetAttrString(exc, "redis_error", error) < 0 ||
        PyObject_SetAttrString(exc, "timed_out",
                               a.timed_out ? Py_True : Py_False) < 0) {
      Py_XDECREF(error);
      Py_DECREF(exc);
      return nullptr;
    }
    Py_DECREF(error);
    return exc;
  }
  switch (p->single) {
    case Pending::Single::kIncr:
      return Py_BuildValue("(Ld)", static_cast<long long>(a.count),
                           NanosToSeconds(a.expiry_at_nanos));
    case Pending::Single::kRead:
      return ReadResult(p->read, a.window);
    case Pending::Single::kAcquire:
      return PyBool_FromLong(a.decision.allowed);
    case Pending::Single::kAcquireStats:
      return AcquireStats(a.decision, p->limit);
    case Pending::Single::kSlidingStats:
      return SlidingStats(a, p->limit, p->now);
    case Pending::Single::kClear:
    case Pending::Single::kCheck:
    case Pending::Single::kScan:
    case Pending::Single::kUnlink:
    case Pending::Single::kNone:
      break;
  }
  PyErr_SetString(PyExc_RuntimeError, "no answer");
  return nullptr;
}

// decide_view_async's result: the view, or the fail-closed exception.
PyObject* BuildView(const Pending* p, bool* is_error) {
  if (p->decisions.size() != 1) {
    PyErr_SetString(PyExc_RuntimeError, "no decision");
    return nullptr;
  }
  const Decision& d = p->decisions[0];
  if (d.source == DecisionSource::kFailClosed) {
    *is_error = true;
    return MakeUnavailable(d);
  }
  return NewDecisionView(d, p->now_seconds, p->strategy, p->view[0], p->view[1],
                         p->view[2], p->view[3], p->view[4]);
}

// Sets the future's result (or exception); a cancelled future is skipped.
// A waiter's callbacks (the awaiting task's wake-up) run here when
// `direct`; see Waiter for `fatal`.
void Resolve(Pending* p, bool direct, PyObject** fatal) {
  bool is_error = false;
  PyObject* result =
      p->single != Pending::Single::kNone ? BuildSingle(p, &is_error)
      : p->view[0] != nullptr
          ? BuildView(p, &is_error)
          : BuildResult(p->decisions.data(), p->decisions.size(), &is_error);
  if (result == nullptr) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    result = value;
    is_error = true;
    Py_XDECREF(type);
    Py_XDECREF(tb);
  }
  if (p->waiter) {
    auto* w = reinterpret_cast<Waiter*>(p->future);
    w->allowed =
        !is_error && p->decisions.size() == 1 && p->decisions[0].allowed;
    if (WaiterComplete(w, result, is_error)) RunCallbacks(w, direct, fatal);
    return;
  }
  PyObject* rc = PyObject_CallMethodOneArg(
      p->future, is_error ? g_str_set_exception : g_str_set_result, result);
  if (rc == nullptr) {
    PyErr_Clear();  // InvalidStateError: cancelled meanwhile
  } else {
    Py_DECREF(rc);
  }
  Py_XDECREF(result);
}

// `signaled`: woken through the eventfd (the I/O thread's answers), else
// called by the loop right after completing requests itself (tl_direct).
void Drain(LoopBridge* bridge, bool signaled = true) {
  // A loop inherited from the parent wakes for the parent's completions:
  // the eventfd is shared, and reading it would take the wake-up that the
  // parent's loop waits for (its I/O thread writes once per drain).
  if (bridge->Inherited()) return;
  if (signaled) {
    uint64_t value;
    while (read(bridge->efd, &value, sizeof(value)) < 0 && errno == EINTR) {
    }
  }
  std::vector<Pending*> items;
  {
    std::lock_guard<std::mutex> lock(bridge->mu);
    items.swap(bridge->done);
    if (signaled) bridge->signaled = false;
  }
  PyObject* fatal = nullptr;
  for (Pending* p : items) {
    Resolve(p, /*direct=*/true, &fatal);
    Py_DECREF(p->future);
    delete p;
  }
  FlushLogs();
  if (fatal != nullptr) {
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(fatal)), fatal);
    Py_DECREF(fatal);
    throw py::error_already_set();
  }
}

std::mutex g_bridges_mu;
std::unordered_map<PyObject*, std::shared_ptr<LoopBridge>> g_bridges;
// Weak references to retired loops, released later (not from inside
// their own callback).
std::vector<PyObject*> g_dead_refs;

// With the GIL (the Pending objects hold Python objects) and no lock held
// (deleting them may free a loop, which retires its bridge).
void ReleaseOrphans() {
  if (!g_orphans_pending.load(std::memory_order_acquire)) return;
  std::vector<Pending*> items;
  {
    std::lock_guard<std::mutex> lock(g_orphans_mu);
    items.swap(g_orphans);
    g_orphans_pending.store(false, std::memory_order_release);
  }
  for (Pending* p : items) {
    Py_DECREF(p->future);
    delete p;
  }
}

// Forgets `bridge` once its loop is closed (its reader dropped) or
// collected: later answers become orphans, and the answers waiting on it
// are dropped. With the GIL and no lock held; idempotent.
void RetireBridge(const std::shared_ptr<LoopBridge>& bridge) {
  {
    std::lock_guard<std::mutex> lock(g_bridges_mu);
    auto it = g_bridges.find(bridge->loop);
    if (it != g_bridges.end() && it->second == bridge) g_bridges.erase(it);
    if (bridge->weakref != nullptr) g_dead_refs.push_back(bridge->weakref);
    bridge->weakref = nullptr;
  }
  // An inherited bridge's answers are the parent's (and its lock may have
  // been held at fork): they stay where they are.
  std::vector<Pending*> items;
  if (!bridge->Inherited()) {
    std::lock_guard<std::mutex> lock(bridge->mu);
    bridge->dead = true;
    items.swap(bridge->done);
  }
  // A completion may hold the last reference to the bridge and release it
  // on the I/O thread, without the GIL: drop the Python objects (and
  // stores) it keeps now, while the GIL is held.
  bridge->flush_callback = py::object();
  bridge->driven.clear();
  std::vector<std::shared_ptr<Store>> stores;
  stores.swap(bridge->to_flush);
  stores.clear();
  for (Pending* p : items) {
    Py_DECREF(p->future);
    delete p;
  }
}

// Called when a loop with a bridge is collected.
PyObject* OnLoopCollected(PyObject*, PyObject* ref) {
  std::shared_ptr<LoopBridge> bridge;
  {
    std::lock_guard<std::mutex> lock(g_bridges_mu);
    for (auto it = g_bridges.begin(); it != g_bridges.end(); ++it) {
      if (it->second->weakref == ref) {
        bridge = it->second;
        break;
      }
    }
  }
  // Not found: retired when the loop was closed, which handed `ref` over.
  if (bridge != nullptr) RetireBridge(bridge);
  Py_RETURN_NONE;
}

// Owned by the loop's reader callback, which a loop drops when it is
// closed (asyncio and uvloop alike), or when it is collected. It keeps the
// bridge, and so its eventfd, open as long as the loop lists the reader.
struct ReaderGuard {
  std::shared_ptr<LoopBridge> bridge;
  ~ReaderGuard() { RetireBridge(bridge); }
};

PyMethodDef kOnLoopCollected = {"_rapidlimit_loop_collected", OnLoopCollected,
                                METH_O, nullptr};

std::shared_ptr<LoopBridge> BridgeForSlow(PyObject* loop);

// ------------------------------------------------- loop-driven connection

// A descriptor closed with its owner: the reader callback that watches it.
struct OwnedFd {
  int fd;
  explicit OwnedFd(int f) : fd(f) {}
  ~OwnedFd() {
    if (fd >= 0) close(fd);
  }
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;
};

void Unwatch(LoopBridge* b, DrivenStore* d) {
  if (!d->watching) return;
  d->watching = false;
  const int fd = d->io.fd;
  d->io = RedisStore::LoopConnection();
  // Drops the reader's callback, whose OwnedFd closes the duplicate (after
  // this callback returns, when it is the one running).
  py::handle(b->loop).attr("remove_reader")(fd);
}

// Sets tl_direct for its scope.
class DirectCompletions {
 public:
  explicit DirectCompletions(LoopBridge* b) { tl_direct = b; }
  ~DirectCompletions() { tl_direct = nullptr; }
  DirectCompletions(const DirectCompletions&) = delete;
  DirectCompletions& operator=(const DirectCompletions&) = delete;
};

void LoopReadable(const std::weak_ptr<LoopBridge>& weak_bridge,
                  const std::weak_ptr<DrivenStore>& weak_driven) {
  std::shared_ptr<LoopBridge> b = weak_bridge.lock();
  std::shared_ptr<DrivenStore> d = weak_driven.lock();
  if (b == nullptr || b->Inherited() || d == nullptr || !d->watching) return;
  auto* store = static_cast<RedisStore*>(d->store.get());
  bool keep;
  {
    DirectCompletions direct(b.get());
    keep = store->LoopRead(d->io.generation);
  }
  if (!keep) Unwatch(b.get(), d.get());
  Drain(b.get(), /*signaled=*/false);
}

// Acts on what RedisStore::LoopWatch answered: the deadline check again in
// `next` nanoseconds, none while nothing is in flight (0), or no more
// watching (-1).
void FollowWatch(LoopBridge* b, DrivenStore* d, int64_t next) {
  if (next < 0) Unwatch(b, d);
  if (next <= 0) return;
  py::handle(b->loop).attr("call_later")(static_cast<double>(next) / 1e9,
                                         d->watchdog_callback);
  d->watchdog_armed = true;
}

void LoopWatchdog(const std::weak_ptr<LoopBridge>& weak_bridge,
                  const std::weak_ptr<DrivenStore>& weak_driven) {
  std::shared_ptr<LoopBridge> b = weak_bridge.lock();
  std::shared_ptr<DrivenStore> d = weak_driven.lock();
  if (b == nullptr || b->Inherited() || d == nullptr) return;
  d->watchdog_armed = false;
  if (!d->watching) return;
  auto* store = static_cast<RedisStore*>(d->store.get());
  int64_t next;
  {
    DirectCompletions direct(b.get());
    next = store->LoopWatch(d->io.generation);
  }
  FollowWatch(b.get(), d.get(), next);
  Drain(b.get(), /*signaled=*/false);
}

// Watches connection `c` of `d`'s store: a duplicate of its socket in the
// loop's selector.
void Watch(const std::shared_ptr<LoopBridge>& b,
           const std::shared_ptr<DrivenStore>& d,
           const RedisStore::LoopConnection& c) {
  const int dup = fcntl(c.fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    throw py::error_already_set();
  }
  auto owned = std::make_shared<OwnedFd>(dup);
  std::weak_ptr<LoopBridge> weak_bridge = b;
  std::weak_ptr<DrivenStore> weak_driven = d;
  py::cpp_function readable([weak_bridge, weak_driven, owned]() {
    LoopReadable(weak_bridge, weak_driven);
  });
  py::handle(b->loop).attr("add_reader")(dup, readable);
  d->io.fd = dup;
  d->io.generation = c.generation;
  d->watching = true;
}

// The loop's entry for store `s`, made if there is room: entries of
// stores whose connection the loop no longer watches (closed, or their
// connection lost: a new entry watches the new one), or that nothing but
// the entry holds any more (the app dropped them), give way first.
std::shared_ptr<DrivenStore> DrivenFor(const std::shared_ptr<LoopBridge>& b,
                                       const std::shared_ptr<Store>& s) {
  for (const auto& d : b->driven) {
    if (d->store == s) return d;
  }
  auto& all = b->driven;
  for (size_t i = all.size(); i-- > 0;) {
    if (!all[i]->watching || all[i]->store.use_count() == 1) {
      Unwatch(b.get(), all[i].get());
      all.erase(all.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }
  if (all.size() >= kMaxDrivenStores) return nullptr;
  auto d = std::make_shared<DrivenStore>();
  d->store = s;
  std::weak_ptr<LoopBridge> weak_bridge = b;
  std::weak_ptr<DrivenStore> weak_driven = d;
  d->watchdog_callback = py::cpp_function(
      [weak_bridge, weak_driven]() { LoopWatchdog(weak_bridge, weak_driven); });
  all.push_back(d);
  return d;
}

// Sends what `store` queued this iteration from the loop thread when its
// connection is idle, else wakes its I/O thread (Flush).
void FlushFromLoop(const std::shared_ptr<LoopBridge>& b,
                   const std::shared_ptr<Store>& s) {
  auto* store = static_cast<RedisStore*>(s.get());
  // The loop drives up to kMaxDrivenStores stores' connections, the
  // others' I/O threads send.
  const std::shared_ptr<DrivenStore> d = DrivenFor(b, s);
  if (d == nullptr) {
    store->Flush();
    return;
  }
  RedisStore::LoopConnection c = d->io;
  RedisStore::LoopResult r = store->LoopFlush(&c);
  if (r == RedisStore::LoopResult::kNewConnection) {
    Unwatch(b.get(), d.get());
    try {
      Watch(b, d, c);
    } catch (...) {
      store->Flush();
      throw;
    }
    r = store->LoopFlush(&c);
  }
  if (r != RedisStore::LoopResult::kSent) {
    store->Flush();
    return;
  }
  if (!d->watchdog_armed) {
    FollowWatch(b.get(), d.get(), store->LoopWatch(d->io.generation));
  }
}

// The bridge for `loop`, created (and registered with add_reader) on first
// use. Called with the GIL, on the loop's thread.
std::shared_ptr<LoopBridge> BridgeFor(PyObject* loop) {
  // The last loop's bridge, without the global lock and the map: one loop per
  // thread is the usual case. A weak pointer, so that the thread's exit
  // never destroys a bridge (that needs the GIL).
  thread_local PyObject* tl_loop = nullptr;
  thread_local std::weak_ptr<LoopBridge> tl_bridge;
  if (loop == tl_loop) {
    std::shared_ptr<LoopBridge> last = tl_bridge.lock();
    if (last != nullptr && !last->Inherited()) {
      // A bridge outlives its loop while answers are in flight: a new
      // loop at the collected one's address must not take it (its weak
      // reference may be gone too).
      std::lock_guard<std::mutex> lock(last->mu);
      if (!last->dead) return last;
    }
  }
  std::shared_ptr<LoopBridge> found = BridgeForSlow(loop);
  tl_loop = loop;
  tl_bridge = found;
  return found;
}

std::shared_ptr<LoopBridge> BridgeForSlow(PyObject* loop) {
  std::shared_ptr<LoopBridge> inherited;
  {
    std::lock_guard<std::mutex> lock(g_bridges_mu);
    auto it = g_bridges.find(loop);
    if (it != g_bridges.end()) {
      if (!it->second->Inherited()) return it->second;
      inherited = it->second;
    }
  }
  // A loop used before fork(), now used in the child: a bridge of its own
  // beside the parent's (whose reader stays, and does nothing here).
  if (inherited != nullptr) RetireBridge(inherited);
  std::vector<PyObject*> dead;
  {
    std::lock_guard<std::mutex> lock(g_bridges_mu);
    dead.swap(g_dead_refs);
  }
  for (PyObject* ref : dead) Py_DECREF(ref);
  auto bridge = std::make_shared<LoopBridge>();
  bridge->loop = loop;
  bridge->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (bridge->efd < 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    throw py::error_already_set();
  }
  std::weak_ptr<LoopBridge> weak = bridge;
  auto guard = std::make_shared<ReaderGuard>();
  guard->bridge = bridge;
  py::cpp_function drain([guard]() { Drain(guard->bridge.get()); });
  guard.reset();
  py::handle(loop).attr("add_reader")(bridge->efd, drain);
  bridge->flush_callback = py::cpp_function([weak]() {
    if (auto b = weak.lock()) {
      std::vector<std::shared_ptr<Store>> stores;
      stores.swap(b->to_flush);
      // Every store is flushed, whatever one of them raised: the others'
      // requests would otherwise wait for their timeout.
      std::exception_ptr first;
      for (auto& s : stores) {
        try {
          FlushFromLoop(b, s);
        } catch (...) {
          if (!first) first = std::current_exception();
        }
      }
      if (first) std::rethrow_exception(first);
    }
  });
  PyObject* callback = PyCFunction_New(&kOnLoopCollected, nullptr);
  if (callback == nullptr) throw py::error_already_set();
  bridge->weakref = PyWeakref_NewRef(loop, callback);
  Py_DECREF(callback);
  if (bridge->weakref == nullptr) throw py::error_already_set();
  std::lock_guard<std::mutex> lock(g_bridges_mu);
  g_bridges[loop] = bridge;
  return bridge;
}

// Queues `p` (new, owned from here on) by `send(p)`, which hands the
// store its call, and returns the future the loop's reader completes; null
// with a Python error set. With `waiter`, a Waiter instead of an
// asyncio.Future, given `finish` (five objects, see Waiter) when not null.
// `running`: the running loop (a reference this call takes) when the
// caller has it already, else null (each look-up costs a getpid).
template <typename Send>
PyObject* SubmitWith(RedisStorageHandle* storage, Pending* p, bool waiter,
                     PyObject* const* finish, Send send,
                     PyObject* running = nullptr) {
  std::unique_ptr<Pending> owned(p);
  ReleaseOrphans();
  PyObject* loop =
      running != nullptr ? running : PyObject_CallNoArgs(g_get_running_loop);
  if (loop == nullptr) {
    if (PyErr_ExceptionMatches(PyExc_RuntimeError)) {
      // trio (hypercorn --worker-class trio) runs no asyncio loop.
      PyErr_Clear();
      PyErr_SetString(PyExc_RuntimeError,
                      "RedisStorage's async decisions need a running asyncio "
                      "event loop; elsewhere (trio) call decide_many in a "
                      "worker thread, e.g. anyio.to_thread.run_sync");
    }
    return nullptr;
  }
  std::shared_ptr<LoopBridge> bridge;
  try {
    bridge = BridgeFor(loop);
  } catch (py::error_already_set& e) {
    Py_DECREF(loop);
    e.restore();
    return nullptr;
  }
  py::object loop_ref = py::reinterpret_steal<py::object>(loop);
  PyObject* future = waiter
                         ? reinterpret_cast<PyObject*>(NewWaiter(loop))
                         : PyObject_CallMethodNoArgs(loop, g_str_create_future);
  if (future == nullptr) return nullptr;
  p->waiter = waiter;
  if (finish != nullptr) {
    auto* w = reinterpret_cast<Waiter*>(future);
    for (int i = 0; i < 5; ++i) {
      Py_INCREF(finish[i]);
      w->finish[i] = finish[i];
    }
  }
  p->bridge = std::move(bridge);
  // Queued without waking the I/O thread; one callback at the end of this
  // loop iteration wakes it, so that all the commands the loop's tasks
  // issue in one iteration leave in one write.
  LoopBridge* b = p->bridge.get();
  if (b->to_flush.empty()) {
    PyObject* rc = PyObject_CallMethodOneArg(loop, g_str_call_soon,
                                             b->flush_callback.ptr());
    if (rc == nullptr) {
      Py_DECREF(future);
      return nullptr;
    }
    Py_DECREF(rc);
  }
  if (b->to_flush.empty() || b->to_flush.back() != storage->store) {
    b->to_flush.push_back(storage->store);
  }
  p->future = future;
  Py_INCREF(future);  // one for the caller, one for the completion
  owned.release();
  tl_submitting = p;
  send(p);
  tl_submitting = nullptr;
  if (p->inline_done) {
    // Answered without Redis (blocked-key cache, or Redis down): the
    // future is done before the caller awaits it.
    Resolve(p, /*direct=*/false, nullptr);
    Py_DECREF(p->future);
    delete p;
  }
  return future;
}

// SubmitWith for the decisions of `requests`.
PyObject* Submit(RedisStorageHandle* storage, const Request* requests, size_t n,
                 int64_t now, Mode mode, Pending* p, bool waiter,
                 PyObject* const* finish = nullptr,
                 PyObject* running = nullptr) {
  return SubmitWith(
      storage, p, waiter, finish,
      [&](Pending* q) {
        storage->redis->DecideAsyncDeferred(requests, n, now, mode,
                                            &OnAsyncDone, q);
      },
      running);
}

// SubmitWith for a single call of the limits adapter, answered as `kind`.
template <typename Send>
PyObject* SubmitSingle(RedisStorageHandle* storage, Pending::Single kind,
                       Send send, const Limit* limit = nullptr,
                       WindowRead read = WindowRead::kCount, int64_t now = 0) {
  auto* p = new Pending;
  p->single = kind;
  p->read = read;
  p->now = now;
  if (limit != nullptr) p->limit = *limit;
  p->retry_after_nanos =
      storage->redis->options().fail_closed_retry_after_nanos;
  return SubmitWith(storage, p, /*waiter=*/true, nullptr, [&](Pending* q) {
    send(&OnSingleDone, static_cast<void*>(q));
  });
}

// decide_many_async(strategy, requests, now=None, test=False)
//     -> asyncio.Future[list[Decision]]
PyObject* DecideManyAsync(PyObject* self, PyObject* const* args,
                          Py_ssize_t nargsf, PyObject* kwnames) {
  FlushLogs();
  Call call;
  if (!ParseCall(self, args, nargsf, kwnames, "decide_many_async", &call)) {
    return nullptr;
  }
  return Submit(call.storage, call.requests->data(), call.requests->size(),
                call.now, call.test ? Mode::kTest : Mode::kHit, new Pending,
                /*waiter=*/false);
}

// decide_view_async's work once `now` is read: `args` as its 14 (or,
// without `finish`, 9) arguments, whose `now` is not read again. `running`
// as SubmitWith's.
PyObject* ViewAsync(RedisStorageHandle* storage, PyObject* const* args,
                    bool finish, double now_seconds, int64_t now,
                    PyObject* running) {
  py::object loop_ref = py::reinterpret_steal<py::object>(running);
  Strategy strategy;
  if (!StrategyFromPython(args[0], &strategy)) return nullptr;
  auto* item = static_cast<ItemHandle*>(
      UnwrapFast(args[1], g_item_type, "RateLimitItem"));
  if (item == nullptr) return nullptr;
  int64_t cost = 0;
  if (!CostFromPython(args[4], &cost) || !ViewNamesReady(args[6]) ||
      !CheckStrategyLimit(strategy, item->limit)) {
    return nullptr;
  }
  PyObject* key = args[2];
  PyObject* scope = args[3];
  PyObject* prefix = args[8];
  const int has_prefix = PrefixIsSet(prefix);
  if (has_prefix < 0) return nullptr;
  PyObject* const ids[3] = {prefix, key, scope};
  thread_local std::string key_text;
  if (!BuildKey(*item, has_prefix ? ids : ids + 1, has_prefix ? 3 : 2,
                &key_text)) {
    return nullptr;
  }
  Request r;
  r.strategy = strategy;
  r.limit = &item->limit;
  r.key = key_text;
  r.cost = cost;
  auto* p = new Pending;
  PyObject* const parts[5] = {args[6], args[7], prefix, key, scope};
  for (int i = 0; i < 5; ++i) {
    Py_INCREF(parts[i]);
    p->view[i] = parts[i];
  }
  p->now_seconds = now_seconds;
  p->strategy = strategy;
  return Submit(storage, &r, 1, now, Mode::kHit, p, /*waiter=*/true,
                finish ? args + 9 : nullptr, loop_ref.release().ptr());
}

// decide_view_async(strategy, item, key, scope, cost, now, names, limit,
//                   prefix) -> asyncio.Future[view]
PyObject* DecideViewAsync(PyObject* self, PyObject* const* args,
                          Py_ssize_t nargsf, PyObject* kwnames) {
  FlushLogs();
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if ((nargs != 9 && nargs != 14) ||
      (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_SetString(PyExc_TypeError,
                    "decide_view_async(strategy, item, key, scope, cost, now, "
                    "names, limit, prefix[, state, view_key, limiter, conn, "
                    "plan]) takes 9 or 14 positional arguments");
    return nullptr;
  }
  if (nargs == 14 && !PyDict_Check(args[9])) {
    PyErr_SetString(PyExc_TypeError, "state must be a dict");
    return nullptr;
  }
  auto* storage = static_cast<RedisStorageHandle*>(
      UnwrapFast(self, g_redis_type, "RedisStorage"));
  if (storage == nullptr) return nullptr;
  double now_seconds = 0;
  int64_t now = 0;
  if (!ViewNowFromPython(args[5], &now_seconds, &now)) return nullptr;
  return ViewAsync(storage, args, nargs == 14, now_seconds, now, nullptr);
}

// The limits adapter's calls from an event loop (limits.aio): awaitables
// resolving to what the synchronous method of the same name returns,
// without a thread; fail-closed raises RedisUnavailableError instead
// (`redis_error`: Redis's error, when it answered one).
void BindSingleCalls(py::class_<RedisStorageHandle, StorageHandle>& cls) {
  using Single = Pending::Single;
  // The read `read` of `key`'s state (see ReadRequest).
  auto inspect = [](RedisStorageHandle& h, WindowRead read,
                    const std::string& key, int64_t limit, double expiry,
                    const py::object& now) {
    FlushLogs();
    Limit l;
    const Request r = ReadRequest(read, key, limit, expiry, &l);
    const int64_t t = NowArg(now);
    return Steal(SubmitSingle(
        &h, Single::kRead,
        [&](auto done, void* context) {
          h.redis->InspectDeferred(r, t, done, context);
        },
        nullptr, read));
  };
  auto acquire = [](RedisStorageHandle& h, Single kind, Strategy strategy,
                    const std::string& key, int64_t limit, double expiry,
                    int64_t amount, const py::object& now) {
    FlushLogs();
    Limit l;
    const Request r = AcquireRequest(strategy, key, limit, expiry, amount, &l);
    const int64_t t = NowArg(now);
    return Steal(SubmitSingle(
        &h, kind,
        [&](auto done, void* context) {
          h.redis->DecideOneDeferred(r, t, done, context);
        },
        &l, WindowRead::kCount, t));
  };
  auto clear = [](RedisStorageHandle& h, const Strategy* strategies, size_t n,
                  const std::string& key) {
    FlushLogs();
    return Steal(
        SubmitSingle(&h, Single::kClear, [&](auto done, void* context) {
          h.redis->ClearDeferred(strategies, n, key, done, context);
        }));
  };
  cls.def(
         "incr_expiry_async",
         [](RedisStorageHandle& h, const std::string& key, double expiry,
            int64_t amount, const py::object& now) {
           FlushLogs();
           CheckExpiry(expiry, 0);
           const int64_t t = NowArg(now);
           return Steal(
               SubmitSingle(&h, Single::kIncr, [&](auto done, void* context) {
                 h.redis->IncrDeferred(key, SecondsToNanos(expiry), amount, t,
                                       done, context);
               }));
         },
         py::arg("key"), py::arg("expiry"), py::arg("amount") = 1,
         py::arg("now") = py::none())
      .def(
          "get_async",
          [inspect](RedisStorageHandle& h, const std::string& key,
                    const py::object& now) {
            return inspect(h, WindowRead::kCount, key, 0, 0, now);
          },
          py::arg("key"), py::arg("now") = py::none())
      .def(
          "get_expiry_async",
          [inspect](RedisStorageHandle& h, const std::string& key,
                    const py::object& now) {
            return inspect(h, WindowRead::kExpiry, key, 0, 0, now);
          },
          py::arg("key"), py::arg("now") = py::none())
      .def(
          "acquire_entry_async",
          [acquire](RedisStorageHandle& h, const std::string& key,
                    int64_t limit, double expiry, int64_t amount,
                    const py::object& now) {
            return acquire(h, Single::kAcquire, Strategy::kMovingWindow, key,
                           limit, expiry, amount, now);
          },
          py::arg("key"), py::arg("limit"), py::arg("expiry"),
          py::arg("amount") = 1, py::arg("now") = py::none())
      .def(
          "acquire_entry_stats_async",
          [acquire](RedisStorageHandle& h, const std::string& key,
                    int64_t limit, double expiry, int64_t amount,
                    const py::object& now) {
            return acquire(h, Single::kAcquireStats, Strategy::kMovingWindow,
                           key, limit, expiry, amount, now);
          },
          py::arg("key"), py::arg("limit"), py::arg("expiry"),
          py::arg("amount") = 1, py::arg("now") = py::none())
      .def(
          "get_moving_window_async",
          [inspect](RedisStorageHandle& h, const std::string& key,
                    int64_t limit, double expiry, const py::object& now) {
            return inspect(h, WindowRead::kMovingWindow, key, limit, expiry,
                           now);
          },
          py::arg("key"), py::arg("limit"), py::arg("expiry"),
          py::arg("now") = py::none())
      .def(
          "acquire_sliding_window_entry_async",
          [acquire](RedisStorageHandle& h, const std::string& key,
                    int64_t limit, double expiry, int64_t amount,
                    const py::object& now) {
            return acquire(h, Single::kAcquire, Strategy::kSlidingWindowCounter,
                           key, limit, expiry, amount, now);
          },
          py::arg("key"), py::arg("limit"), py::arg("expiry"),
          py::arg("amount") = 1, py::arg("now") = py::none())
      .def(
          "acquire_sliding_window_entry_stats",
          [](RedisStorageHandle& h, const std::string& key, int64_t limit,
             double expiry, int64_t amount, const py::object& now) {
            FlushLogs();
            Limit l;
            const Request r = AcquireRequest(Strategy::kSlidingWindowCounter,
                                             key, limit, expiry, amount, &l);
            const int64_t t = NowArg(now);
            const RedisStore::SingleAnswer a = h.redis->DecideOne(r, t);
            FlushLogs();
            return Steal(SlidingStats(a, l, t));
          },
          py::arg("key"), py::arg("limit"), py::arg("expiry"),
          py::arg("amount") = 1, py::arg("now") = py::none())
      .def(
          "acquire_sliding_window_entry_stats_async",
          [acquire](RedisStorageHandle& h, const std::string& key,
                    int64_t limit, double expiry, int64_t amount,
                    const py::object& now) {
            return acquire(h, Single::kSlidingStats,
                           Strategy::kSlidingWindowCounter, key, limit, expiry,
                           amount, now);
          },
          py::arg("key"), py::arg("limit"), py::arg("expiry"),
          py::arg("amount") = 1, py::arg("now") = py::none())
      .def(
          "get_sliding_window_async",
          [inspect](RedisStorageHandle& h, const std::string& key,
                    double expiry, const py::object& now) {
            return inspect(h, WindowRead::kSlidingWindow, key, 0, expiry, now);
          },
          py::arg("key"), py::arg("expiry"), py::arg("now") = py::none())
      .def(
          "clear_async",
          [clear](RedisStorageHandle& h, const std::string& key) {
            return clear(h, kStrategies, std::size(kStrategies), key);
          },
          py::arg("key"))
      .def(
          "clear_sliding_window_async",
          [clear](RedisStorageHandle& h, const std::string& key, double) {
            static constexpr Strategy kSliding[] = {
                Strategy::kSlidingWindowCounter};
            return clear(h, kSliding, 1, key);
          },
          py::arg("key"), py::arg("expiry"))
      .def("check_async",
           [](RedisStorageHandle& h) {
             FlushLogs();
             return Steal(SubmitSingle(&h, Single::kCheck,
                                       [&](auto done, void* context) {
                                         h.redis->PingDeferred(done, context);
                                       }));
           })
      .def("forget_in_process",
           [](RedisStorageHandle& h) { h.redis->ForgetInProcess(); })
      .def(
          "scan_async",
          [](RedisStorageHandle& h, const std::string& cursor) {
            FlushLogs();
            return Steal(
                SubmitSingle(&h, Single::kScan, [&](auto done, void* context) {
                  h.redis->ScanDeferred(cursor, done, context);
                }));
          },
          py::arg("cursor"))
      .def(
          "unlink_async",
          [](RedisStorageHandle& h, const std::vector<std::string>& keys) {
            FlushLogs();
            // UNLINK needs a key: Redis's error would read as an outage.
            if (keys.empty()) throw py::value_error("unlink_async: no keys");
            return Steal(SubmitSingle(
                &h, Single::kUnlink, [&](auto done, void* context) {
                  h.redis->UnlinkDeferred(keys, done, context);
                }));
          },
          py::arg("keys"));
}

#endif  // RAPIDLIMIT_HAVE_HIREDIS

std::string SourceName(DecisionSource s) {
  switch (s) {
    case DecisionSource::kStore:
      return "redis";
    case DecisionSource::kCache:
      return "cache";
    case DecisionSource::kFallback:
      return "fallback";
    case DecisionSource::kFailOpen:
      return "fail-open";
    case DecisionSource::kFailClosed:
      return "fail-closed";
  }
  return "unknown";
}

PyMethodDef kFastMethods[] = {
    {"decide_many",
     reinterpret_cast<PyCFunction>(
         reinterpret_cast<void (*)()>(DecideManySync)),
     METH_FASTCALL | METH_KEYWORDS,
     "decide_many(strategy, requests, now=None, test=False) -> "
     "list[Decision]\n\n"
     "RateLimiter.decide_many on this storage, for a strategy name or a "
     "RateLimiter; waits with the GIL released. Raises "
     "RedisUnavailableError (with retry_after) when Redis cannot answer and "
     "the policy is fail-closed."},
#ifdef RAPIDLIMIT_HAVE_HIREDIS
    {"decide_many_async",
     reinterpret_cast<PyCFunction>(
         reinterpret_cast<void (*)()>(DecideManyAsync)),
     METH_FASTCALL | METH_KEYWORDS,
     "decide_many_async(strategy, requests, now=None, test=False) -> "
     "asyncio.Future[list[Decision]]\n\n"
     "The same, without blocking the running event loop: the future is "
     "completed from the loop (eventfd + add_reader) when Redis answers."},
    {"decide_view_async",
     reinterpret_cast<PyCFunction>(
         reinterpret_cast<void (*)()>(DecideViewAsync)),
     METH_FASTCALL | METH_KEYWORDS,
     "decide_view_async(strategy, item, key, scope, cost, now, names, "
     "limit, prefix[, state, view_key, limiter, conn, plan]) -> "
     "RedisWaiter[view]\n\n"
     "RateLimiter.decide_view on this storage, awaitable like "
     "decide_many_async (a future-like RedisWaiter). Raises "
     "RedisUnavailableError (through the waiter) when Redis cannot answer "
     "and the policy is fail-closed. With the five extra arguments (the "
     "decorator's check), the view is stored as state[view_key] and an "
     "allowed view is the result; a rejection or an error gives what "
     "limiter._finish_endpoint(view, exc, conn, plan) returns or raises."},
#endif
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

bool IsRedisStorage(PyObject* storage) {
#ifdef RAPIDLIMIT_HAVE_HIREDIS
  return g_redis_type != nullptr && PyObject_TypeCheck(storage, g_redis_type);
#else
  (void)storage;
  return false;  // no awaitable decisions to make
#endif
}

bool IsRedisWaiter(PyObject* obj) {
#ifdef RAPIDLIMIT_HAVE_HIREDIS
  return g_waiter_type != nullptr && Py_TYPE(obj) == g_waiter_type;
#else
  (void)obj;
  return false;
#endif
}

PyObject* RunningAsyncioLoop() {
  PyObject* loop = PyObject_CallNoArgs(g_get_running_loop);
  if (loop == nullptr && PyErr_ExceptionMatches(PyExc_RuntimeError)) {
    PyErr_Clear();
  }
  return loop;
}

PyObject* DecideViewWaiter(PyObject* storage, PyObject* loop,
                           PyObject* const* args, double now_seconds,
                           int64_t now) {
#ifdef RAPIDLIMIT_HAVE_HIREDIS
  FlushLogs();
  auto* handle = static_cast<RedisStorageHandle*>(
      UnwrapFast(storage, g_redis_type, "RedisStorage"));
  if (handle == nullptr) {
    Py_DECREF(loop);
    return nullptr;
  }
  return ViewAsync(handle, args, /*finish=*/true, now_seconds, now, loop);
#else
  (void)storage;
  (void)args;
  (void)now_seconds;
  (void)now;
  Py_DECREF(loop);
  PyErr_SetString(PyExc_RuntimeError, "built without Redis support");
  return nullptr;
#endif
}

bool RaiseIfFailClosed(const Decision& d) {
  if (d.source != DecisionSource::kFailClosed) return false;
  PyObject* exc = MakeUnavailable(d);
  if (exc != nullptr) {
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
    Py_DECREF(exc);
  }
  return true;
}

// The locks I/O threads take without the GIL (the log queue's, and the
// orphaned completions' with hiredis). A fork while one is held would leave
// the child's copy locked forever (the thread does not exist there), and
// the child's first log line (its new connection) would hang it: gunicorn
// --preload workers, multiprocessing. The forking thread takes them around
// fork(), so the child gets them free and the queues whole; the log
// records queued so far are the parent's to forward, not the child's. The
// loop bridges' locks, taken so too, are not held: one per loop, and the
// child never takes those of the bridges it inherits (LoopBridge::Inherited).
void LockForFork() {
  g_log_mu.lock();
#ifdef RAPIDLIMIT_HAVE_HIREDIS
  g_orphans_mu.lock();
#endif
}

void UnlockAfterFork() {
#ifdef RAPIDLIMIT_HAVE_HIREDIS
  g_orphans_mu.unlock();
#endif
  g_log_mu.unlock();
}

void RegisterAtFork() {
  pthread_atfork(&LockForFork, &UnlockAfterFork, [] {
    g_log_queue.clear();
    g_log_pending.store(false, std::memory_order_relaxed);
#ifdef RAPIDLIMIT_HAVE_HIREDIS
    g_bridge_generation.fetch_add(1, std::memory_order_relaxed);
#endif
    UnlockAfterFork();
  });
}

PyObject* MakeStoreUnreachable(const char* what) {
  const std::string message =
      std::string("redis did not answer every command of the storage's ") +
      what + ": it may be only partly done";
  // No Retry-After applies: this is no request's answer.
  return MakeUnavailable(message.c_str(), 0.0);
}

void RaiseStoreUnreachable(const char* what) {
  PyObject* exc = MakeStoreUnreachable(what);
  if (exc != nullptr) {
    PyErr_SetObject(g_unavailable, exc);
    Py_DECREF(exc);
  }
  throw py::error_already_set();
}

void BindRedis(py::module_& m) {
  RegisterAtFork();
  g_item_type =
      reinterpret_cast<PyTypeObject*>(py::type::of<ItemHandle>().ptr());
  g_limiter_type =
      reinterpret_cast<PyTypeObject*>(py::type::of<LimiterHandle>().ptr());
  g_str_set_result = PyUnicode_InternFromString("set_result");
  g_str_set_exception = PyUnicode_InternFromString("set_exception");
  g_str_create_future = PyUnicode_InternFromString("create_future");
  g_str_call_soon = PyUnicode_InternFromString("call_soon");
#ifdef RAPIDLIMIT_HAVE_HIREDIS
  g_str_call_exception_handler =
      PyUnicode_InternFromString("call_exception_handler");
  g_str_context = PyUnicode_InternFromString("context");
  g_context_kwnames = PyTuple_Pack(1, g_str_context);
  g_str_finish_endpoint = PyUnicode_InternFromString("_finish_endpoint");
  {
    py::module_ asyncio = py::module_::import("asyncio");
    g_cancelled_error =
        py::object(asyncio.attr("CancelledError")).release().ptr();
    g_invalid_state =
        py::object(asyncio.attr("InvalidStateError")).release().ptr();
  }
  g_waiter_type = MakeWaiterType();
  Py_INCREF(g_waiter_type);
  m.add_object("RedisWaiter", py::reinterpret_borrow<py::object>(
                                  reinterpret_cast<PyObject*>(g_waiter_type)));
#endif
  g_get_running_loop =
      py::object(py::module_::import("asyncio").attr("get_running_loop"))
          .release()
          .ptr();

  g_unavailable = PyErr_NewExceptionWithDoc(
      "rapidlimit._core.RedisUnavailableError",
      "Redis could not answer in time: for a decision, when the storage's "
      "policy is fail-closed (answer 503 with Retry-After = retry_after "
      "seconds); for reset(), clear() and len(), whatever the policy "
      "(retry_after 0).",
      PyExc_ConnectionError, nullptr);
  if (g_unavailable == nullptr) throw py::error_already_set();
  Py_INCREF(g_unavailable);
  m.add_object("RedisUnavailableError",
               py::reinterpret_steal<py::object>(g_unavailable));

  m.def("redis_available", &RedisStoreAvailable,
        "Whether this build has the Redis storage (hiredis was found).");

  py::class_<RedisStorageHandle, StorageHandle> cls(m, "RedisStorage");
  cls.def(py::init([](const std::string& uri, const py::kwargs& kwargs) {
            RedisStoreOptions o;
            std::string error;
            if (!ParseRedisUri(uri, &o, &error)) throw py::value_error(error);
            const std::string shown = RedactRedisUri(uri);
            for (auto item : kwargs) {
              const std::string name = py::str(item.first);
              py::handle value = item.second;
              if (value.is_none()) continue;
              std::string text;
              if (PyBool_Check(value.ptr())) {
                text = value.ptr() == Py_True ? "true" : "false";
              } else {
                text = py::str(value);
              }
              if (!ApplyRedisOption(name, text, &o, &error)) {
                throw py::value_error(error + " (storage uri '" + shown + "')");
              }
            }
            o.before_blocking = &ReleaseGil;
            o.after_blocking = &ReacquireGil;
#ifdef RAPIDLIMIT_HAVE_HIREDIS
            o.completions_begin = &CompletionsBegin;
            o.completions_end = &CompletionsEnd;
#endif
            o.log = &QueueLog;
            std::unique_ptr<RedisStore> store;
            {
              py::gil_scoped_release release;
              store = NewRedisStore(o, &error);
            }
            if (store == nullptr) {
              throw py::value_error("cannot use storage uri '" + shown +
                                    "': " + error);
            }
            RedisStorageHandle h;
            h.redis = store.get();
            h.store = std::shared_ptr<Store>(std::move(store));
            h.uri = shown;
            {
              std::lock_guard<std::mutex> lock(g_registry_mu);
              g_registry.erase(
                  std::remove_if(g_registry.begin(), g_registry.end(),
                                 [](const auto& w) { return w.expired(); }),
                  g_registry.end());
              g_registry.push_back(h.store);
            }
            FlushLogs();
            return h;
          }),
          py::arg("uri"))
      .def_property_readonly("uri",
                             [](const RedisStorageHandle& h) { return h.uri; })
      .def_property_readonly("on_error",
                             [](const RedisStorageHandle& h) {
                               return std::string(RedisFailurePolicyName(
                                   h.redis->options().on_error));
                             })
      .def_property_readonly("connected",
                             [](const RedisStorageHandle& h) {
                               FlushLogs();
                               return h.redis->Connected();
                             })
      .def("check",
           [](RedisStorageHandle& h) {
             FlushLogs();
             const bool ok = h.redis->Ping(nullptr);
             FlushLogs();
             return ok;
           })
      .def("ping",
           [](RedisStorageHandle& h) {
             FlushLogs();
             int64_t rtt = 0;
             if (!h.redis->Ping(&rtt)) {
               PyErr_SetString(g_unavailable, "redis did not answer PING");
               throw py::error_already_set();
             }
             return static_cast<double>(rtt) / kNanosPerSecond;
           })
      .def("close",
           [](RedisStorageHandle& h) {
             {
               py::gil_scoped_release release;
               h.redis->Close();
             }
             FlushLogs();
           })
      .def_static("last_status",
                  []() { return SourceName(RedisStore::LastSource()); })
      .def_static("last_timed_out", &RedisStore::LastTimedOut)
      .def_static("last_error",
                  []() {
                    const std::string& e = RedisStore::LastError();
                    PyObject* s = PyUnicode_DecodeUTF8(
                        e.data(), static_cast<Py_ssize_t>(e.size()), "replace");
                    if (s == nullptr) throw py::error_already_set();
                    return py::reinterpret_steal<py::str>(s);
                  })
      .def("stats", [](const RedisStorageHandle& h) {
        FlushLogs();
        const RedisStoreStats s = h.redis->Stats();
        py::dict d;
        d["decisions"] = s.decisions;
        d["calls"] = s.calls;
        d["scripts"] = s.scripts;
        d["writes"] = s.writes;
        d["inline_calls"] = s.inline_calls;
        d["loop_writes"] = s.loop_writes;
        d["cache_hits"] = s.cache_hits;
        d["fail_open"] = s.fail_open;
        d["fail_closed"] = s.fail_closed;
        d["fallback"] = s.fallback;
        d["timeouts"] = s.timeouts;
        d["errors"] = s.errors;
        d["disconnects"] = s.disconnects;
        d["reconnects"] = s.reconnects;
        d["script_reloads"] = s.script_reloads;
        d["mismatches"] = s.mismatches;
        return d;
      });
#ifdef RAPIDLIMIT_HAVE_HIREDIS
  BindSingleCalls(cls);
#endif
  g_redis_type = reinterpret_cast<PyTypeObject*>(cls.ptr());
  for (PyMethodDef* def = kFastMethods; def->ml_name != nullptr; ++def) {
    PyObject* descr = PyDescr_NewMethod(g_redis_type, def);
    if (descr == nullptr) throw py::error_already_set();
    const int rc = PyObject_SetAttrString(cls.ptr(), def->ml_name, descr);
    Py_DECREF(descr);
    if (rc != 0) throw py::error_already_set();
  }
  py::module_::import("atexit").attr("register")(py::cpp_function(&CloseAll));
}

}  // namespace rapidlimit::bindings
