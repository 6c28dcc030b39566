#include <gtest/gtest.h>

#include <string>

#include "rapidlimit/redis_store.h"

namespace rapidlimit {
namespace {

RedisStoreOptions Parse(const std::string& uri) {
  RedisStoreOptions o;
  std::string error;
  EXPECT_TRUE(ParseRedisUri(uri, &o, &error)) << uri << ": " << error;
  return o;
}

std::string ParseError(const std::string& uri) {
  RedisStoreOptions o;
  std::string error;
  EXPECT_FALSE(ParseRedisUri(uri, &o, &error)) << uri;
  return error;
}

TEST(RedisUri, HostPortDb) {
  const RedisStoreOptions o = Parse("redis://example.com:6380/3");
  EXPECT_EQ(o.host, "example.com");
  EXPECT_EQ(o.port, 6380);
  EXPECT_EQ(o.db, 3);
  EXPECT_TRUE(o.unix_path.empty());
  EXPECT_TRUE(o.password.empty());
}

TEST(RedisUri, Defaults) {
  const RedisStoreOptions o = Parse("redis://");
  EXPECT_EQ(o.host, "localhost");
  EXPECT_EQ(o.port, 6379);
  EXPECT_EQ(o.db, 0);
  EXPECT_EQ(Parse("redis://h").port, 6379);
  EXPECT_EQ(Parse("redis://h/").db, 0);
}

TEST(RedisUri, Credentials) {
  RedisStoreOptions o = Parse("redis://:s%40cret@h:1/0");
  EXPECT_EQ(o.password, "s@cret");
  EXPECT_TRUE(o.username.empty());
  o = Parse("redis://alice:pw+x@h");
  EXPECT_EQ(o.username, "alice");
  EXPECT_EQ(o.password, "pw+x");  // '+' is literal outside the query
  o = Parse("redis://bob@h");
  EXPECT_EQ(o.username, "bob");
  EXPECT_TRUE(o.password.empty());
}

TEST(RedisUri, Ipv6) {
  const RedisStoreOptions o = Parse("redis://[::1]:7000/2");
  EXPECT_EQ(o.host, "::1");
  EXPECT_EQ(o.port, 7000);
  EXPECT_EQ(o.db, 2);
}

TEST(RedisUri, UnixSockets) {
  for (const char* uri :
       {"redis+unix:///run/redis.sock", "unix:///run/redis.sock",
        "valkey+unix:///run/redis.sock",
        "rapidlimit+redis+unix:///run/redis.sock"}) {
    const RedisStoreOptions o = Parse(uri);
    EXPECT_EQ(o.unix_path, "/run/redis.sock") << uri;
  }
  const RedisStoreOptions o =
      Parse("unix://:pw@/run/redis.sock?db=4&timeout=0.05");
  EXPECT_EQ(o.unix_path, "/run/redis.sock");
  EXPECT_EQ(o.password, "pw");
  EXPECT_EQ(o.db, 4);
  EXPECT_EQ(o.command_timeout_nanos, 50'000'000);
  EXPECT_NE(ParseError("unix://relative.sock").find("absolute"),
            std::string::npos);
}

TEST(RedisUri, AliasesAndPrefix) {
  EXPECT_EQ(Parse("valkey://v:1").host, "v");
  EXPECT_EQ(Parse("rapidlimit+redis://r:2").port, 2);
  EXPECT_EQ(Parse("REDIS://r:2").port, 2);
}

TEST(RedisUri, QueryOptions) {
  const RedisStoreOptions o = Parse(
      "redis://h?socket_timeout=0.25&socket_connect_timeout=2&key_prefix=app:"
      "&on_error=fallback&blocked_cache=false&pool_size=3"
      "&retry_on_timeout=true&health_check_interval=30");
  EXPECT_EQ(o.command_timeout_nanos, 250'000'000);
  EXPECT_EQ(o.connect_timeout_nanos, 2'000'000'000);
  EXPECT_EQ(o.key_prefix, "app:");
  EXPECT_EQ(o.on_error, RedisFailurePolicy::kFallback);
  EXPECT_FALSE(o.blocked_cache);
  EXPECT_EQ(o.pool_size, 3u);
}

TEST(RedisUri, PrefixGetsTheColonLimitsWrites) {
  // As limits' prefix:key, so that ACL key patterns like ~app:* match.
  EXPECT_EQ(Parse("redis://h?key_prefix=app").key_prefix, "app:");
  EXPECT_EQ(Parse("redis://h?key_prefix=app2").key_prefix, "app2:");
  EXPECT_EQ(Parse("redis://h?key_prefix=app:").key_prefix, "app:");
  EXPECT_EQ(Parse("redis://h?key_prefix=app/").key_prefix, "app/");
  EXPECT_EQ(Parse("redis://h?key_prefix=").key_prefix, "");
}

TEST(RedisUri, UnsupportedSchemesNameTheUri) {
  std::string e = ParseError("rediss://h:6380");
  EXPECT_NE(e.find("rediss://h:6380"), std::string::npos) << e;
  EXPECT_NE(e.find("TLS"), std::string::npos) << e;
  e = ParseError("valkeys://h");
  EXPECT_NE(e.find("TLS"), std::string::npos) << e;
  e = ParseError("redis+cluster://h:7000");
  EXPECT_NE(e.find("Cluster"), std::string::npos) << e;
  EXPECT_NE(e.find("redis+cluster://h:7000"), std::string::npos) << e;
  e = ParseError("redis+sentinel://h/mymaster");
  EXPECT_NE(e.find("Sentinel"), std::string::npos) << e;
  e = ParseError("memcached://h");
  EXPECT_NE(e.find("memcached://h"), std::string::npos) << e;
}

TEST(RedisUri, PasswordsAreRedactedInErrors) {
  const std::string e = ParseError("rediss://user:topsecret@h:1");
  EXPECT_EQ(e.find("topsecret"), std::string::npos) << e;
  EXPECT_NE(e.find("***"), std::string::npos) << e;
}

TEST(RedisUri, BadValues) {
  EXPECT_NE(ParseError("redis://h:notaport").find("port"), std::string::npos);
  EXPECT_NE(ParseError("redis://h:70000").find("port"), std::string::npos);
  EXPECT_NE(ParseError("redis://h/x").find("database"), std::string::npos);
  EXPECT_NE(ParseError("redis://h?timeout=-1").find("timeout"),
            std::string::npos);
  EXPECT_NE(ParseError("redis://h?bogus=1").find("bogus"), std::string::npos);
  EXPECT_NE(ParseError("redis://h?key_prefix=a{b").find("key_prefix"),
            std::string::npos);
  EXPECT_NE(ParseError("redis://h?on_error=maybe").find("on_error"),
            std::string::npos);
  EXPECT_NE(ParseError("redis://h?ssl=true").find("TLS"), std::string::npos);
}

TEST(RedisUri, ApplyOption) {
  RedisStoreOptions o;
  std::string error;
  bool ignored = false;
  EXPECT_TRUE(ApplyRedisOption("on_error", "fail_open", &o, &error, &ignored));
  EXPECT_EQ(o.on_error, RedisFailurePolicy::kFailOpen);
  EXPECT_FALSE(ignored);
  EXPECT_TRUE(
      ApplyRedisOption("decode_responses", "True", &o, &error, &ignored));
  EXPECT_TRUE(ignored);
  EXPECT_TRUE(ApplyRedisOption("fail_closed_retry_after", "2.5", &o, &error));
  EXPECT_EQ(o.fail_closed_retry_after_nanos, 2'500'000'000);
  EXPECT_FALSE(ApplyRedisOption("pool_size", "0", &o, &error));
  EXPECT_EQ(RedisFailurePolicyName(RedisFailurePolicy::kFallback), "fallback");
}

}  // namespace
}  // namespace rapidlimit
