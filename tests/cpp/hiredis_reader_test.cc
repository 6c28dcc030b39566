// The parts of hiredis's reply reader the store relies on, on whichever
// hiredis the build links (Debian's 0.14 or a 1.x): run without a server.
#ifdef RAPIDLIMIT_HAVE_HIREDIS

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "hiredis_include.h"

namespace rapidlimit::redis {
namespace {

struct ReaderDeleter {
  void operator()(redisReader* r) const { redisReaderFree(r); }
};
struct ReplyDeleter {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using ReaderPtr = std::unique_ptr<redisReader, ReaderDeleter>;
using ReplyPtr = std::unique_ptr<redisReply, ReplyDeleter>;

ReplyPtr Next(redisReader* reader) {
  void* reply = nullptr;
  EXPECT_EQ(redisReaderGetReply(reader, &reply), REDIS_OK) << reader->errstr;
  return ReplyPtr(static_cast<redisReply*>(reply));
}

// Compiled against one hiredis's header and linked with another's library
// (Debian's /usr/include/hiredis taken ahead of a 1.x from pkg-config),
// the fields read here are at the wrong offsets: 1.x's redisReply has a
// double before `len` and a type tag before `elements`.
TEST(HiredisReader, RepliesReadThroughTheHeadersStructs) {
  ReaderPtr reader(redisReaderCreate());
  ASSERT_NE(reader, nullptr);
  // The script's reply is binary: NULs, CR LF and high bytes in a bulk
  // string, fed in pieces as recv() returns them.
  const std::string body("\x01\0\r\n\xff$3\r\n", 9);
  const std::string wire = ":-42\r\n$" + std::to_string(body.size()) + "\r\n" +
                           body + "\r\n*2\r\n+OK\r\n-ERR no\r\n";
  for (char c : wire) {
    ASSERT_EQ(redisReaderFeed(reader.get(), &c, 1), REDIS_OK);
  }
  ReplyPtr r = Next(reader.get());
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->type, REDIS_REPLY_INTEGER);
  EXPECT_EQ(r->integer, -42);
  r = Next(reader.get());
  ASSERT_NE(r, nullptr);
  ASSERT_EQ(r->type, REDIS_REPLY_STRING);
  EXPECT_EQ(std::string(r->str, r->len), body);
  r = Next(reader.get());
  ASSERT_NE(r, nullptr);
  ASSERT_EQ(r->type, REDIS_REPLY_ARRAY);
  ASSERT_EQ(r->elements, 2u);
  EXPECT_EQ(r->element[0]->type, REDIS_REPLY_STATUS);
  EXPECT_EQ(std::string(r->element[0]->str, r->element[0]->len), "OK");
  EXPECT_EQ(r->element[1]->type, REDIS_REPLY_ERROR);
  EXPECT_EQ(std::string(r->element[1]->str, r->element[1]->len), "ERR no");
  EXPECT_EQ(Next(reader.get()), nullptr);  // nothing more buffered
}

// The store breaks the connection with the reader's message.
TEST(HiredisReader, ProtocolErrorIsReportedWithAMessage) {
  ReaderPtr reader(redisReaderCreate());
  ASSERT_NE(reader, nullptr);
  const std::string wire = "?what\r\n";
  ASSERT_EQ(redisReaderFeed(reader.get(), wire.data(), wire.size()), REDIS_OK);
  void* reply = nullptr;
  EXPECT_EQ(redisReaderGetReply(reader.get(), &reply), REDIS_ERR);
  EXPECT_EQ(reply, nullptr);
  EXPECT_NE(reader->err, 0);
  EXPECT_STRNE(reader->errstr, "");
}

}  // namespace
}  // namespace rapidlimit::redis

#endif  // RAPIDLIMIT_HAVE_HIREDIS
