// The decision script's reply format, read without a server: a flag byte
// per processed limit, then 3, 4 or 5 doubles.
#ifdef RAPIDLIMIT_HAVE_HIREDIS

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
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
  std::string err;
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, 0, false, &v, &err));
  EXPECT_EQ(v, (std::vector<int64_t>{1, 1, 0, 5, 1700000060, 7, 0, 0}));
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 2, 0, false, &v, &err));
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
  std::string err;
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, 0, false, &v, &err));
  EXPECT_EQ(v, (std::vector<int64_t>{1, 1, 1, 0, 0, 0, 0, 0}));
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, 0, false, &v, &err));
  EXPECT_EQ(v, (std::vector<int64_t>{1, 0, 1, 0, 0, 0, 0, 0}));
  EXPECT_EQ(pos, reply.size());
  // 24 such blocks are as long as a bare value (below), which only a call
  // with one request may answer.
  const std::string many(24, static_cast<char>(kReplyAllowed | kReplyFresh |
                                               kReplyLast | kReplyNone));
  pos = 0;
  for (int i = 0; i < 24; ++i) {
    ASSERT_TRUE(ReadReplyBlock(many, &pos, 1, 0, false, &v, &err));
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
    std::string err;
    ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, now, true, &v, &err));
    std::vector<int64_t> want = {1, 1, c.fresh};
    want.insert(want.end(), c.found.begin(), c.found.end());
    want.resize(1 + kValuesPerItem);
    EXPECT_EQ(v, want);
    EXPECT_EQ(pos, reply.size());
  }
}

TEST(RedisReply, MalformedBlocksAreRejected) {
  std::vector<int64_t> v;
  std::string err;
  size_t pos = 0;
  EXPECT_FALSE(ReadReplyBlock("", &pos, 1, 0, false, &v, &err));
  // Truncated doubles.
  std::string cut = Block(kReplyLast | kReplyFound3, {1, 2, 3});
  cut.pop_back();
  pos = 0;
  EXPECT_FALSE(ReadReplyBlock(cut, &pos, 1, 0, false, &v, &err));
  // No values for a state that is not fresh, and unknown flag bits.
  pos = 0;
  EXPECT_FALSE(ReadReplyBlock(Block(kReplyLast | kReplyNone, {1, 2, 3}), &pos,
                              1, 0, false, &v, &err));
  pos = 0;
  EXPECT_FALSE(ReadReplyBlock(Block(kReplyLast | kReplyFound3 | 32, {1, 2, 3}),
                              &pos, 1, 0, false, &v, &err));
  // More limits than the request has: no last flag within `items`.
  const std::string two = Block(kReplyFound3, {1, 2, 3}) +
                          Block(kReplyLast | kReplyFound3, {1, 2, 3});
  pos = 0;
  EXPECT_FALSE(ReadReplyBlock(two, &pos, 1, 0, false, &v, &err));
  pos = 0;
  EXPECT_TRUE(ReadReplyBlock(two, &pos, 2, 0, false, &v, &err));
}

// A request whose key Redis refused: kReplyError, its limit number and the
// message's length, then the message, in place of its blocks.
std::string Refused(int64_t limit, const std::string& message) {
  std::string out(1, static_cast<char>(kReplyError));
  AppendDouble(limit, &out);
  AppendDouble(static_cast<int64_t>(message.size()), &out);
  return out + message;
}

TEST(RedisReply, RefusedRequestBetweenDecidedOnes) {
  const std::string wrongtype =
      "WRONGTYPE Operation against a key holding the wrong kind of value";
  const std::string reply =
      Block(kReplyAllowed | kReplyLast | kReplyFound3, {5, 1700000060, 7}) +
      Refused(2, wrongtype) +
      Block(kReplyAllowed | kReplyFresh | kReplyLast | kReplyNone, {});
  size_t pos = 0;
  std::vector<int64_t> v;
  std::string err;
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, 0, false, &v, &err));
  EXPECT_EQ(v[0], 1);
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 3, 0, false, &v, &err));
  EXPECT_EQ(v, (std::vector<int64_t>{0, 1}));  // none processed; limit 2
  EXPECT_EQ(err, wrongtype);
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, 0, false, &v, &err));
  EXPECT_EQ(v[0], 1);
  EXPECT_EQ(pos, reply.size());
  // Alone in its call: the script pads a message of 7 bytes (or 15),
  // which would make the block as long as a bare value.
  const std::string alone = Refused(1, "7 bytes ");
  ASSERT_EQ(alone.size(), 3 * sizeof(double) + 1);
  pos = 0;
  ASSERT_TRUE(ReadReplyBlock(alone, &pos, 1, 0, true, &v, &err));
  EXPECT_EQ(v, (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(err, "7 bytes ");
  EXPECT_EQ(pos, alone.size());
}

// Another application's string of a state's length, read as a state:
// numbers no state has refuse that request alone, whose block is whole.
TEST(RedisReply, NumbersNoStateHasRefuseTheirRequestAlone) {
  const auto bits = [](double d) {
    std::string out(sizeof(d), '\0');
    std::memcpy(out.data(), &d, sizeof(d));
    return out;
  };
  const std::string inf = bits(std::numeric_limits<double>::infinity());
  const std::string nan = bits(std::numeric_limits<double>::quiet_NaN());
  const std::string huge = bits(8.8e228);
  std::string second = Block(kReplyAllowed | kReplyFound3, {1, 2, 3});
  second += static_cast<char>(kReplyLast | kReplyFound4);
  second += Block(0, {1700000061, 0}).substr(1) + nan + inf;
  const std::string reply =
      Block(kReplyAllowed | kReplyLast | kReplyFound3, {5, 1700000060, 7}) +
      second + Block(kReplyAllowed | kReplyLast | kReplyFound3, {1, 2, 3});
  size_t pos = 0;
  std::vector<int64_t> v;
  std::string err;
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, 0, false, &v, &err));
  EXPECT_EQ(v[0], 1);
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 2, 0, false, &v, &err));
  EXPECT_EQ(v, (std::vector<int64_t>{0, 1}));  // refused at its limit 2
  EXPECT_NE(err.find("no state"), std::string::npos) << err;
  ASSERT_TRUE(ReadReplyBlock(reply, &pos, 1, 0, false, &v, &err));
  EXPECT_EQ(v[0], 1);
  EXPECT_EQ(pos, reply.size());
  // The bare value of a call's only request (24 bytes of text under a
  // fixed window's key read as 8.8e228 and the like).
  for (const std::string& bare :
       {huge + huge + huge, Block(0, {1, 2, 3}).substr(1, 16) + nan}) {
    pos = 0;
    err.clear();
    ASSERT_TRUE(ReadReplyBlock(bare, &pos, 1, 0, true, &v, &err));
    EXPECT_EQ(v, (std::vector<int64_t>{0, 0}));
    EXPECT_NE(err.find("no state"), std::string::npos);
    EXPECT_EQ(pos, bare.size());
  }
}

TEST(RedisReply, MalformedRefusalsAreRejected) {
  std::vector<int64_t> v;
  std::string err;
  size_t pos = 0;
  // A limit the request does not have, or none.
  EXPECT_FALSE(ReadReplyBlock(Refused(3, "x"), &pos, 2, 0, false, &v, &err));
  pos = 0;
  EXPECT_FALSE(ReadReplyBlock(Refused(0, "x"), &pos, 2, 0, false, &v, &err));
  // A message longer than the reply, and a truncated header.
  std::string cut = Refused(1, "message");
  cut.pop_back();
  pos = 0;
  EXPECT_FALSE(ReadReplyBlock(cut, &pos, 1, 0, false, &v, &err));
  pos = 0;
  EXPECT_FALSE(
      ReadReplyBlock(Refused(1, "").substr(0, 9), &pos, 1, 0, false, &v, &err));
}

}  // namespace
}  // namespace rapidlimit::redis

#endif  // RAPIDLIMIT_HAVE_HIREDIS
