// Sockets for the Redis store: non-blocking connect with a deadline.
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>

#include "redis_internal.h"

namespace rapidlimit::redis {
namespace {

// Finishes a non-blocking connect of `fd` to `addr` before `deadline`.
bool ConnectBefore(int fd, const sockaddr* addr, socklen_t len,
                   int64_t deadline, std::string* error) {
  if (connect(fd, addr, len) == 0) return true;
  if (errno != EINPROGRESS && errno != EAGAIN && errno != EINTR) {
    *error = std::strerror(errno);
    return false;
  }
  const int ready = WaitFd(fd, POLLOUT, deadline);
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

// One name lookup, shared by the thread doing it and the one waiting.
struct Lookup {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  int rc = EAI_AGAIN;
  addrinfo* list = nullptr;
  ~Lookup() {
    if (list != nullptr) freeaddrinfo(list);
  }
};

// getaddrinfo by `deadline`. It has no timeout of its own, and the
// resolver's (seconds per try, per name server) would hold a connect, a
// reconnect of the I/O thread and so Close() far beyond the connect
// timeout: a name goes to a thread of its own, which is left to finish
// alone when the deadline passes. A numeric address needs no lookup.
int ResolveBefore(const std::string& host, const std::string& port,
                  int64_t deadline, addrinfo** out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, out) == 0) return 0;
  if (MonoNanos() >= deadline) return EAI_AGAIN;  // no thread for nothing
  auto lookup = std::make_shared<Lookup>();
  try {
    std::thread([lookup, host, port] {
      addrinfo hints{};
      hints.ai_family = AF_UNSPEC;
      hints.ai_socktype = SOCK_STREAM;
      addrinfo* list = nullptr;
      const int rc =
          g_getaddrinfo.load()(host.c_str(), port.c_str(), &hints, &list);
      std::lock_guard<std::mutex> lock(lookup->mu);
      lookup->rc = rc;
      lookup->list = list;
      lookup->done = true;
      lookup->cv.notify_all();
    }).detach();
  } catch (const std::system_error&) {
    return EAI_AGAIN;  // no thread now: the next attempt tries again
  }
  std::unique_lock<std::mutex> lock(lookup->mu);
  const int64_t left = std::max<int64_t>(0, deadline - MonoNanos());
  if (!lookup->cv.wait_for(lock, std::chrono::nanoseconds(left),
                           [&] { return lookup->done; })) {
    return EAI_AGAIN;
  }
  *out = lookup->list;
  lookup->list = nullptr;
  return lookup->rc;
}

}  // namespace

std::atomic<GetAddrInfoFunction> g_getaddrinfo{&getaddrinfo};

int64_t MonoNanos() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

int WaitFd(int fd, short events, int64_t deadline) {
  for (;;) {
    const int64_t left = deadline - MonoNanos();
    if (left <= 0) return 0;
    pollfd p{fd, events, 0};
    // Round up so that a sub-millisecond wait does not spin.
    const int ms = static_cast<int>(
        std::min<int64_t>((left + 999'999) / 1'000'000, 1'000'000));
    const int rc = poll(&p, 1, ms);
    if (rc > 0) return (p.revents & (events | POLLERR | POLLHUP)) ? 1 : -1;
    if (rc < 0 && errno != EINTR) return -1;
  }
}

int ConnectSocket(const RedisStoreOptions& o, int64_t deadline,
                  std::string* error) {
  if (!o.unix_path.empty()) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (o.unix_path.size() >= sizeof(addr.sun_path)) {
      *error = "unix socket path too long: " + o.unix_path;
      return -1;
    }
    std::memcpy(addr.sun_path, o.unix_path.data(), o.unix_path.size());
    const int fd =
        socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      *error = std::strerror(errno);
      return -1;
    }
    std::string why;
    if (!ConnectBefore(fd, reinterpret_cast<const sockaddr*>(&addr),
                       sizeof(addr), deadline, &why)) {
      close(fd);
      *error = "connect to " + o.unix_path + ": " + why;
      return -1;
    }
    return fd;
  }
  addrinfo* list = nullptr;
  const std::string port = std::to_string(o.port);
  const int gai = ResolveBefore(o.host, port, deadline, &list);
  if (gai != 0) {
    *error = "resolve " + o.host + ": " +
             (MonoNanos() >= deadline ? "timed out" : gai_strerror(gai));
    return -1;
  }
  std::string why = "no address";
  int fd = -1;
  for (addrinfo* ai = list; ai != nullptr; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                ai->ai_protocol);
    if (fd < 0) {
      why = std::strerror(errno);
      continue;
    }
    if (ConnectBefore(fd, ai->ai_addr, ai->ai_addrlen, deadline, &why)) break;
    close(fd);
    fd = -1;
    if (MonoNanos() >= deadline) break;
  }
  freeaddrinfo(list);
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
