// The Redis store in a build without hiredis: URIs still parse (so that a
// bad URI is reported as such), and creating a store says what is missing.
#include "rapidlimit/redis_store.h"

namespace rapidlimit {

DecisionSource RedisStore::LastSource() { return DecisionSource::kStore; }

const std::string& RedisStore::LastError() {
  static const std::string* const none = new std::string;
  return *none;
}

bool RedisStore::LastTimedOut() { return false; }

bool RedisStoreAvailable() { return false; }

std::unique_ptr<RedisStore> NewRedisStore(const RedisStoreOptions&,
                                          std::string* error) {
  *error =
      "rapidlimit was built without hiredis, so it has no Redis storage; "
      "install libhiredis-dev (and pkg-config) and reinstall rapidlimit";
  return nullptr;
}

}  // namespace rapidlimit
