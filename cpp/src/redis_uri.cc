// Redis URIs and storage options. Independent of hiredis, so that a build
// without it still validates URIs before reporting that it lacks Redis.
#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <string>
#include <string_view>

#include "rapidlimit/redis_store.h"

namespace rapidlimit {
namespace {

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(c));
  return out;
}

// The URI with any password replaced, for error messages and logs.
std::string Redact(std::string_view uri) {
  const size_t scheme_end = uri.find("://");
  if (scheme_end == std::string_view::npos) return std::string(uri);
  const size_t start = scheme_end + 3;
  const size_t at = uri.find('@', start);
  const size_t slash = uri.find('/', start);
  if (at == std::string_view::npos ||
      (slash != std::string_view::npos && slash < at)) {
    return std::string(uri);
  }
  const size_t colon = uri.find(':', start);
  if (colon == std::string_view::npos || colon > at) return std::string(uri);
  std::string out(uri.substr(0, colon + 1));
  out += "***";
  out += uri.substr(at);
  return out;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// %XX escapes; '+' is a space only in query strings (as urllib reads them).
bool PercentDecode(std::string_view in, std::string* out,
                   bool plus_is_space = false) {
  out->clear();
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '%') {
      if (i + 2 >= in.size()) return false;
      const int hi = HexValue(in[i + 1]);
      const int lo = HexValue(in[i + 2]);
      if (hi < 0 || lo < 0) return false;
      out->push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    } else if (in[i] == '+' && plus_is_space) {
      out->push_back(' ');
    } else {
      out->push_back(in[i]);
    }
  }
  return true;
}

bool ParseInt(std::string_view s, int64_t* out) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) {
    s.remove_prefix(1);
  }
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) {
    s.remove_suffix(1);
  }
  if (s.empty()) return false;
  const auto res = std::from_chars(s.data(), s.data() + s.size(), *out);
  return res.ec == std::errc() && res.ptr == s.data() + s.size();
}

bool ParseSeconds(std::string_view s, int64_t* nanos) {
  const std::string copy(s);
  char* end = nullptr;
  const double v = std::strtod(copy.c_str(), &end);
  if (copy.empty() || end == nullptr || *end != '\0' || !std::isfinite(v) ||
      v < 0 || v > 86'400.0 * 365) {
    return false;
  }
  *nanos = static_cast<int64_t>(std::llround(v * 1e9));
  return true;
}

bool ParseBool(std::string_view s, bool* out) {
  const std::string v = Lower(s);
  if (v == "1" || v == "true" || v == "yes" || v == "on") {
    *out = true;
    return true;
  }
  if (v == "0" || v == "false" || v == "no" || v == "off" || v == "none" ||
      v.empty()) {
    *out = false;
    return true;
  }
  return false;
}

bool ValidPrefix(std::string_view p) {
  return std::none_of(p.begin(), p.end(), [](char c) {
    return c == '{' || c == '}' || c == '*' || c == '?' || c == '[' ||
           c == ']' || c == '\\';
  });
}

// redis-py / limits options that mean nothing for this client.
constexpr std::string_view kIgnoredOptions[] = {
    "retry_on_timeout",      "retry_on_error",   "retry",
    "health_check_interval", "decode_responses", "encoding",
    "encoding_errors",       "socket_keepalive", "socket_keepalive_options",
    "client_name",           "protocol",         "single_connection_client",
    "max_connections",       "lib_name",         "lib_version",
    "wrap_exceptions",       "implementation",   "socket_type",
    "driver_info",
};

}  // namespace

std::string RedactRedisUri(std::string_view uri) { return Redact(uri); }

std::string_view RedisFailurePolicyName(RedisFailurePolicy policy) {
  switch (policy) {
    case RedisFailurePolicy::kFailOpen:
      return "fail-open";
    case RedisFailurePolicy::kFailClosed:
      return "fail-closed";
    case RedisFailurePolicy::kFallback:
      return "fallback";
  }
  return "unknown";
}

bool ApplyRedisOption(std::string_view name, std::string_view value,
                      RedisStoreOptions* o, std::string* error, bool* ignored) {
  if (ignored != nullptr) *ignored = false;
  const std::string n = Lower(name);
  auto bad = [&](std::string_view expected) {
    *error = "invalid storage option " + std::string(name) + "=" +
             std::string(value) + ": expected " + std::string(expected);
    return false;
  };
  int64_t i = 0;
  int64_t ns = 0;
  bool b = false;
  if (n == "timeout" || n == "socket_timeout" || n == "command_timeout") {
    if (!ParseSeconds(value, &ns) || ns <= 0) return bad("seconds > 0");
    o->command_timeout_nanos = ns;
  } else if (n == "connect_timeout" || n == "socket_connect_timeout") {
    if (!ParseSeconds(value, &ns) || ns <= 0) return bad("seconds > 0");
    o->connect_timeout_nanos = ns;
  } else if (n == "reconnect_min") {
    if (!ParseSeconds(value, &ns)) return bad("seconds >= 0");
    o->reconnect_min_nanos = ns;
  } else if (n == "reconnect_max") {
    if (!ParseSeconds(value, &ns)) return bad("seconds >= 0");
    o->reconnect_max_nanos = ns;
  } else if (n == "ttl_slack") {
    if (!ParseSeconds(value, &ns) || ns < 1'000'000) {
      return bad("seconds >= 0.001");
    }
    o->ttl_slack_nanos = ns;
  } else if (n == "fail_closed_retry_after" || n == "retry_after") {
    if (!ParseSeconds(value, &ns)) return bad("seconds >= 0");
    o->fail_closed_retry_after_nanos = ns;
  } else if (n == "pool_size") {
    if (!ParseInt(value, &i) || i < 1 || i > 64) {
      return bad("an integer from 1 to 64");
    }
    o->pool_size = static_cast<size_t>(i);
  } else if (n == "key_prefix" || n == "prefix") {
    if (!ValidPrefix(value)) {
      return bad("a prefix without '{', '}', '*', '?', '[', ']' or '\\'");
    }
    o->key_prefix = std::string(value);
    // limits and most Redis clients write prefix:key, and ACL key
    // patterns (~myapp:*) are written for that: a prefix ending in a
    // letter or digit gets the colon.
    if (!value.empty() &&
        std::isalnum(static_cast<unsigned char>(value.back())) != 0) {
      o->key_prefix += ':';
    }
  } else if (n == "on_error" || n == "failure_policy") {
    std::string v = Lower(value);
    std::replace(v.begin(), v.end(), '_', '-');
    if (v == "fail-open" || v == "open" || v == "allow") {
      o->on_error = RedisFailurePolicy::kFailOpen;
    } else if (v == "fail-closed" || v == "closed" || v == "reject" ||
               v == "deny") {
      o->on_error = RedisFailurePolicy::kFailClosed;
    } else if (v == "fallback" || v == "memory" || v == "in-memory" ||
               v == "in-memory-fallback") {
      o->on_error = RedisFailurePolicy::kFallback;
    } else {
      return bad("fail-open, fail-closed or fallback");
    }
  } else if (n == "blocked_cache") {
    if (!ParseBool(value, &b)) return bad("a boolean");
    o->blocked_cache = b;
  } else if (n == "blocked_cache_size") {
    if (!ParseInt(value, &i) || i < 1) return bad("an integer >= 1");
    o->blocked_cache_max_keys = static_cast<size_t>(i);
  } else if (n == "fallback_max_keys") {
    if (!ParseInt(value, &i) || i < 1) return bad("an integer >= 1");
    o->fallback.max_keys = static_cast<size_t>(i);
  } else if (n == "db") {
    if (!ParseInt(value, &i) || i < 0) return bad("an integer >= 0");
    o->db = i;
  } else if (n == "username") {
    o->username = std::string(value);
  } else if (n == "password") {
    o->password = std::string(value);
  } else if (n == "ssl" || n.rfind("ssl_", 0) == 0) {
    if (n == "ssl" && ParseBool(value, &b) && !b) {
      if (ignored != nullptr) *ignored = true;
      return true;
    }
    *error = "storage option " + std::string(name) +
             ": TLS needs hiredis with SSL support, which this build of "
             "rapidlimit does not use";
    return false;
  } else if (n == "connection_pool") {
    // It names the server and db (limits uses it instead of the URI):
    // ignoring it would count in another place than the user meant.
    *error =
        "storage option connection_pool: rapidlimit opens its own "
        "connections; give the server, db and credentials in the storage URI";
    return false;
  } else if (std::find(std::begin(kIgnoredOptions), std::end(kIgnoredOptions),
                       n) != std::end(kIgnoredOptions)) {
    if (ignored != nullptr) *ignored = true;
  } else {
    *error = "unknown storage option '" + std::string(name) + "'";
    return false;
  }
  return true;
}

bool ParseRedisUri(std::string_view uri, RedisStoreOptions* o,
                   std::string* error) {
  const std::string shown = Redact(uri);
  auto fail = [&](const std::string& why) {
    *error = "unsupported storage uri '" + shown + "': " + why;
    return false;
  };
  const size_t sep = uri.find("://");
  if (sep == std::string_view::npos) return fail("expected scheme://");
  std::string scheme = Lower(uri.substr(0, sep));
  if (scheme.rfind("rapidlimit+", 0) == 0) scheme.erase(0, 11);
  std::string_view rest = uri.substr(sep + 3);
  // Drop a fragment.
  if (const size_t hash = rest.find('#'); hash != std::string_view::npos) {
    rest = rest.substr(0, hash);
  }
  std::string_view query;
  if (const size_t q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }

  bool unix_socket = false;
  if (scheme == "redis" || scheme == "valkey") {
    unix_socket = false;
  } else if (scheme == "redis+unix" || scheme == "valkey+unix" ||
             scheme == "unix") {
    unix_socket = true;
  } else if (scheme == "rediss" || scheme == "valkeys") {
    return fail(
        "TLS (" + scheme +
        "://) needs hiredis with SSL support, which this build of rapidlimit "
        "does not use; use redis:// (or a TLS proxy)");
  } else if (scheme.find("cluster") != std::string::npos) {
    return fail("Redis Cluster is not supported yet; use redis:// to one node");
  } else if (scheme.find("sentinel") != std::string::npos) {
    return fail("Redis Sentinel is not supported yet; use redis://");
  } else {
    return fail(
        "expected redis://, redis+unix://, unix://, valkey:// or "
        "valkey+unix://");
  }

  // userinfo@ (before the first '/').
  const size_t slash = rest.find('/');
  const size_t at = rest.rfind('@', slash);
  if (at != std::string_view::npos &&
      (slash == std::string_view::npos || at < slash)) {
    const std::string_view info = rest.substr(0, at);
    rest = rest.substr(at + 1);
    const size_t colon = info.find(':');
    std::string user, pass;
    if (colon == std::string_view::npos) {
      if (!PercentDecode(info, &user)) return fail("bad %-escape in user");
    } else {
      if (!PercentDecode(info.substr(0, colon), &user) ||
          !PercentDecode(info.substr(colon + 1), &pass)) {
        return fail("bad %-escape in credentials");
      }
    }
    o->username = user;
    o->password = pass;
  }

  if (unix_socket) {
    std::string path;
    if (!PercentDecode(rest, &path)) return fail("bad %-escape in path");
    if (path.empty() || path[0] != '/') {
      return fail("expected an absolute socket path, as in " + scheme +
                  ":///path/to/redis.sock");
    }
    o->unix_path = path;
  } else {
    const size_t path_start = rest.find('/');
    std::string_view hostport = rest.substr(0, path_start);
    std::string_view path = path_start == std::string_view::npos
                                ? std::string_view()
                                : rest.substr(path_start + 1);
    std::string host;
    std::string_view port_text;
    if (!hostport.empty() && hostport.front() == '[') {
      const size_t close = hostport.find(']');
      if (close == std::string_view::npos) return fail("unclosed '[' in host");
      host = std::string(hostport.substr(1, close - 1));
      std::string_view after = hostport.substr(close + 1);
      if (!after.empty()) {
        if (after.front() != ':') return fail("bad host");
        port_text = after.substr(1);
      }
    } else {
      const size_t colon = hostport.rfind(':');
      if (colon != std::string_view::npos) {
        host = std::string(hostport.substr(0, colon));
        port_text = hostport.substr(colon + 1);
      } else {
        host = std::string(hostport);
      }
    }
    o->host = host.empty() ? "localhost" : host;
    if (!port_text.empty()) {
      int64_t port = 0;
      if (!ParseInt(port_text, &port) || port < 1 || port > 65535) {
        return fail("bad port '" + std::string(port_text) + "'");
      }
      o->port = static_cast<int>(port);
    }
    while (!path.empty() && path.back() == '/') path.remove_suffix(1);
    if (!path.empty()) {
      int64_t db = 0;
      if (!ParseInt(path, &db) || db < 0) {
        return fail("bad database number '" + std::string(path) + "'");
      }
      o->db = db;
    }
  }

  while (!query.empty()) {
    const size_t amp = query.find('&');
    const std::string_view pair = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view()
                                          : query.substr(amp + 1);
    if (pair.empty()) continue;
    const size_t eq = pair.find('=');
    std::string name, value;
    if (!PercentDecode(pair.substr(0, eq), &name, true) ||
        (eq != std::string_view::npos &&
         !PercentDecode(pair.substr(eq + 1), &value, true))) {
      return fail("bad %-escape in query");
    }
    std::string why;
    if (!ApplyRedisOption(name, value, o, &why)) return fail(why);
  }
  return true;
}

}  // namespace rapidlimit
