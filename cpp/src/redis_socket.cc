// Sockets for the Redis store: non-blocking connect with a deadline.
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>

#include "redis_internal.h"

namespace rapidlimit::redis {
namespace {

// Finishes a non-blocking connect of `fd` to `addr` before `deadline`.
bool ConnectBefore(int fd, const sockaddr* addr, socklen_t len,
                   int64_t deadline, WaitHook* hook, std::string* error) {
  if (connect(fd, addr, len) == 0) return true;
  if (errno != EINPROGRESS && errno != EAGAIN && errno != EINTR) {
    *error = std::strerror(errno);
    return false;
  }
  const int ready = WaitFd(fd, POLLOUT, deadline, hook);
  if (ready == 0) {
    *error = "connect timed out";
    return false;
  }
  if (ready < 0) {
    *error = std::strerror(errno);
    return false;
  }
  int so_error = 0;
  socklen_t so_len = sizeof(so_error);
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &so_len) != 0) {
    *error = std::strerror(errno);
    return false;
  }
  if (so_error != 0) {
    *error = std::strerror(so_error);
    return false;
  }
  return true;
}

// One name lookup, on a thread of its own, and its answer. Its eventfd
// becomes readable, for good, when the answer is in.
struct Lookup {
  Lookup() = default;
  Lookup(const Lookup&) = delete;
  Lookup& operator=(const Lookup&) = delete;
  ~Lookup() {
    if (list != nullptr) freeaddrinfo(list);
    if (efd >= 0) close(efd);
  }

  std::string key;  // host '\0' port
  int efd = -1;
  // Guarded by the table's mutex; `rc` and `list` are constant once `done`.
  bool done = false;
  int waiters = 0;
  int64_t done_at = 0;
  int rc = EAI_AGAIN;
  addrinfo* list = nullptr;
};

// The lookups in flight by host and port, and the answers that came in
// while no attempt waited. Never destroyed: a lookup's thread may finish
// after the statics of this file.
struct LookupTable {
  std::mutex mu;
  std::unordered_map<std::string, std::shared_ptr<Lookup>> lookups;
};

LookupTable& Lookups() {
  static auto* table = new LookupTable;
  return *table;
}

// An answer that came in while no attempt waited is the next attempt's,
// unless it is older than this (a resolver's cache keeps answers for
// their TTL, rarely under a minute).
constexpr int64_t kKeepAnswerNanos = 30'000'000'000;

// Starts looking `host` up for `port` (table.mu held). Null when there is
// no thread or eventfd for it now: the next attempt tries again.
std::shared_ptr<Lookup> StartLookup(std::string key, const std::string& host,
                                    const std::string& port) {
  auto lookup = std::make_shared<Lookup>();
  lookup->key = std::move(key);
  lookup->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (lookup->efd < 0) return nullptr;
  try {
    std::thread([lookup, host, port] {
      addrinfo hints{};
      hints.ai_family = AF_UNSPEC;
      hints.ai_socktype = SOCK_STREAM;
      addrinfo* list = nullptr;
      const int rc =
          g_getaddrinfo.load()(host.c_str(), port.c_str(), &hints, &list);
      LookupTable& table = Lookups();
      std::lock_guard<std::mutex> lock(table.mu);
      lookup->rc = rc;
      lookup->list = list;
      lookup->done = true;
      lookup->done_at = MonoNanos();
      // The attempts waiting take the answer, and the next attempt looks
      // the name up again; with none waiting, the next attempt takes it.
      const auto it = table.lookups.find(lookup->key);
      if (lookup->waiters > 0 && it != table.lookups.end() &&
          it->second == lookup) {
        table.lookups.erase(it);
      }
      const uint64_t one = 1;
      while (write(lookup->efd, &one, sizeof(one)) < 0 && errno == EINTR) {
      }
    }).detach();
  } catch (const std::system_error&) {
    return nullptr;
  }
  return lookup;
}

// getaddrinfo by `deadline`. It has no timeout of its own, and the
// resolver's (seconds per try, per name server) would hold a connect, a
// reconnect of the I/O thread and so Close() far beyond the connect
// timeout: a name goes to a thread of its own, which is left to finish
// alone when the deadline passes. One lookup per host and port at a time:
// an attempt that comes while one is in flight waits for that one rather
// than starting another, or a name server that never answers would get a
// thread per reconnect attempt (every few ms at the shortest backoff),
// all of them stuck. A numeric address needs no lookup.
int ResolveBefore(const std::string& host, const std::string& port,
                  int64_t deadline, WaitHook* hook,
                  std::shared_ptr<const Lookup>* out) {
  auto numeric = std::make_shared<Lookup>();
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &numeric->list) == 0) {
    numeric->rc = 0;
    *out = std::move(numeric);
    return 0;
  }
  if (MonoNanos() >= deadline) return EAI_AGAIN;  // no thread for nothing
  LookupTable& table = Lookups();
  std::string key = host;
  key.push_back('\0');
  key.append(port);
  std::shared_ptr<Lookup> lookup;
  {
    std::lock_guard<std::mutex> lock(table.mu);
    const auto it = table.lookups.find(key);
    if (it != table.lookups.end() && !it->second->done) {
      lookup = it->second;
    } else if (it != table.lookups.end()) {
      std::shared_ptr<Lookup> answer = std::move(it->second);
      table.lookups.erase(it);
      if (MonoNanos() - answer->done_at <= kKeepAnswerNanos) {
        *out = answer;
        return answer->rc;
      }
    }
    if (lookup == nullptr) {
      lookup = StartLookup(key, host, port);
      if (lookup == nullptr) return EAI_AGAIN;
      table.lookups.emplace(std::move(key), lookup);
    }
    ++lookup->waiters;
  }
  WaitFd(lookup->efd, POLLIN, deadline, hook);
  std::lock_guard<std::mutex> lock(table.mu);
  --lookup->waiters;
  if (!lookup->done) return EAI_AGAIN;  // left in flight for the next
  *out = lookup;
  return lookup->rc;
}

}  // namespace

std::atomic<GetAddrInfoFunction> g_getaddrinfo{&getaddrinfo};
std::atomic<void (*)()> g_connected_hook{nullptr};

std::mutex& FilesMutex() {
  static auto* mu = new std::mutex;  // never destroyed: used at exit
  return *mu;
}

void CloseFile(int* fd) {
  std::lock_guard<std::mutex> lock(FilesMutex());
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

void CloseFile(int fd, std::atomic<int>* published) {
  std::lock_guard<std::mutex> lock(FilesMutex());
  if (published != nullptr) published->store(-1);
  close(fd);
}

// Held across fork() so that the child's copy of the table is whole.
void LookupsForkPrepare() { Lookups().mu.lock(); }
void LookupsForkParent() { Lookups().mu.unlock(); }

// The child has none of the lookups' threads: an attempt there must not
// wait for one. Their Lookups stay referenced by threads that do not
// exist here; only their eventfds are worth closing.
void LookupsForkChild() {
  LookupTable& table = Lookups();
  for (auto& entry : table.lookups) {
    Lookup& lookup = *entry.second;
    if (!lookup.done && lookup.efd >= 0) {
      close(lookup.efd);
      lookup.efd = -1;
    }
  }
  table.lookups.clear();
  table.mu.unlock();
}

int64_t MonoNanos() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

int WaitFd(int fd, short events, int64_t deadline, WaitHook* hook) {
  for (;;) {
    int64_t now = MonoNanos();
    if (now >= deadline) return 0;
    int64_t until = deadline;
    if (hook != nullptr) {
      if (now >= hook->next) {
        hook->next = hook->run();
        if (hook->next == kCancelWait) {
          hook->cancelled = true;
          errno = ECANCELED;
          return -1;
        }
        now = MonoNanos();
      }
      until = std::min(until, hook->next);
    }
    pollfd p[2] = {{fd, events, 0},
                   {hook != nullptr ? hook->fd : -1, POLLIN, 0}};
    // Round up so that a sub-millisecond wait does not spin.
    const int ms = static_cast<int>(
        std::clamp<int64_t>((until - now + 999'999) / 1'000'000, 0, 1'000'000));
    const int rc = poll(p, hook != nullptr ? 2 : 1, ms);
    if (rc < 0 && errno != EINTR) return -1;
    if (rc <= 0) continue;
    if (p[0].revents != 0) {
      return (p[0].revents & (events | POLLERR | POLLHUP)) ? 1 : -1;
    }
    if (p[1].revents != 0) hook->next = now;
  }
}

int ConnectSocket(const RedisStoreOptions& o, int64_t deadline,
                  std::string* error, WaitHook* hook,
                  std::atomic<int>* in_progress) {
  // Made and published under FilesMutex (closed by CloseFile).
  auto open_socket = [in_progress](int domain, int type, int protocol) {
    std::lock_guard<std::mutex> lock(FilesMutex());
    const int fd =
        socket(domain, type | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol);
    if (fd >= 0 && in_progress != nullptr) in_progress->store(fd);
    return fd;
  };
  if (!o.unix_path.empty()) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (o.unix_path.size() >= sizeof(addr.sun_path)) {
      *error = "unix socket path too long: " + o.unix_path;
      return -1;
    }
    std::memcpy(addr.sun_path, o.unix_path.data(), o.unix_path.size());
    const int fd = open_socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) {
      *error = std::strerror(errno);
      return -1;
    }
    std::string why;
    if (!ConnectBefore(fd, reinterpret_cast<const sockaddr*>(&addr),
                       sizeof(addr), deadline, hook, &why)) {
      CloseFile(fd, in_progress);
      *error = "connect to " + o.unix_path + ": " + why;
      return -1;
    }
    return fd;
  }
  std::shared_ptr<const Lookup> lookup;
  const std::string port = std::to_string(o.port);
  const int gai = ResolveBefore(o.host, port, deadline, hook, &lookup);
  if (gai != 0) {
    *error = "resolve " + o.host + ": " +
             (MonoNanos() >= deadline ? "timed out" : gai_strerror(gai));
    return -1;
  }
  std::string why = "no address";
  int fd = -1;
  for (const addrinfo* ai = lookup->list; ai != nullptr; ai = ai->ai_next) {
    fd = open_socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) {
      why = std::strerror(errno);
      continue;
    }
    if (ConnectBefore(fd, ai->ai_addr, ai->ai_addrlen, deadline, hook, &why)) {
      break;
    }
    CloseFile(fd, in_progress);
    fd = -1;
    if (MonoNanos() >= deadline || (hook != nullptr && hook->cancelled)) {
      break;
    }
  }
  if (fd < 0) {
    *error = "connect to " + o.host + ":" + port + ": " + why;
    return -1;
  }
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  return fd;
}

}  // namespace rapidlimit::redis
