-- rapidlimit: decides all limits of one request in one atomic call.
--
-- Mirrors rapidlimit::Store::Decide of the memory store: requests in
-- order; in hit mode each is charged and the call stops at the first
-- rejection; in test mode nothing is written and every request is
-- evaluated. The script only decides admission and updates state; it
-- returns each key's state as found, from which the C++ side recomputes
-- the full decision (remaining, reset, retry-after) with the very code
-- the memory store runs.
--
-- Time is the caller's, as two integers (epoch seconds, nanoseconds) so
-- that it stays exact in Lua's doubles; stored times are (s, ns) pairs.
--
-- ARGV[1] mode (0 hit, 1 test), ARGV[2] now_s, ARGV[3] now_ns,
-- ARGV[4] TTL slack in ms, then 7 numbers per request i (KEYS[i]):
--   code, cost, p1 .. p5
--   0 fixed window    p1 amount, p2 period_s, p3 period_ns
--   1 moving window   p1 amount, p2 period_s
--   2 sliding window  p1 amount, p2 window index, p3 period_ns,
--                     p4 period_ns - (now mod period), p5 key TTL in ms
--   3 token bucket    p1 amount, (p2, p3) = cost * period / amount and
--                     (p4, p5) = burst * period / amount as ns + fraction
--                     in units of 1/amount ns
--   4 incr            like 0, never rejects (limits' Storage.incr)
-- Returns {processed, then 7 integers per processed request:
--   allowed, fresh, x1 .. x5}, the x's per strategy:
--   fixed: count, expiry_s, expiry_ns      token: tat_s, tat_ns, tat_frac
--   sliding: window, current, previous
--   moving: blocker_s, blocker_ns, in_window, oldest_s, oldest_ns

local test = ARGV[1] == '1'
local now_s = tonumber(ARGV[2])
local now_ns = tonumber(ARGV[3])
local slack = tonumber(ARGV[4])
local floor = math.floor
local pack = struct.pack
local unpack = struct.unpack
local call = redis.call
local fmt = string.format
local E9 = 1000000000

-- a > b for (s, ns) pairs.
local function later(as, an, bs, bn)
  return as > bs or (as == bs and an > bn)
end

-- Key lifetime in ms for state that ends `rel` ns from now, plus slack.
local function ttl(rel)
  local ms = floor(rel / 1000000)
  if ms * 1000000 < rel then ms = ms + 1 end
  if ms < 0 then ms = 0 end
  return fmt('%d', ms + slack)
end

-- Exact a * b < c * d for integers in [0, 2^53).
local B = 16777216
local function limbs(x)
  local h = floor(x / B)
  local hh = floor(h / B)
  return x - h * B, h - hh * B, hh
end
local function mul(a, b)
  local a0, a1, a2 = limbs(a)
  local b0, b1, b2 = limbs(b)
  local r = {a0 * b0, a0 * b1 + a1 * b0, a0 * b2 + a1 * b1 + a2 * b0,
             a1 * b2 + a2 * b1, a2 * b2}
  for i = 1, 4 do
    local c = floor(r[i] / B)
    r[i] = r[i] - c * B
    r[i + 1] = r[i + 1] + c
  end
  return r
end
local function mul_lt(a, b, c, d)
  local x, y = a * b, c * d
  if x < 9007199254740992 and y < 9007199254740992 then return x < y end
  local p, q = mul(a, b), mul(c, d)
  for i = 5, 1, -1 do
    if p[i] ~= q[i] then return p[i] < q[i] end
  end
  return false
end

-- Fixed window (and incr): value = pack(count, expiry_s, expiry_ns).
local function fixed(key, cost, amount, ps, pn, incr)
  local v = call('GET', key)
  local cnt, es, en = 0, 0, 0
  local fresh = 1
  if v then
    cnt, es, en = unpack('<ddd', v)
    if later(es, en, now_s, now_ns) then fresh = 0 end
  end
  local base = cnt
  if fresh == 1 then base = 0 end
  local c = base + cost
  if test then return c <= amount, fresh, cnt, es, en end
  local xs, xn = es, en
  if c == cost or fresh == 1 then
    xs, xn = now_s + ps, now_ns + pn
    if xn >= E9 then xs, xn = xs + 1, xn - E9 end
  end
  call('SET', key, pack('<ddd', c, xs, xn), 'PX',
       ttl((xs - now_s) * E9 + (xn - now_ns)))
  return incr or c <= amount, fresh, cnt, es, en
end

-- Token bucket (GCRA): value = pack(tat_s, tat_ns, tat_frac); the
-- theoretical arrival time is tat_s * 1e9 + tat_ns + tat_frac / amount.
local function bucket(key, a, c_ns, c_f, k_ns, k_f)
  if a <= 0 then return false, 1, 0, 0, 0 end
  local v = call('GET', key)
  local es, en, f = 0, 0, 0
  local fresh = 1
  local u_ns, u_f = 0, 0
  if v then
    es, en, f = unpack('<ddd', v)
    if later(es, en, now_s, now_ns) then
      fresh = 0
      u_ns, u_f = (es - now_s) * E9 + (en - now_ns), f
    end
  end
  local an, af = u_ns + c_ns, u_f + c_f
  if af >= a then an, af = an + 1, af - a end
  local allowed = an < k_ns or (an == k_ns and af <= k_f)
  if allowed and not test and an > 0 then
    local t = now_ns + an
    local s = floor(t / E9)
    t = t - s * E9
    if t < 0 then
      s, t = s - 1, t + E9
    elseif t >= E9 then
      s, t = s + 1, t - E9
    end
    call('SET', key, pack('<ddd', now_s + s, t, af), 'PX', ttl(an))
  end
  return allowed, fresh, es, en, f
end

-- Sliding window counter: value = pack(window, current, previous).
local function sliding(key, cost, amount, w, period, pttl, key_ttl)
  local v = call('GET', key)
  local sw, cur, prev = 0, 0, 0
  local fresh = 1
  if v then
    sw, cur, prev = unpack('<ddd', v)
    if sw + 2 > w then fresh = 0 end
  end
  local c, p = cur, prev
  if fresh == 1 or sw > w or sw < w - 1 then
    c, p = 0, 0
  elseif sw == w - 1 then
    c, p = 0, c
  end
  local allowed = cost <= amount
  if allowed then
    local room = amount - c - cost
    if room < 0 then
      allowed = false
    elseif p > 0 then
      -- floor(p * pttl / period) <= room
      allowed = mul_lt(p, pttl, room + 1, period)
    end
  end
  if not test then
    if allowed then c = c + cost end
    call('SET', key, pack('<ddd', w, c, p), 'PX', fmt('%d', key_ttl))
  end
  return allowed, fresh, sw, cur, prev
end

-- Moving window: a ring of the newest `amount` admission times in one
-- string: a 32-byte header pack(base_s, head, size, cap) and 8-byte
-- entries pack(s - base_s, ns). Reads touch O(log amount) entries.
local HDR = 32
local function entry(key, base, head, cap, i)
  local off = HDR + ((head + i) % cap) * 8
  local rs, rn = unpack('<i4I4', call('GETRANGE', key, off, off + 7))
  return base + rs, rn
end

local function moving(key, cost, amount, ps)
  local h = call('GETRANGE', key, 0, HDR - 1)
  local base, head, size, cap = now_s, 0, 0, 0
  if #h == HDR then base, head, size, cap = unpack('<dddd', h) end
  local ss, sn = now_s - ps, now_ns  -- since = now - period
  local fresh = 1
  if size > 0 then
    local ts, tn = entry(key, base, head, cap, size - 1)
    if not later(ss, sn, ts, tn) then fresh = 0 end  -- newest >= since
  end
  local stored = size
  if fresh == 1 then size, head = 0, 0 end
  local allowed = cost <= amount
  local bs, bn = 0, 0
  if allowed and amount - cost < size then
    bs, bn = entry(key, base, head, cap, size - 1 - (amount - cost))
    allowed = later(ss, sn, bs, bn)  -- blocker < since
  end
  if not test then
    if allowed and cost > 0 then
      if size == 0 then
        base = now_s
      elseif cap ~= amount then
        -- The limit changed for this key: keep the newest entries.
        local keep = size
        if keep > amount then keep = amount end
        local parts = {}
        for i = size - keep, size - 1 do
          local es, en = entry(key, base, head, cap, i)
          parts[#parts + 1] = pack('<i4I4', es - base, en)
        end
        call('SET', key, pack('<dddd', base, 0, keep, amount) ..
             table.concat(parts))
        head, size = 0, keep
      end
      cap = amount
      local e = pack('<i4I4', now_s - base, now_ns)
      if cost >= cap then
        head, size = 0, cap
        call('SETRANGE', key, HDR, string.rep(e, cap))
      else
        local tail = (head + size) % cap
        local first = cap - tail
        if first > cost then first = cost end
        call('SETRANGE', key, HDR + tail * 8, string.rep(e, first))
        if cost > first then
          call('SETRANGE', key, HDR, string.rep(e, cost - first))
        end
        size = size + cost
        if size > cap then head, size = (head + size - cap) % cap, cap end
      end
      call('SETRANGE', key, 0, pack('<dddd', base, head, size, cap))
      call('PEXPIRE', key, fmt('%d', ps * 1000 + 1 + slack))
    elseif fresh == 1 and stored > 0 then
      call('DEL', key)  -- the memory store clears a stale log when charged
    end
  end
  -- Entries strictly inside the window, by the memory store's search.
  local lo, hi = 0, size
  while lo < hi do
    local mid = lo + floor((hi - lo) / 2)
    local ms, mn = entry(key, base, head, cap, mid)
    if later(ms, mn, ss, sn) then hi = mid else lo = mid + 1 end
  end
  local os, on = now_s, now_ns
  if lo < size then os, on = entry(key, base, head, cap, lo) end
  return allowed, fresh, bs, bn, size - lo, os, on
end

local out = {0}
local j = 4
for i = 1, #KEYS do
  local key = KEYS[i]
  local code = tonumber(ARGV[j + 1])
  local cost = tonumber(ARGV[j + 2])
  local p1, p2, p3 = tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4]),
                     tonumber(ARGV[j + 5])
  local p4, p5 = tonumber(ARGV[j + 6]), tonumber(ARGV[j + 7])
  j = j + 7
  local ok, fresh, x1, x2, x3, x4, x5
  if code == 0 then
    ok, fresh, x1, x2, x3 = fixed(key, cost, p1, p2, p3, false)
  elseif code == 3 then
    ok, fresh, x1, x2, x3 = bucket(key, p1, p2, p3, p4, p5)
  elseif code == 2 then
    ok, fresh, x1, x2, x3 = sliding(key, cost, p1, p2, p3, p4, p5)
  elseif code == 1 then
    ok, fresh, x1, x2, x3, x4, x5 = moving(key, cost, p1, p2)
  else
    ok, fresh, x1, x2, x3 = fixed(key, cost, 0, p2, p3, true)
  end
  local n = #out
  out[n + 1] = ok and 1 or 0
  out[n + 2] = fresh
  out[n + 3] = x1
  out[n + 4] = x2
  out[n + 5] = x3
  out[n + 6] = x4 or 0
  out[n + 7] = x5 or 0
  out[1] = i
  if not ok and not test then break end
end
return out
