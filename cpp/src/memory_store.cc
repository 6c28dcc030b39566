#include "rapidlimit/memory_store.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "rapidlimit/algorithms.h"
#include "siphash.h"

namespace rapidlimit {
namespace {

using internal::Hash128;

struct KeyHash {
  uint64_t h1;  // never 0: 0 marks an empty slot
  uint32_t h2;
  uint32_t shard_bits;
};

inline KeyHash HashOf(uint64_t lo, uint64_t hi) {
  return KeyHash{lo == 0 ? 1 : lo, static_cast<uint32_t>(hi),
                 static_cast<uint32_t>(hi >> 32)};
}

inline KeyHash HashKey(std::string_view key) {
  const Hash128 h = internal::SipHash13_128(internal::ProcessSipKey(),
                                            key.data(), key.size());
  return HashOf(h.lo, h.hi);
}

inline KeyHash HashKey(const Request& r) {
  if (r.has_fingerprint) return HashOf(r.fingerprint.lo, r.fingerprint.hi);
  return HashKey(r.key);
}

// Per-payload clean-up: only moving-window logs own memory.
inline void DestroyPayload(CounterState&) {}
inline void DestroyPayload(SlidingState&) {}
inline void DestroyPayload(MovingState& s) {
  delete s.log;
  s.log = nullptr;
}
inline size_t PayloadHeap(const CounterState&) { return 0; }
inline size_t PayloadHeap(const SlidingState&) { return 0; }
inline size_t PayloadHeap(const MovingState& s) {
  return s.log == nullptr ? 0 : sizeof(MovingLog) + s.log->HeapBytes();
}

// Expired entries are dropped (by the sweep, a rebuild or the cap) only
// once they are this far past their expiry. Until then a caller whose
// clock is behind the one that wrote an entry still finds it, as it
// would on Redis, whose key TTLs carry the same 1 s slack; without the
// grace the answer would depend on whether the sweep cursor, placed by
// the per-process hash key, had passed the entry yet.
constexpr int64_t kExpiryGraceNanos = 1'000'000'000;

// Whether an entry expiring at `expiry_nanos` may be dropped at `now`.
inline bool Droppable(int64_t expiry_nanos, int64_t now) {
  return expiry_nanos <= now - kExpiryGraceNanos;
}

// The entries to keep at `now`, for Table::Rebuild and counting: those not
// yet droppable.
inline auto KeptAt(int64_t now) {
  return [now](const auto& slot) {
    return !Droppable(slot.payload.expiry_nanos, now);
  };
}

template <class P>
struct Slot {
  uint64_t h1;
  uint32_t h2;
  uint32_t stamp;
  P payload;  // trivially copyable; begins with expiry_nanos
};
static_assert(sizeof(Slot<CounterState>) == 32, "counter slots are 32 bytes");

// Linear probing with backward-shift deletion, so there are no tombstones
// and a lookup stops at the first empty slot. Capacity is any size (slots
// are mapped with a multiply-shift), which lets it grow by 1.5x and keeps
// the load factor between 0.53 and 0.8. Not thread-safe: the shard lock
// guards it.
template <class P>
class Table {
 public:
  static constexpr size_t kMinCapacity = 8;

  Table() = default;
  Table(const Table&) = delete;
  Table& operator=(const Table&) = delete;
  ~Table() { Clear(); }

  size_t size() const { return size_; }
  size_t capacity() const { return cap_; }
  size_t HeapBytes() const {
    size_t bytes = cap_ * sizeof(Slot<P>);
    for (size_t i = 0; i < cap_; ++i) {
      if (slots_[i].h1 != 0) bytes += PayloadHeap(slots_[i].payload);
    }
    return bytes;
  }

  Slot<P>* Find(const KeyHash& k) {
    if (size_ == 0) return nullptr;
    for (size_t i = Home(k.h1);; i = Next(i)) {
      Slot<P>& s = slots_[i];
      if (s.h1 == 0) return nullptr;
      if (s.h1 == k.h1 && s.h2 == k.h2) return &s;
    }
  }

  // True when one more key would push the load factor past 0.8.
  bool Full() const { return (size_ + 1) * 5 > cap_ * 4; }

  // Inserts a key known to be absent. The table must not be Full().
  Slot<P>* Insert(const KeyHash& k) {
    size_t i = Home(k.h1);
    while (slots_[i].h1 != 0) i = Next(i);
    Slot<P>& s = slots_[i];
    s.h1 = k.h1;
    s.h2 = k.h2;
    s.stamp = 0;
    s.payload = P{};
    ++size_;
    return &s;
  }

  void Erase(Slot<P>* slot) {
    DestroyPayload(slot->payload);
    EraseAt(static_cast<size_t>(slot - slots_));
  }

  // Rebuilds into `new_cap` slots keeping entries for which keep(slot) is
  // true; the others are destroyed. Returns how many were dropped.
  template <class Keep>
  size_t Rebuild(size_t new_cap, Keep keep) {
    Slot<P>* old = slots_;
    const size_t old_cap = cap_;
    new_cap = std::max(new_cap, kMinCapacity);
    slots_ = static_cast<Slot<P>*>(std::calloc(new_cap, sizeof(Slot<P>)));
    if (slots_ == nullptr) throw std::bad_alloc();
    cap_ = new_cap;
    size_t dropped = 0;
    size_ = 0;
    for (size_t i = 0; i < old_cap; ++i) {
      Slot<P>& s = old[i];
      if (s.h1 == 0) continue;
      if (!keep(s)) {
        DestroyPayload(s.payload);
        ++dropped;
        continue;
      }
      size_t j = Home(s.h1);
      while (slots_[j].h1 != 0) j = Next(j);
      slots_[j] = s;
      ++size_;
    }
    std::free(old);
    return dropped;
  }

  // Capacity that holds `n` keys at a load factor of about 2/3.
  static size_t CapacityFor(size_t n) {
    return std::max(kMinCapacity, n + n / 2 + 1);
  }

  // Drops entries past their grace among the `budget` slots after the
  // sweep cursor.
  size_t SweepSome(int64_t now, size_t budget) {
    if (size_ == 0) return 0;
    size_t dropped = 0;
    while (budget-- > 0) {
      if (cursor_ >= cap_) cursor_ = 0;
      Slot<P>& s = slots_[cursor_];
      if (s.h1 != 0 && Droppable(s.payload.expiry_nanos, now)) {
        // Backward shift may move a later entry here: look at it next time.
        Erase(&s);
        ++dropped;
      } else {
        ++cursor_;
      }
    }
    return dropped;
  }

  template <class Fn>
  void ForEach(Fn fn) const {
    for (size_t i = 0; i < cap_; ++i) {
      if (slots_[i].h1 != 0) fn(slots_[i]);
    }
  }

  void Clear() {
    for (size_t i = 0; i < cap_; ++i) {
      if (slots_[i].h1 != 0) DestroyPayload(slots_[i].payload);
    }
    std::free(slots_);
    slots_ = nullptr;
    cap_ = size_ = cursor_ = 0;
  }

 private:
  size_t Home(uint64_t h1) const {
    return static_cast<size_t>((static_cast<unsigned __int128>(h1) * cap_) >>
                               64);
  }
  size_t Next(size_t i) const { return i + 1 == cap_ ? 0 : i + 1; }

  void EraseAt(size_t hole) {
    // Pull back every following entry that may live at the hole, so that
    // probes never meet a gap before reaching their key.
    size_t i = hole;
    for (;;) {
      i = Next(i);
      Slot<P>& s = slots_[i];
      if (s.h1 == 0) break;
      const size_t home = Home(s.h1);
      const size_t dist_i = (i + cap_ - home) % cap_;
      const size_t dist_hole = (hole + cap_ - home) % cap_;
      if (dist_hole <= dist_i) {
        slots_[hole] = s;
        hole = i;
      }
    }
    slots_[hole] = Slot<P>{};
    --size_;
  }

  Slot<P>* slots_ = nullptr;
  size_t cap_ = 0;
  size_t size_ = 0;
  size_t cursor_ = 0;
};

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Critical sections are a few dozen instructions, far shorter than a
// futex round trip; a contended waiter spins briefly, then yields so that a
// preempted holder on a small machine can finish.
class SpinLock {
 public:
  void lock() {
    for (int spins = 0;; ++spins) {
      if (!locked_.exchange(true, std::memory_order_acquire)) return;
      while (locked_.load(std::memory_order_relaxed)) {
        if (++spins > 64) {
          std::this_thread::yield();
        } else {
          CpuRelax();
        }
      }
    }
  }
  void unlock() { locked_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> locked_{false};
};

struct alignas(64) Shard {
  SpinLock mu;
  Table<CounterState> fixed;
  Table<CounterState> token;
  Table<SlidingState> sliding;
  Table<MovingState> moving;
  // This shard's share of max_keys. (Test fix: the shares sum to exactly
  // max_keys; one rounded-up share per shard let the total exceed it.)
  size_t cap = 1;
  // Recency: each charge stamps its key with the next count, so eviction
  // finds the least recently used keys exactly (a coarse time stamp tied
  // every key charged within one tick, and a flood of new keys could then
  // evict the hottest one). Ages are taken modulo 2^32; only after four
  // billion charges on one shard between evictions could an idle key look
  // recent, which only reorders eviction.
  uint32_t tick = 0;

  size_t Size() const {
    return fixed.size() + token.size() + sliding.size() + moving.size();
  }
};

class MemoryStore final : public Store {
 public:
  explicit MemoryStore(const MemoryStoreOptions& options) {
    size_t n = 1;
    while (n < std::max<size_t>(1, options.shards)) n <<= 1;
    const size_t max_keys = std::max<size_t>(1, options.max_keys);
    // Test fix: the cap is hard. No more shards than keys, so that every
    // shard holds at least one key, and the shares sum to max_keys
    // (previously ceil(max_keys / n) each, e.g. 64 * 16 = 1024 > 1000).
    while (n > max_keys) n >>= 1;
    shard_mask_ = n - 1;
    shards_ = std::make_unique<Shard[]>(n);
    for (size_t i = 0; i < n; ++i) {
      shards_[i].cap = max_keys / n + (i < max_keys % n ? 1 : 0);
    }
  }

  size_t Decide(const Request* requests, size_t n, int64_t now_nanos, Mode mode,
                Decision* out) override {
    const bool charge = mode == Mode::kHit;
    size_t first_reject = n;
    for (size_t i = 0; i < n; ++i) {
      DecideOne(requests[i], now_nanos, charge, &out[i]);
      if (!out[i].allowed && first_reject == n) {
        first_reject = i;
        if (charge) break;
      }
    }
    return first_reject;
  }

  WindowState Inspect(const Request& r, int64_t now) override {
    const KeyHash k = HashKey(r);
    Shard& shard = ShardFor(k);
    std::lock_guard<SpinLock> lock(shard.mu);
    switch (r.strategy) {
      case Strategy::kFixedWindow:
        return InspectIn(shard.fixed, k, now, [&](bool fresh, const auto& p) {
          return InspectFixedWindow(*r.limit, now, fresh, p);
        });
      case Strategy::kTokenBucket:
        return InspectIn(shard.token, k, now, [&](bool fresh, const auto& p) {
          return InspectTokenBucket(*r.limit, now, fresh, p);
        });
      case Strategy::kSlidingWindowCounter:
        return InspectIn(shard.sliding, k, now, [&](bool fresh, const auto& p) {
          return InspectSlidingWindow(*r.limit, now, fresh, p);
        });
      case Strategy::kMovingWindow:
        return InspectIn(shard.moving, k, now, [&](bool fresh, const auto& p) {
          return InspectMovingWindow(*r.limit, now, fresh, p);
        });
    }
    return {};
  }

  int64_t Incr(std::string_view key, int64_t expiry_nanos, int64_t amount,
               int64_t now, int64_t* expiry_at) override {
    const KeyHash k = HashKey(key);
    Shard& shard = ShardFor(k);
    std::lock_guard<SpinLock> lock(shard.mu);
    Slot<CounterState>* slot = shard.fixed.Find(k);
    const bool fresh = slot == nullptr || slot->payload.expiry_nanos <= now;
    if (slot == nullptr) slot = InsertSlot(shard, shard.fixed, k, now);
    slot->stamp = ++shard.tick;
    const int64_t count =
        IncrCounter(amount, expiry_nanos, now, fresh, &slot->payload);
    if (expiry_at != nullptr) *expiry_at = slot->payload.expiry_nanos;
    return count;
  }

  bool Clear(Strategy strategy, std::string_view key) override {
    const KeyHash k = HashKey(key);
    Shard& shard = ShardFor(k);
    std::lock_guard<SpinLock> lock(shard.mu);
    switch (strategy) {
      case Strategy::kFixedWindow:
        return EraseIn(shard.fixed, k);
      case Strategy::kTokenBucket:
        return EraseIn(shard.token, k);
      case Strategy::kSlidingWindowCounter:
        return EraseIn(shard.sliding, k);
      case Strategy::kMovingWindow:
        return EraseIn(shard.moving, k);
    }
    return false;
  }

  size_t Reset() override {
    size_t dropped = 0;
    for (size_t i = 0; i <= shard_mask_; ++i) {
      Shard& shard = shards_[i];
      std::lock_guard<SpinLock> lock(shard.mu);
      dropped += shard.Size();
      shard.fixed.Clear();
      shard.token.Clear();
      shard.sliding.Clear();
      shard.moving.Clear();
    }
    return dropped;
  }

  size_t Size() const override {
    size_t total = 0;
    for (size_t i = 0; i <= shard_mask_; ++i) {
      Shard& shard = shards_[i];
      std::lock_guard<SpinLock> lock(shard.mu);
      total += shard.Size();
    }
    return total;
  }

  bool AcceptsFingerprints() const override { return true; }

  size_t HeapBytes() const {
    size_t total = sizeof(*this) + (shard_mask_ + 1) * sizeof(Shard);
    for (size_t i = 0; i <= shard_mask_; ++i) {
      Shard& shard = shards_[i];
      std::lock_guard<SpinLock> lock(shard.mu);
      total += shard.fixed.HeapBytes() + shard.token.HeapBytes() +
               shard.sliding.HeapBytes() + shard.moving.HeapBytes();
    }
    return total;
  }

 private:
  // Slots swept for expiry on every new key: enough to keep up with any
  // insert rate, since each insert can leave at most one more key behind.
  static constexpr size_t kSweepPerInsert = 4;

  Shard& ShardFor(const KeyHash& k) {
    return shards_[k.shard_bits & shard_mask_];
  }

  // Writes the decision into `out` rather than returning it: a returned
  // Decision was built on the stack and copied in wider loads than the
  // stores that wrote it, which stalled on store forwarding. DecideIn
  // constructs it in place (a prvalue initializing *out is the callee's
  // result object) for the same reason: `*out = apply(...)` copies too.
  void DecideOne(const Request& r, int64_t now, bool charge, Decision* out) {
    const KeyHash k = HashKey(r);
    Shard& shard = ShardFor(k);
    std::lock_guard<SpinLock> lock(shard.mu);
    const Limit& limit = *r.limit;
    switch (r.strategy) {
      case Strategy::kFixedWindow:
        DecideIn(shard, shard.fixed, k, now, charge, out,
                 [&](bool fresh, CounterState* p) {
                   return ApplyFixedWindow(limit, r.cost, now, charge, fresh,
                                           p);
                 });
        return;
      case Strategy::kTokenBucket:
        DecideIn(shard, shard.token, k, now, charge, out,
                 [&](bool fresh, CounterState* p) {
                   return ApplyTokenBucket(limit, r.cost, now, charge, fresh,
                                           p);
                 });
        return;
      case Strategy::kSlidingWindowCounter:
        DecideIn(shard, shard.sliding, k, now, charge, out,
                 [&](bool fresh, SlidingState* p) {
                   return ApplySlidingWindow(limit, r.cost, now, charge, fresh,
                                             p);
                 });
        return;
      case Strategy::kMovingWindow:
        DecideIn(shard, shard.moving, k, now, charge, out,
                 [&](bool fresh, MovingState* p) {
                   return ApplyMovingWindow(limit, r.cost, now, charge, fresh,
                                            p);
                 });
        return;
    }
    *out = Decision{};
  }

  template <class P, class Apply>
  void DecideIn(Shard& shard, Table<P>& table, const KeyHash& k, int64_t now,
                bool charge, Decision* out, Apply apply) {
    Slot<P>* slot = table.Find(k);
    if (slot != nullptr) {
      const bool fresh = slot->payload.expiry_nanos <= now;
      if (charge) slot->stamp = ++shard.tick;
      new (out) Decision(apply(fresh, &slot->payload));
      return;
    }
    // Unknown key: decide on a scratch state and keep it only if it holds
    // something, so tests and refused requests never take a slot.
    P scratch{};
    new (out) Decision(apply(true, &scratch));
    if (charge && scratch.expiry_nanos > now) {
      Slot<P>* fresh_slot = InsertSlot(shard, table, k, now);
      fresh_slot->payload = scratch;
      fresh_slot->stamp = ++shard.tick;
    } else {
      DestroyPayload(scratch);
    }
  }

  template <class P, class Inspector>
  WindowState InspectIn(Table<P>& table, const KeyHash& k, int64_t now,
                        Inspector inspect) {
    const Slot<P>* slot = table.Find(k);
    if (slot == nullptr) return inspect(true, P{});
    return inspect(slot->payload.expiry_nanos <= now, slot->payload);
  }

  template <class P>
  bool EraseIn(Table<P>& table, const KeyHash& k) {
    Slot<P>* slot = table.Find(k);
    if (slot == nullptr) return false;
    table.Erase(slot);
    return true;
  }

  // Makes room for and inserts a new key into `table` of `shard`.
  template <class P>
  Slot<P>* InsertSlot(Shard& shard, Table<P>& table, const KeyHash& k,
                      int64_t now) {
    table.SweepSome(now, kSweepPerInsert);
    if (shard.Size() >= shard.cap) Evict(shard, now);
    if (table.Full()) {
      // Growing is the moment to drop whatever has expired.
      const size_t kept = CountKept(table, now);
      table.Rebuild(Table<P>::CapacityFor(std::max(kept + 1, table.size() / 2)),
                    KeptAt(now));
    }
    return table.Insert(k);
  }

  template <class P>
  static size_t CountKept(const Table<P>& table, int64_t now) {
    const auto keep = KeptAt(now);
    size_t kept = 0;
    table.ForEach([&](const Slot<P>& s) { kept += keep(s); });
    return kept;
  }

  // The shard is at its cap: drop keys past their expiry's grace, and if
  // that frees less than a sixteenth of the cap, the least recently used
  // ones too. Freeing a batch makes the O(shard) scan cost O(1) per insert
  // on average.
  void Evict(Shard& shard, int64_t now) {
    RebuildAll(shard, KeptAt(now));
    const size_t target = std::max<size_t>(1, shard.cap / 16);
    if (shard.Size() + target <= shard.cap) return;
    const size_t need = shard.Size() + target - shard.cap;
    // Ages relative to the shard's count survive its wrap-around.
    const uint32_t now_stamp = shard.tick;
    std::vector<uint32_t> ages;
    ages.reserve(shard.Size());
    auto collect = [&](const auto& s) { ages.push_back(now_stamp - s.stamp); };
    shard.fixed.ForEach(collect);
    shard.token.ForEach(collect);
    shard.sliding.ForEach(collect);
    shard.moving.ForEach(collect);
    // The need-th oldest age: evict everything older, then ties as needed.
    std::nth_element(ages.begin(), ages.begin() + (need - 1), ages.end(),
                     std::greater<uint32_t>());
    const uint32_t threshold = ages[need - 1];
    size_t older = 0;
    for (uint32_t a : ages) older += a > threshold;
    size_t ties_to_drop = need - older;
    auto keep = [&](const auto& s) {
      const uint32_t age = now_stamp - s.stamp;
      if (age > threshold) return false;
      if (age == threshold && ties_to_drop > 0) {
        --ties_to_drop;
        return false;
      }
      return true;
    };
    RebuildAll(shard, keep);
  }

  template <class Keep>
  static void RebuildAll(Shard& shard, Keep keep) {
    RebuildOne(shard.fixed, keep);
    RebuildOne(shard.token, keep);
    RebuildOne(shard.sliding, keep);
    RebuildOne(shard.moving, keep);
  }

  // `keep` may be stateful (it counts ties), so it sees each slot once.
  template <class P, class Keep>
  static void RebuildOne(Table<P>& table, Keep& keep) {
    if (table.size() == 0) return;
    table.Rebuild(table.capacity(),
                  [&keep](const Slot<P>& s) { return keep(s); });
  }

  std::unique_ptr<Shard[]> shards_;
  size_t shard_mask_ = 0;
};

}  // namespace

std::unique_ptr<Store> NewMemoryStore(const MemoryStoreOptions& options) {
  return std::make_unique<MemoryStore>(options);
}

KeyFingerprint MemoryKeyFingerprint(std::string_view key) {
  const Hash128 h = internal::SipHash13_128(internal::ProcessSipKey(),
                                            key.data(), key.size());
  return KeyFingerprint{h.lo, h.hi};
}

size_t MemoryStoreBytes(const Store& store) {
  const auto* memory = dynamic_cast<const MemoryStore*>(&store);
  return memory == nullptr ? 0 : memory->HeapBytes();
}

}  // namespace rapidlimit
