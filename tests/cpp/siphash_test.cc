// SipHasher13, the incremental form of SipHash13_128: the same hash however
// the input is split, so the bindings can hash a key's parts in place.
#include "siphash.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

namespace rapidlimit::internal {
namespace {

constexpr SipKey kKey = {0x0706050403020100ULL, 0x0f0e0d0c0b0a0908ULL};

std::string Bytes(size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(i * 37 + 11);
  return s;
}

void ExpectSame(const Hash128& a, const Hash128& b) {
  EXPECT_EQ(a.lo, b.lo);
  EXPECT_EQ(a.hi, b.hi);
}

TEST(SipHasher13Test, WholeInputMatchesTheOneShotHash) {
  for (size_t n = 0; n <= 64; ++n) {
    SCOPED_TRACE(n);
    const std::string in = Bytes(n);
    SipHasher13 h(kKey);
    h.Update(in.data(), in.size());
    ExpectSame(h.Finish(), SipHash13_128(kKey, in.data(), in.size()));
  }
}

TEST(SipHasher13Test, EverySplitIntoThreePiecesMatches) {
  for (size_t n = 0; n <= 40; ++n) {
    const std::string in = Bytes(n);
    const Hash128 want = SipHash13_128(kKey, in.data(), in.size());
    for (size_t a = 0; a <= n; ++a) {
      for (size_t b = a; b <= n; ++b) {
        SCOPED_TRACE(std::to_string(n) + ": " + std::to_string(a) + ", " +
                     std::to_string(b));
        SipHasher13 h(kKey);
        h.Update(in.data(), a);
        h.Update(in.data() + a, b - a);
        h.Update(in.data() + b, n - b);
        ExpectSame(h.Finish(), want);
      }
    }
  }
}

TEST(SipHasher13Test, ByteAtATimeAndResumedCopiesMatch) {
  const std::string in = Bytes(300);  // longer than 255: the length wraps
  SipHasher13 h(kKey);
  for (char c : in) h.Update(&c, 1);
  ExpectSame(h.Finish(), SipHash13_128(kKey, in.data(), in.size()));

  SipHasher13 prefix(kKey);
  prefix.Update("LIMITER/", 8);
  for (const std::string tail : {"", "a", "client-1/10/1/minute"}) {
    SipHasher13 resumed = prefix;  // the prefix state is reused, not changed
    resumed.Update(tail.data(), tail.size());
    const std::string whole = "LIMITER/" + tail;
    ExpectSame(resumed.Finish(),
               SipHash13_128(kKey, whole.data(), whole.size()));
  }
}

TEST(SipHasher13Test, FinishWithASuffixMatchesUpdatingWithIt) {
  // Every offset at which the suffix can start, suffixes of up to five
  // words, and an input whose length byte wraps.
  for (size_t head : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{9},
                      size_t{13}, size_t{16}, size_t{23}, size_t{290}}) {
    for (size_t n = 0; n <= 40; ++n) {
      SCOPED_TRACE(std::to_string(head) + " + " + std::to_string(n));
      const std::string in = Bytes(head + n);
      const SipSuffix suffix(in.data() + head, n);
      EXPECT_EQ(suffix.size(), n);
      SipHasher13 h(kKey);
      h.Update(in.data(), head);
      ExpectSame(h.FinishWith(suffix),
                 SipHash13_128(kKey, in.data(), in.size()));
      // The state is not consumed: the suffix can end the next key too.
      h.Update("x", 1);
      SipHasher13 updated = h;
      updated.Update(in.data() + head, n);
      ExpectSame(h.FinishWith(suffix), updated.Finish());
    }
  }
  ExpectSame(SipHasher13(kKey).FinishWith(SipSuffix()),
             SipHash13_128(kKey, "", 0));
}

TEST(SipHasher13Test, FinishDoesNotConsumeTheState) {
  SipHasher13 h(kKey);
  h.Update("abc", 3);
  const Hash128 first = h.Finish();
  ExpectSame(h.Finish(), first);
  h.Update("def", 3);
  ExpectSame(h.Finish(), SipHash13_128(kKey, "abcdef", 6));
}

TEST(SipHasher13Test, KeyAndEveryByteMatter) {
  const std::string in = Bytes(20);
  const Hash128 base = SipHash13_128(kKey, in.data(), in.size());
  const Hash128 other_key =
      SipHash13_128(SipKey{kKey.k0 + 1, kKey.k1}, in.data(), in.size());
  EXPECT_NE(base.lo, other_key.lo);
  for (size_t i = 0; i < in.size(); ++i) {
    std::string flipped = in;
    flipped[i] ^= 1;
    SipHasher13 h(kKey);
    h.Update(flipped.data(), flipped.size());
    const Hash128 got = h.Finish();
    EXPECT_NE(got.lo, base.lo) << i;
    EXPECT_NE(got.hi, base.hi) << i;
  }
}

}  // namespace
}  // namespace rapidlimit::internal
