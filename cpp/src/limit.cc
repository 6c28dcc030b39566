#include "rapidlimit/limit.h"

#include <array>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace rapidlimit {

namespace {

struct GranularityInfo {
  std::string_view name;
};

// Indexed by Granularity; the lengths live beside GranularitySeconds in
// limit.h (month and year are 30 and 360 days, as in `limits`).
constexpr std::array<GranularityInfo, 6> kGranularities = {{
    {"second"},
    {"minute"},
    {"hour"},
    {"day"},
    {"month"},
    {"year"},
}};

const GranularityInfo& InfoFor(Granularity g) {
  const size_t index = static_cast<size_t>(g);
  // A value outside the enum can only come from a bad cast; answering
  // "second" keeps callers away from out-of-bounds reads.
  return index < kGranularities.size() ? kGranularities[index]
                                       : kGranularities[0];
}

void AppendInt(std::string* out, int64_t value) {
  char buffer[24];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), value);
  out->append(buffer, result.ptr);
}

// ---------------------------------------------------------------------------
// The parser.
//
// `limits` validates with the regex (IGNORECASE | VERBOSE)
//
//   ^ S (:? [,;|] S)* $   where
//   S = \s*([0-9]+) \s*(/|\s*per\s*) \s*([0-9]+)? \s*([a-z]+) \s*
//
// then splits on [,;|] and re-matches S (a prefix match) on every piece to
// read the groups. S contains neither a separator nor ':', so the
// separators in the text are exactly the split points, and a piece that is
// not the last may end in one ':' (the "(:?" group is a typo for "(?:" that
// makes a colon before a separator legal). Every repetition in S is followed
// by something it cannot match, so a single greedy left-to-right pass makes
// the same decisions as the backtracking regex; the scanner below is that
// pass.
//
// Python's regex runs on code points, and with IGNORECASE `[a-z]` also
// matches four non-ASCII letters, while `\s` is Unicode whitespace. The
// input here is UTF-8, so those code points are decoded where they matter.
// ---------------------------------------------------------------------------

// What one piece matched, as views into the input.
struct Piece {
  std::string_view amount;
  std::string_view multiples;  // Empty when omitted.
  std::string_view granularity;
  Granularity unit = Granularity::kSecond;  // Set once the name is looked up.
};

bool IsSeparator(char c) { return c == ',' || c == ';' || c == '|'; }

bool IsAsciiDigit(char c) { return c >= '0' && c <= '9'; }

bool IsAsciiLetter(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

char AsciiLower(char c) {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

// Python's `\s` on ASCII also covers the four information separators
// (0x1c-0x1f), which C's isspace() does not.
bool IsAsciiSpace(unsigned char c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20);
}

// The non-ASCII code points Python's `\s` matches (str.isspace()).
bool IsUnicodeSpace(uint32_t cp) {
  return cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202f || cp == 0x205f || cp == 0x3000;
}

// The non-ASCII code points `[a-z]` matches under re.IGNORECASE: dotted
// capital I, dotless i, long s and the Kelvin sign. None of them lower-cases
// to a granularity name, so they only turn a syntax error into a
// "no granularity matched" error, but that is the message `limits` gives.
bool IsUnicodeLetter(uint32_t cp) {
  return cp == 0x130 || cp == 0x131 || cp == 0x17f || cp == 0x212a;
}

// Decodes the UTF-8 sequence starting at text[pos]. Returns its length, or
// 0 when it is malformed, truncated, overlong or a surrogate; callers treat
// such bytes as a character that nothing in the grammar accepts.
size_t DecodeUtf8(std::string_view text, size_t pos, uint32_t* cp) {
  const auto byte = [&](size_t i) {
    return static_cast<unsigned char>(text[pos + i]);
  };
  const unsigned char lead = byte(0);
  size_t length;
  uint32_t value;
  uint32_t min_value;
  if (lead < 0x80) {
    *cp = lead;
    return 1;
  } else if ((lead & 0xe0) == 0xc0) {
    length = 2;
    value = lead & 0x1f;
    min_value = 0x80;
  } else if ((lead & 0xf0) == 0xe0) {
    length = 3;
    value = lead & 0x0f;
    min_value = 0x800;
  } else if ((lead & 0xf8) == 0xf0) {
    length = 4;
    value = lead & 0x07;
    min_value = 0x10000;
  } else {
    return 0;
  }
  if (text.size() - pos < length) return 0;
  for (size_t i = 1; i < length; ++i) {
    if ((byte(i) & 0xc0) != 0x80) return 0;
    value = (value << 6) | (byte(i) & 0x3f);
  }
  if (value < min_value || value > 0x10ffff ||
      (value >= 0xd800 && value <= 0xdfff)) {
    return 0;
  }
  *cp = value;
  return length;
}

class Scanner {
 public:
  explicit Scanner(std::string_view text) : text_(text) {}

  bool AtEnd() const { return pos_ >= text_.size(); }
  char Peek(size_t ahead = 0) const {
    return pos_ + ahead < text_.size() ? text_[pos_ + ahead] : '\0';
  }
  bool HasAhead(size_t ahead) const { return pos_ + ahead < text_.size(); }
  void Advance(size_t n) { pos_ += n; }

  // \s*
  void SkipSpace() {
    while (!AtEnd()) {
      const auto c = static_cast<unsigned char>(text_[pos_]);
      if (c < 0x80) {
        if (!IsAsciiSpace(c)) return;
        ++pos_;
        continue;
      }
      uint32_t cp;
      const size_t length = DecodeUtf8(text_, pos_, &cp);
      if (length == 0 || !IsUnicodeSpace(cp)) return;
      pos_ += length;
    }
  }

  // [0-9]+ (possibly empty); returns what it consumed.
  std::string_view Digits() {
    const size_t start = pos_;
    while (!AtEnd() && IsAsciiDigit(text_[pos_])) ++pos_;
    return text_.substr(start, pos_ - start);
  }

  // [a-z]+ under IGNORECASE (possibly empty); returns what it consumed.
  std::string_view Letters() {
    const size_t start = pos_;
    while (!AtEnd()) {
      const auto c = static_cast<unsigned char>(text_[pos_]);
      if (c < 0x80) {
        if (!IsAsciiLetter(static_cast<char>(c))) break;
        ++pos_;
        continue;
      }
      uint32_t cp;
      const size_t length = DecodeUtf8(text_, pos_, &cp);
      if (length == 0 || !IsUnicodeLetter(cp)) break;
      pos_ += length;
    }
    return text_.substr(start, pos_ - start);
  }

  // One match of S; false when the text at this point is not one.
  bool ScanPiece(Piece* piece) {
    SkipSpace();
    piece->amount = Digits();
    if (piece->amount.empty()) return false;
    SkipSpace();
    if (Peek() == '/') {
      Advance(1);
    } else if (HasAhead(2) && AsciiLower(Peek(0)) == 'p' &&
               AsciiLower(Peek(1)) == 'e' && AsciiLower(Peek(2)) == 'r') {
      // No non-ASCII code point folds to 'p', 'e' or 'r', so ASCII
      // case-folding is the whole of IGNORECASE here.
      Advance(3);
    } else {
      return false;
    }
    SkipSpace();
    piece->multiples = Digits();
    SkipSpace();
    piece->granularity = Letters();
    if (piece->granularity.empty()) return false;
    SkipSpace();
    return true;
  }

 private:
  std::string_view text_;
  size_t pos_ = 0;
};

// Runs the regex `limits` validates with; on success `pieces` holds every
// limit in order.
bool ScanAll(std::string_view text, std::vector<Piece>* pieces) {
  size_t separators = 0;
  for (char c : text) separators += IsSeparator(c) ? 1 : 0;
  pieces->reserve(separators + 1);
  Scanner scanner(text);
  while (true) {
    Piece piece;
    if (!scanner.ScanPiece(&piece)) return false;
    pieces->push_back(piece);
    if (scanner.AtEnd()) return true;
    if (scanner.Peek() == ':') scanner.Advance(1);
    if (!IsSeparator(scanner.Peek())) return false;
    scanner.Advance(1);
  }
}

// granularity_from_string(): the name or the name plus "s", compared after
// str.lower(). Only the Kelvin sign lower-cases to ASCII ('k'), which no
// name contains, so any non-ASCII byte means no match.
bool LookupGranularity(std::string_view text, Granularity* out) {
  for (size_t i = 0; i < kGranularities.size(); ++i) {
    const std::string_view name = kGranularities[i].name;
    if (text.size() != name.size() && text.size() != name.size() + 1) {
      continue;
    }
    bool equal = true;
    for (size_t j = 0; j < name.size() && equal; ++j) {
      equal = AsciiLower(text[j]) == name[j];
    }
    if (equal && text.size() == name.size() + 1) {
      equal = AsciiLower(text.back()) == 's';
    }
    if (equal) {
      *out = static_cast<Granularity>(i);
      return true;
    }
  }
  return false;
}

// Parses ASCII digits, returning false when the value exceeds `max`.
// Leading zeros never overflow, because `limits` reads the digits with
// int() and "000…0001" is 1 however long it is.
bool DigitsToInt(std::string_view digits, int64_t max, int64_t* out) {
  int64_t value = 0;
  for (char c : digits) {
    const int64_t digit = c - '0';
    if (value > (max - digit) / 10) return false;
    value = value * 10 + digit;
  }
  *out = value;
  return true;
}

std::string CouldNotParse(std::string_view text) {
  std::string message = "couldn't parse rate limit string '";
  message.append(text);
  message.push_back('\'');
  return message;
}

// Echoing a multi-megabyte string into an exception would flood logs, so
// the message quotes a prefix, cut on a UTF-8 boundary so that Python can
// still decode it.
std::string TooLong(std::string_view text) {
  constexpr size_t kQuoted = 64;
  size_t cut = kQuoted;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xc0) == 0x80) {
    --cut;
  }
  std::string message = "couldn't parse rate limit string '";
  message.append(text.substr(0, cut));
  message.append("...' (longer than ");
  AppendInt(&message, static_cast<int64_t>(kMaxLimitStringLength));
  message.append(" bytes)");
  return message;
}

}  // namespace

std::string_view GranularityName(Granularity g) { return InfoFor(g).name; }

std::string Limit::ToString() const {
  std::string out;
  AppendInt(&out, amount);
  out.append(" per ");
  AppendInt(&out, multiples);
  out.push_back(' ');
  out.append(GranularityName(granularity));
  return out;
}

std::string Limit::KeyFor(
    const std::vector<std::string_view>& identifiers) const {
  size_t size = namespace_.size() + 48;
  for (std::string_view id : identifiers) size += id.size() + 1;
  std::string key;
  key.reserve(size);
  key.append(namespace_);
  for (std::string_view id : identifiers) {
    key.push_back('/');
    key.append(id);
  }
  AppendKeySuffix(&key);
  return key;
}

void Limit::AppendKeySuffix(std::string* out) const {
  out->push_back('/');
  AppendInt(out, amount);
  out->push_back('/');
  AppendInt(out, multiples);
  out->push_back('/');
  out->append(GranularityName(granularity));
}

// `limits` ignores the namespace in __eq__ (but not in __hash__, which
// breaks Python's hash contract); we follow __eq__ and keep Hash consistent
// with it. Burst is ours and changes behaviour, so it takes part.
bool Limit::operator==(const Limit& other) const {
  return amount == other.amount && multiples == other.multiples &&
         granularity == other.granularity && burst == other.burst;
}

size_t Limit::Hash() const {
  // splitmix64's finaliser per field: cheap and spreads small integers,
  // which is all these fields ever hold.
  const auto mix = [](uint64_t h, uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    return h;
  };
  uint64_t h = 0;
  h = mix(h, static_cast<uint64_t>(amount));
  h = mix(h, static_cast<uint64_t>(multiples));
  h = mix(h, static_cast<uint64_t>(granularity));
  h = mix(h, static_cast<uint64_t>(burst));
  return static_cast<size_t>(h);
}

ParseResult ParseMany(std::string_view text) {
  ParseResult result;
  if (text.size() > kMaxLimitStringLength) {
    result.error = TooLong(text);
    return result;
  }

  // Errors come in the order `limits` raises them (the whole-string syntax
  // check, then granularities piece by piece), and our own bounds come
  // last, so whenever `limits` rejects a string the message is the same.
  std::vector<Piece> pieces;
  if (!ScanAll(text, &pieces)) {
    result.error = CouldNotParse(text);
    return result;
  }
  for (Piece& piece : pieces) {
    if (!LookupGranularity(piece.granularity, &piece.unit)) {
      result.error = "no granularity matched for ";
      result.error.append(piece.granularity);
      return result;
    }
  }

  result.limits.reserve(pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) {
    Limit limit;
    limit.granularity = pieces[i].unit;
    if (!DigitsToInt(pieces[i].amount, kMaxAmount, &limit.amount)) {
      result.limits.clear();
      result.error = CouldNotParse(text);
      result.error.append(": amount ");
      result.error.append(pieces[i].amount);
      result.error.append(" is larger than ");
      AppendInt(&result.error, kMaxAmount);
      return result;
    }
    // `multiples and int(multiples) or None`: omitted, "0" and "000" all
    // mean 1.
    const int64_t max_multiples =
        kMaxPeriodSeconds / GranularitySeconds(limit.granularity);
    int64_t multiples = 0;
    if (!DigitsToInt(pieces[i].multiples, max_multiples, &multiples)) {
      result.limits.clear();
      result.error = CouldNotParse(text);
      result.error.append(": period is longer than ");
      AppendInt(&result.error, kMaxPeriodSeconds);
      result.error.append(" seconds");
      return result;
    }
    limit.multiples = multiples == 0 ? 1 : multiples;
    result.limits.push_back(std::move(limit));
  }
  return result;
}

ParseResult ParseOne(std::string_view text) {
  ParseResult result = ParseMany(text);
  if (result.limits.size() > 1) result.limits.resize(1);
  return result;
}

}  // namespace rapidlimit
