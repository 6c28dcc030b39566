// RedisStorage: the Redis store as a Storage (so RateLimiter works with it
// unchanged), plus decide_many (raising on fail-closed) and
// decide_many_async (an asyncio future, completed without ever blocking
// the event loop: the store's I/O thread signals an eventfd that the loop
// watches with add_reader). Blocking waits release the GIL.
#include <pybind11/stl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#ifdef RAPIDLIMIT_HAVE_HIREDIS
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
PyObject* g_str_now = nullptr;
PyObject* g_str_test = nullptr;
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
PyObject* MakeUnavailable(const Decision& d) {
  const double retry = static_cast<double>(d.retry_after_nanos) /
                       static_cast<double>(kNanosPerSecond);
  PyObject* exc = PyObject_CallFunction(
      g_unavailable, "s",
      "redis is unavailable and the storage's policy is fail-closed");
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
  PyObject* now_obj = nargs > 2 ? args[2] : nullptr;
  PyObject* test_obj = nargs > 3 ? args[3] : nullptr;
  if (kwnames != nullptr) {
    const Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < nkw; ++i) {
      PyObject* kw = PyTuple_GET_ITEM(kwnames, i);
      if (KeywordIs(kw, g_str_now)) {
        now_obj = args[nargs + i];
      } else if (KeywordIs(kw, g_str_test)) {
        test_obj = args[nargs + i];
      } else {
        PyErr_Format(PyExc_TypeError, "unexpected keyword argument '%U'", kw);
        return false;
      }
    }
  }
  if (!StrategyFromPython(args[0], &call->strategy)) return false;
  if (test_obj != nullptr) {
    const int truth = PyObject_IsTrue(test_obj);
    if (truth < 0) return false;
    call->test = truth == 1;
  }
  if (!NowFromPython(now_obj, &call->now)) return false;

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
    if (item == nullptr || !CostFromPython(PyTuple_GET_ITEM(entry, 2), &cost) ||
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

struct Pending;

// Completions for one event loop: the I/O thread appends and writes the
// eventfd; the loop's reader callback resolves the futures.
struct LoopBridge {
  int efd = -1;
  std::mutex mu;
  std::vector<Pending*> done;
  bool signaled = false;
  bool dead = false;            // the loop is gone: nothing will drain
  PyObject* weakref = nullptr;  // to the loop; released by the registry
  // Loop thread only: stores with commands queued during this iteration,
  // flushed by one call_soon callback at its end.
  std::vector<std::shared_ptr<Store>> to_flush;
  py::object flush_callback;

  ~LoopBridge() {
    if (efd >= 0) close(efd);
    // Pending futures here can only be released with the GIL, which the
    // last owner may not hold: they are leaked (the loop is gone anyway).
  }
};

struct Pending {
  std::shared_ptr<LoopBridge> bridge;
  PyObject* future = nullptr;  // strong
  std::vector<Decision> decisions;
  bool inline_done = false;
  // decide_view_async: the view's parts (names, limit, prefix, key,
  // scope; strong) and its clock, made into the view on the loop thread.
  PyObject* view[5] = {};
  double now_seconds = 0;

  // Deleted with the GIL held (see LoopBridge for the other case).
  ~Pending() {
    for (PyObject* part : view) Py_XDECREF(part);
  }
};

thread_local Pending* tl_submitting = nullptr;

// Inside a run of completions (RedisStoreOptions::completions_begin/end):
// the bridges owed a wake-up, signalled once at the end of the run. An
// event loop woken at the first of several replies read together would
// preempt the I/O thread on a shared CPU, resume one task, and send its
// next request alone: batches would shrink to one request each way.
thread_local int tl_run_depth = 0;
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
    if (b->dead) return;  // leaked, see LoopBridge
    b->done.push_back(p);
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

void OnAsyncDone(void* context, const Decision* d, size_t written, size_t) {
  auto* p = static_cast<Pending*>(context);
  p->decisions.assign(d, d + written);
  if (tl_submitting == p) {
    p->inline_done = true;  // resolved by decide_many_async itself
    return;
  }
  std::shared_ptr<LoopBridge> bridge = p->bridge;
  PushDone(bridge, p);
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
  return NewDecisionView(d, p->now_seconds, p->view[0], p->view[1], p->view[2],
                         p->view[3], p->view[4]);
}

// Sets the future's result (or exception); a cancelled future is skipped.
void Resolve(Pending* p) {
  bool is_error = false;
  PyObject* result =
      p->view[0] != nullptr
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
  PyObject* rc = PyObject_CallMethodOneArg(
      p->future, is_error ? g_str_set_exception : g_str_set_result, result);
  if (rc == nullptr) {
    PyErr_Clear();  // InvalidStateError: cancelled meanwhile
  } else {
    Py_DECREF(rc);
  }
  Py_XDECREF(result);
}

void Drain(LoopBridge* bridge) {
  uint64_t value;
  while (read(bridge->efd, &value, sizeof(value)) < 0 && errno == EINTR) {
  }
  std::vector<Pending*> items;
  {
    std::lock_guard<std::mutex> lock(bridge->mu);
    items.swap(bridge->done);
    bridge->signaled = false;
  }
  for (Pending* p : items) {
    Resolve(p);
    Py_DECREF(p->future);
    delete p;
  }
  FlushLogs();
}

std::mutex g_bridges_mu;
std::unordered_map<PyObject*, std::shared_ptr<LoopBridge>> g_bridges;
// Weak references to loops whose callback already ran, released later
// (not from inside their own callback).
std::vector<PyObject*> g_dead_refs;

// Called when a loop with a bridge is collected: forget the bridge and
// drop the futures that never completed.
PyObject* OnLoopCollected(PyObject*, PyObject* ref) {
  std::shared_ptr<LoopBridge> bridge;
  {
    std::lock_guard<std::mutex> lock(g_bridges_mu);
    for (auto it = g_bridges.begin(); it != g_bridges.end(); ++it) {
      if (it->second->weakref == ref) {
        bridge = it->second;
        g_bridges.erase(it);
        break;
      }
    }
    g_dead_refs.push_back(ref);  // our reference, released later
  }
  if (bridge != nullptr) {
    std::vector<Pending*> items;
    {
      std::lock_guard<std::mutex> lock(bridge->mu);
      bridge->dead = true;
      items.swap(bridge->done);
    }
    // A completion may hold the last reference to the bridge and release
    // it on the I/O thread, without the GIL: drop the Python objects (and
    // stores) it keeps now, while the GIL is held.
    bridge->flush_callback = py::object();
    bridge->to_flush.clear();
    for (Pending* p : items) {
      Py_DECREF(p->future);
      delete p;
    }
  }
  Py_RETURN_NONE;
}

PyMethodDef kOnLoopCollected = {"_rapidlimit_loop_collected", OnLoopCollected,
                                METH_O, nullptr};

// The bridge for `loop`, created (and registered with add_reader) on first
// use. Called with the GIL, on the loop's thread.
std::shared_ptr<LoopBridge> BridgeFor(PyObject* loop) {
  std::vector<PyObject*> dead;
  {
    std::lock_guard<std::mutex> lock(g_bridges_mu);
    auto it = g_bridges.find(loop);
    if (it != g_bridges.end()) return it->second;
    dead.swap(g_dead_refs);
  }
  for (PyObject* ref : dead) Py_DECREF(ref);
  auto bridge = std::make_shared<LoopBridge>();
  bridge->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (bridge->efd < 0) {
    PyErr_SetFromErrno(PyExc_OSError);
    throw py::error_already_set();
  }
  std::weak_ptr<LoopBridge> weak = bridge;
  py::cpp_function drain([weak]() {
    if (auto b = weak.lock()) Drain(b.get());
  });
  py::handle(loop).attr("add_reader")(bridge->efd, drain);
  bridge->flush_callback = py::cpp_function([weak]() {
    if (auto b = weak.lock()) {
      std::vector<std::shared_ptr<Store>> stores;
      stores.swap(b->to_flush);
      for (auto& s : stores) static_cast<RedisStore*>(s.get())->Flush();
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

// Queues `requests` for `p` (new, owned from here on) and returns the
// future the loop's reader completes; null with a Python error set.
PyObject* Submit(RedisStorageHandle* storage, const Request* requests, size_t n,
                 int64_t now, Mode mode, Pending* p) {
  std::unique_ptr<Pending> owned(p);
  PyObject* loop = PyObject_CallNoArgs(g_get_running_loop);
  if (loop == nullptr) return nullptr;
  std::shared_ptr<LoopBridge> bridge;
  try {
    bridge = BridgeFor(loop);
  } catch (py::error_already_set& e) {
    Py_DECREF(loop);
    e.restore();
    return nullptr;
  }
  py::object loop_ref = py::reinterpret_steal<py::object>(loop);
  PyObject* future = PyObject_CallMethodNoArgs(loop, g_str_create_future);
  if (future == nullptr) return nullptr;
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
  storage->redis->DecideAsyncDeferred(requests, n, now, mode, &OnAsyncDone, p);
  tl_submitting = nullptr;
  if (p->inline_done) {
    // Answered without Redis (blocked-key cache, or Redis down): the
    // future is done before the caller awaits it.
    Resolve(p);
    Py_DECREF(p->future);
    delete p;
  }
  return future;
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
                call.now, call.test ? Mode::kTest : Mode::kHit, new Pending);
}

// decide_view_async(strategy, item, key, scope, cost, now, names, limit,
//                   prefix) -> asyncio.Future[view]
PyObject* DecideViewAsync(PyObject* self, PyObject* const* args,
                          Py_ssize_t nargsf, PyObject* kwnames) {
  FlushLogs();
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if (nargs != 9 || (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) != 0)) {
    PyErr_SetString(PyExc_TypeError,
                    "decide_view_async(strategy, item, key, scope, cost, now, "
                    "names, limit, prefix) takes exactly 9 positional "
                    "arguments");
    return nullptr;
  }
  auto* storage = static_cast<RedisStorageHandle*>(
      UnwrapFast(self, g_redis_type, "RedisStorage"));
  if (storage == nullptr) return nullptr;
  Strategy strategy;
  if (!StrategyFromPython(args[0], &strategy)) return nullptr;
  auto* item = static_cast<ItemHandle*>(
      UnwrapFast(args[1], g_item_type, "RateLimitItem"));
  if (item == nullptr) return nullptr;
  int64_t cost = 0;
  double now_seconds = 0;
  int64_t now = 0;
  if (!CostFromPython(args[4], &cost) ||
      !ViewNowFromPython(args[5], &now_seconds, &now) ||
      !ViewNamesReady(args[6]) || !CheckStrategyLimit(strategy, item->limit)) {
    return nullptr;
  }
  PyObject* key = args[2];
  PyObject* scope = args[3];
  PyObject* prefix = args[8];
  const int has_prefix = PyObject_IsTrue(prefix);
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
  return Submit(storage, &r, 1, now, Mode::kHit, p);
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
     "limit, prefix) -> asyncio.Future[view]\n\n"
     "RateLimiter.decide_view on this storage, awaitable like "
     "decide_many_async. Raises RedisUnavailableError (through the future) "
     "when Redis cannot answer and the policy is fail-closed."},
#endif
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

bool RaiseIfFailClosed(const Decision& d) {
  if (d.source != DecisionSource::kFailClosed) return false;
  PyObject* exc = MakeUnavailable(d);
  if (exc != nullptr) {
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
    Py_DECREF(exc);
  }
  return true;
}

void BindRedis(py::module_& m) {
  g_item_type =
      reinterpret_cast<PyTypeObject*>(py::type::of<ItemHandle>().ptr());
  g_limiter_type =
      reinterpret_cast<PyTypeObject*>(py::type::of<LimiterHandle>().ptr());
  g_str_now = PyUnicode_InternFromString("now");
  g_str_test = PyUnicode_InternFromString("test");
  g_str_set_result = PyUnicode_InternFromString("set_result");
  g_str_set_exception = PyUnicode_InternFromString("set_exception");
  g_str_create_future = PyUnicode_InternFromString("create_future");
  g_str_call_soon = PyUnicode_InternFromString("call_soon");
  g_get_running_loop =
      py::object(py::module_::import("asyncio").attr("get_running_loop"))
          .release()
          .ptr();

  g_unavailable = PyErr_NewExceptionWithDoc(
      "rapidlimit._core.RedisUnavailableError",
      "Redis could not answer in time and the storage's policy is "
      "fail-closed: answer 503 with Retry-After = retry_after seconds.",
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
            o.completions_begin = &CompletionsBegin;
            o.completions_end = &CompletionsEnd;
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
      .def("stats", [](const RedisStorageHandle& h) {
        FlushLogs();
        const RedisStoreStats s = h.redis->Stats();
        py::dict d;
        d["decisions"] = s.decisions;
        d["calls"] = s.calls;
        d["scripts"] = s.scripts;
        d["writes"] = s.writes;
        d["inline_calls"] = s.inline_calls;
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
