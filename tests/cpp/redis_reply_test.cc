// The decision script's reply format, read without a server: a flag byte
// per processed limit, then 3, 4 or 5 doubles.
#ifdef RAPIDLIMIT_HAVE_HIREDIS

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "redis_internal.h"

namespace rapidlimit::redis {
namespace {

std::string Block(uint8_t flags, std::vector<int64_t> doubles) {
  std::string out(1, static_cast<char>(flags));
  for (int64_t v : doubles) AppendDouble(v, &out);
  return out;
}

TEST(RedisReply, FoundValuesAndPackedValues) {
  // Two requests: one limit (found value of 3 doubles), then two limits
  // (found value of 4 doubles, then x1 .. x5 packed).
  const std::string reply =
      Block(kReplyAllowed | kReplyLast | kReplyFound3, {5, 1700000060, 7}) +
      Block(kReplyFresh | kReplyFound4, {1, 2, 3, 99}) +
      Block(kReplyLast | kReplyPacked, {10, 11, 12, 13, 14});
  size_t pos = 0;
  std::vector<int64_t> v;
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, 0, false, &v));
  EXPECT_EQ(v, (std::vector<int64_t>{1, 1, 0, 5, 1700000060, 7, 0, 0}));
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 2, 0, false, &v));
  EXPECT_EQ(v, (std::vector<int64_t>{2, 0, 1, 1, 2, 3, 99, 0, 0, 0, 10, 11, 12,
                                     13, 14}));
  EXPECT_EQ(pos, reply.size());
}

TEST(RedisReply, FreshStateWithoutValues) {
  const std::string reply =
      Block(kReplyAllowed | kReplyFresh | kReplyLast | kReplyNone, {}) +
      Block(kReplyFresh | kReplyLast | kReplyNone, {});
  size_t pos = 0;
  std::vector<int64_t> v;
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, 0, false, &v));
  EXPECT_EQ(v, (std::vector<int64_t>{1, 1, 1, 0, 0, 0, 0, 0}));
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, 0, false, &v));
  EXPECT_EQ(v, (std::vector<int64_t>{1, 0, 1, 0, 0, 0, 0, 0}));
  EXPECT_EQ(pos, reply.size());
  // 24 such blocks are as long as a bare value (below), which only a call
  // with one request may answer.
  const std::string many(24, static_cast<char>(kReplyAllowed | kReplyFresh |
                                               kReplyLast | kReplyNone));
  pos = 0;
  for (int i = 0; i < 24; ++i) {
    ASSERT_TRUE(ReadReplyBlock(many, &pos, 1, 0, false, &v));
    EXPECT_EQ(v, (std::vector<int64_t>{1, 1, 1, 0, 0, 0, 0, 0}));
  }
  EXPECT_EQ(pos, many.size());
}

TEST(RedisReply, BareFoundValueIsAllowedAndLast) {
  // A call's only request with one limit, allowed on a value found: the
  // value without its flag byte (3 doubles: fixed window, 4: token
  // bucket), fresh when its expiry or TAT is not after now.
  constexpr int64_t kSecond = 1'000'000'000;
  const int64_t now = 1700000060 * kSecond + 7;
  struct Case {
    std::vector<int64_t> found;
    int64_t fresh;
  };
  for (const Case& c :
       {Case{{5, 1700000060, 8}, 0}, Case{{5, 1700000060, 7}, 1},
        Case{{1700000061, 0, 3, 1700000100}, 0},
        Case{{1700000060, 7, 3, 1700000100}, 1}}) {
    std::string reply;
    for (int64_t x : c.found) AppendDouble(x, &reply);
    size_t pos = 0;
    std::vector<int64_t> v;
    ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, now, true, &v));
    std::vector<int64_t> want = {1, 1, c.fresh};
    want.insert(want.end(), c.found.begin(), c.found.end());
    want.resize(1 + kValuesPerItem);
    EXPECT_EQ(v, want);
    EXPECT_EQ(pos, reply.size());
  }
}

TEST(RedisReply, MalformedBlocksAreRejected) {
  std::vector<int64_t> v;
  size_t pos = 0;
  EXPECT_FALSE(ReadReplyBlock("", &pos, 1, 0, false, &v));
  // Truncated doubles.
  std::string cut = Block(kReplyLast | kReplyFound3, {1, 2, 3});
  cut.pop_back();
  pos = 0;
  EXPECT_FALSE(ReadReplyBlock(cut, &pos, 1, 0, false, &v));
  // No values for a state that is not fresh, and unknown flag bits.
  pos = 0;
  EXPECT_FALSE(ReadReplyBlock(Block(kReplyLast | kReplyNone, {1, 2, 3}), &pos,
                              1, 0, false, &v));
  pos = 0;
  EXPECT_FALSE(ReadReplyBlock(Block(kReplyLast | kReplyFound3 | 32, {1, 2, 3}),
                              &pos, 1, 0, false, &v));
  // More limits than the request has: no last flag within `items`.
  const std::string two = Block(kReplyFound3, {1, 2, 3}) +
                          Block(kReplyLast | kReplyFound3, {1, 2, 3});
  pos = 0;
  EXPECT_FALSE(ReadReplyBlock(two, &pos, 1, 0, false, &v));
  pos = 0;
  EXPECT_TRUE(ReadReplyBlock(two, &pos, 2, 0, false, &v));
}

}  // namespace
}  // namespace rapidlimit::redis

#endif  // RAPIDLIMIT_HAVE_HIREDIS
