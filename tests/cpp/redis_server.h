// Test fixture: a throwaway redis-server from PATH on 127.0.0.1, at a free
// port, without persistence; plus a blocking hiredis client for tests.
#ifndef RAPIDLIMIT_TESTS_REDIS_SERVER_H_
#define RAPIDLIMIT_TESTS_REDIS_SERVER_H_

#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "hiredis_include.h"

namespace rapidlimit::testing {

// Absolute path of redis-server in PATH, or "".
inline std::string FindRedisServer() {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return "";
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/redis-server";
    if (access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

inline int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// The wait status of child `pid`, or nothing once `limit` has passed (the
// child is then killed): a child that hangs fails its test instead of
// holding ctest forever.
inline std::optional<int> WaitChild(pid_t pid,
                                    std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  for (;;) {
    const pid_t got = waitpid(pid, &status, WNOHANG);
    if (got == pid) return status;
    if (got < 0) return std::nullopt;
    if (std::chrono::steady_clock::now() >= deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return std::nullopt;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

// fork(), once every other thread of this process waits in a system call
// that holds no lock of the C library or of a sanitizer's allocator (poll,
// futex, sleeps), at most `limit` later. glibc's malloc takes its locks
// around fork; the AddressSanitizer runtime of GCC 12 does not, so a child
// forked while another thread was inside its allocator (the I/O thread
// freeing the op it just completed) deadlocks at its first allocation of
// that size (seen: 10 in 150 runs on a loaded machine).
inline pid_t ForkWhenQuiet(
    std::chrono::milliseconds limit = std::chrono::milliseconds(2000)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  const std::string self = std::to_string(gettid());
  auto quiet = [&self] {
    DIR* dir = opendir("/proc/self/task");
    if (dir == nullptr) return true;
    bool all = true;
    while (dirent* entry = readdir(dir)) {
      const std::string tid = entry->d_name;
      if (tid == "." || tid == ".." || tid == self) continue;
      std::FILE* f =
          std::fopen(("/proc/self/task/" + tid + "/syscall").c_str(), "r");
      if (f == nullptr) continue;  // exited meanwhile
      long nr = -1;
      const bool parsed = std::fscanf(f, "%ld", &nr) == 1;
      std::fclose(f);
      // x86-64 and aarch64 numbers: poll, ppoll, futex, nanosleep,
      // clock_nanosleep.
#if defined(__x86_64__)
      const bool waiting =
          nr == 7 || nr == 271 || nr == 202 || nr == 35 || nr == 230;
#else
      const bool waiting = nr == 73 || nr == 98 || nr == 101 || nr == 115;
#endif
      if (!parsed || !waiting) {
        all = false;
        break;
      }
    }
    closedir(dir);
    return all;
  };
  while (!quiet() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return fork();
}

// A TCP port where connections complete (the kernel's backlog) and then
// nothing ever answers: a hung Redis, or a host that drops packets after
// the handshake. Accept() takes the connections that arrived, so that a
// test can tell when a client is in the middle of one.
class SilentServer {
 public:
  SilentServer() {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    listen(fd_, 128);
    socklen_t len = sizeof(addr);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
  }
  SilentServer(const SilentServer&) = delete;
  SilentServer& operator=(const SilentServer&) = delete;
  ~SilentServer() {
    for (int fd : accepted_) close(fd);
    close(fd_);
  }

  int port() const { return port_; }

  // Takes one connection, waiting for it up to `limit`; false if none came.
  bool Accept(std::chrono::milliseconds limit) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(limit.count())) <= 0) return false;
    const int fd = accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) return false;
    accepted_.push_back(fd);  // open and silent until the end
    return true;
  }

  // Takes every connection that has already arrived.
  void Drain() {
    while (Accept(std::chrono::milliseconds(0))) {
    }
  }

  // Connections taken so far.
  size_t accepted() const { return accepted_.size(); }

  // Waits up to `limit` for the client to close connection `i` (in the
  // order taken), dropping what it sends meanwhile; false if it stays
  // open.
  bool WaitClosed(size_t i, std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    char buf[256];
    while (true) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          end - std::chrono::steady_clock::now());
      if (i >= accepted_.size() || left.count() <= 0) return false;
      pollfd p{accepted_[i], POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      const ssize_t n = recv(accepted_[i], buf, sizeof(buf), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno == ECONNRESET)) return true;
    }
  }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::vector<int> accepted_;
};

// A reply flattened for assertions.
struct Reply {
  int type = 0;
  long long integer = 0;
  std::string str;
  std::vector<Reply> elements;
  bool ok() const { return type != 0 && type != REDIS_REPLY_ERROR; }
};

inline Reply Flatten(const redisReply* r) {
  Reply out;
  if (r == nullptr) return out;
  out.type = r->type;
  out.integer = r->integer;
  if (r->str != nullptr) out.str.assign(r->str, r->len);
  for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements; ++i) {
    out.elements.push_back(Flatten(r->element[i]));
  }
  return out;
}

class RedisServer {
 public:
  RedisServer() = default;
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;
  ~RedisServer() { Stop(); }

  // Starts on a free port (or `port`, to restart on the same one).
  bool Start(int port = 0, std::string* error = nullptr) {
    const std::string binary = FindRedisServer();
    if (binary.empty()) {
      if (error != nullptr) *error = "redis-server not found in PATH";
      return false;
    }
    for (int attempt = 0; attempt < 5; ++attempt) {
      port_ = port != 0 ? port : FreePort();
      unix_path_ = "/tmp/rapidlimit-test-" + std::to_string(getpid()) + "-" +
                   std::to_string(port_) + ".sock";
      pid_ = Spawn(binary);
      if (pid_ > 0 && WaitReady(std::chrono::seconds(10))) return true;
      Stop();
      if (port != 0)
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    if (error != nullptr) *error = "redis-server did not start";
    return false;
  }

  // SIGTERM, then SIGKILL after 3 s.
  void Stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 300; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  // Abrupt death, as in a crash.
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  int port() const { return port_; }
  const std::string& unix_path() const { return unix_path_; }
  std::string Uri() const {
    return "redis://127.0.0.1:" + std::to_string(port_) + "/0";
  }

  // One blocking command on a fresh connection, 5 s at most (hiredis's
  // connect timeout does not bound the reply: a server that stopped
  // answering would hold the test forever).
  Reply Command(const std::vector<std::string>& argv) const {
    timeval tv{5, 0};
    redisContext* c = redisConnectWithTimeout("127.0.0.1", port_, tv);
    if (c == nullptr || c->err || redisSetTimeout(c, tv) != REDIS_OK) {
      if (c != nullptr) redisFree(c);
      return Reply{};
    }
    std::vector<const char*> args;
    std::vector<size_t> lens;
    for (const std::string& a : argv) {
      args.push_back(a.data());
      lens.push_back(a.size());
    }
    auto* r = static_cast<redisReply*>(redisCommandArgv(
        c, static_cast<int>(args.size()), args.data(), lens.data()));
    Reply out = Flatten(r);
    if (r != nullptr) freeReplyObject(r);
    redisFree(c);
    return out;
  }

  // Holds the server for `seconds` (DEBUG SLEEP from a thread of its own,
  // which the caller joins) and returns once it no longer answers: a fixed
  // pause after starting the thread was at times too short on a loaded
  // machine, and the request meant to meet a sleeping Redis met an awake
  // one.
  std::thread SleepInBackground(const std::string& seconds) const {
    std::thread sleeper([this, seconds] {
      Command({"DEBUG", "SLEEP", seconds});
    });
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (std::chrono::steady_clock::now() < deadline && Answers()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return sleeper;
  }

  // calls per command from INFO commandstats ("evalsha" -> 12).
  std::map<std::string, long long> CommandCalls() const {
    std::map<std::string, long long> calls;
    const Reply r = Command({"INFO", "commandstats"});
    std::stringstream lines(r.str);
    std::string line;
    while (std::getline(lines, line)) {
      // cmdstat_evalsha:calls=12,usec=...
      if (line.rfind("cmdstat_", 0) != 0) continue;
      const size_t colon = line.find(':');
      const size_t eq = line.find("calls=");
      if (colon == std::string::npos || eq == std::string::npos) continue;
      calls[line.substr(8, colon - 8)] = std::atoll(line.c_str() + eq + 6);
    }
    return calls;
  }

 private:
  // Whether a PING on a fresh connection is answered within 50 ms.
  bool Answers() const {
    const timeval tv{0, 50'000};
    redisContext* c = redisConnectWithTimeout("127.0.0.1", port_, tv);
    bool ok = false;
    if (c != nullptr && !c->err && redisSetTimeout(c, tv) == REDIS_OK) {
      auto* r = static_cast<redisReply*>(redisCommand(c, "PING"));
      ok = r != nullptr && r->type == REDIS_REPLY_STATUS;
      if (r != nullptr) freeReplyObject(r);
    }
    if (c != nullptr) redisFree(c);
    return ok;
  }

  static bool SupportsDebugOption(const std::string& binary) {
    FILE* p = popen((binary + " --version 2>/dev/null").c_str(), "r");
    if (p == nullptr) return false;
    char buf[256] = {0};
    const size_t n = fread(buf, 1, sizeof(buf) - 1, p);
    pclose(p);
    const std::string text(buf, n);
    const size_t at = text.find("v=");
    return at != std::string::npos && std::atoi(text.c_str() + at + 2) >= 7;
  }

  pid_t Spawn(const std::string& binary) {
    const bool debug_option = SupportsDebugOption(binary);
    std::vector<std::string> args = {binary,
                                     "--port",
                                     std::to_string(port_),
                                     "--bind",
                                     "127.0.0.1",
                                     "--unixsocket",
                                     unix_path_,
                                     "--unixsocketperm",
                                     "700",
                                     "--save",
                                     "",
                                     "--appendonly",
                                     "no",
                                     "--daemonize",
                                     "no",
                                     "--loglevel",
                                     "warning",
                                     "--logfile",
                                     "/dev/null"};
    if (debug_option) {
      args.push_back("--enable-debug-command");
      args.push_back("yes");
    }
    // Built before fork: the child may only exec.
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t pid = fork();
    if (pid == 0) {
      // Dies with the forking thread, even when the test is killed.
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      execv(binary.c_str(), argv.data());
      _exit(127);
    }
    return pid;
  }

  // Ready when the server answering on the port is ours: a test run in
  // parallel (ctest -j) may have been given the same free port and started
  // its server first, and ours, unable to bind, would still be exiting
  // when that one answered the PING: the two tests would share a server.
  bool WaitReady(std::chrono::seconds limit) const {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    const std::string ours = "process_id:" + std::to_string(pid_) + "\r\n";
    while (std::chrono::steady_clock::now() < deadline) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) return false;
      const Reply r = Command({"INFO", "server"});
      if (r.type == REDIS_REPLY_STRING) {
        return r.str.find(ours) != std::string::npos;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  pid_t pid_ = -1;
  int port_ = 0;
  std::string unix_path_;
};

}  // namespace rapidlimit::testing

#endif  // RAPIDLIMIT_TESTS_REDIS_SERVER_H_
