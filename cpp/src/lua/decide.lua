-- rapidlimit: decides all limits of one or more requests in one atomic
-- call.
--
-- Mirrors rapidlimit::Store::Decide of the memory store, request by
-- request in order: in hit mode each limit is charged and the request
-- stops at its first rejection; in test mode nothing is written and every
-- limit is evaluated. Several requests share one call when the client has
-- several waiting (auto-pipelining): the script's fixed cost is paid once.
-- The script only decides admission and updates state; it returns each
-- key's state as found, from which the C++ side recomputes the full
-- decision (remaining, reset, retry-after) with the very code the memory
-- store runs.
--
-- Time is the caller's, as two integers (epoch seconds, nanoseconds) so
-- that it stays exact in Lua's doubles; stored times are (s, ns) pairs.
-- Redis TTLs only collect garbage: each value also records a horizon, a
-- caller-time second before which Redis keeps the key, and the TTL is
-- renewed (generously) only when the state would outlive it; other writes
-- rewrite the changed leading values in place (SETRANGE keeps the TTL and
-- the rest of the value), which costs Redis less than a SET.
--
-- One argument, little-endian doubles (integers, exact below 2^53), a
-- block per request: n (its number of limits, at least 1; -n in test
-- mode), now_s, now_ns, then 7 per limit, whose keys are the request's n
-- KEYS in order: code, cost, p1 .. p5
--   0 fixed window    p1 amount, (p2, p3) period as (s, ns)
--   1 moving window   p1 amount, p2 period_s
--   2 sliding window  p1 amount, p2 window index, p3 period_ns,
--                     p4 period_ns - (now mod period), p5 period in ms
--   3 token bucket    p1 amount, (p2, p3) = cost * period / amount and
--                     (p4, p5) = burst * period / amount as ns + fraction
--                     in units of 1/amount ns
--   4 incr            like 0, never rejects (limits' Storage.incr)
-- and last the TTL slack in ms.
-- Returns one string, per processed limit of each request a flag byte
-- (1 allowed, 2 fresh, 4 the request's last processed limit; 8: 3
-- doubles follow, 16: 4 doubles follow, 24: none, only with 2, neither:
-- 5) and then x1 .. x5 (or their first 3 or 4) as little-endian doubles,
-- per strategy:
--   fixed: count, expiry_s, expiry_ns      token: tat_s, tat_ns, tat_frac
--   sliding: window, current, previous
--   moving: blocker_s, blocker_ns, in_window, oldest_s, oldest_ns
-- x's past a strategy's list carry no meaning (the stored horizon may
-- stand there). A call for one request whose one limit, a fixed window
-- or token bucket, was allowed on a value found returns that value alone
-- (24 or 32 bytes, a length no single block has): flags 1 and 4 go
-- without saying, 8 or 16 by the length, 2 (fresh) by comparing the
-- value's expiry or TAT with now, and Redis makes no new string for the
-- reply.
-- A request whose key Redis refuses (a value of another type: WRONGTYPE;
-- a key its ACL user may not read: NOPERM) or holds a string this script
-- did not write (a length no state of its strategy has; for a moving
-- window, a header no ring has or entries missing; for a token bucket, a
-- TAT's ns below 0; for a sliding window, a window so far ahead of now
-- that its TTL would be one Redis refuses) answers in place
-- of its blocks the flag byte 32, then its limit number and the message's
-- length as doubles, then the message (one space longer where the whole
-- would be 24 or 32 bytes, the lengths of a bare value). Such a request
-- writes nothing, and the other requests of the call are decided as if it
-- were not there: a Lua error would stop the script for every request of
-- the call and keep the writes made for those before it (a script is not
-- rolled back). Reads go through redis.pcall, which costs Redis what
-- redis.call does; a read that succeeded proves the key a string (or
-- absent), so that the writes after it cannot meet WRONGTYPE, and Redis
-- refuses a write for lack of memory only before a script's first write.
-- A request with several limits reads all its keys before its first
-- write (a moving window's entries too, up to a moving window that stops
-- the request), so that a refused last key leaves the first uncounted.
-- Every Lua string Redis makes is hashed byte by byte, so the argument
-- and the reply are kept short.

local pack = struct.pack
local unpack = struct.unpack
local args = ARGV[1]
local nargs = #args
local floor  -- math.floor, looked up by the loop below: the fast paths need none
local call = redis.call
local try = redis.pcall  -- reads: an error comes back as a table {err=...}
local E9 = 1000000000
local keys = KEYS

-- A call for one request with one limit (88 bytes of argument), a hit on
-- a fixed window or a token bucket whose state is live: the commonest
-- call when requests come one at a time, decided here before the loop's
-- bookkeeping, which would add about 4 % to what Redis spends on the call
-- (the loop's own fast paths serve such requests within a shared call).
-- What this block does not answer it leaves to the loop, with what GET
-- read of the key in `lone` (nil: nothing read). The first request's
-- header (see the loop) is unpacked here once, for both.
local lone
local h_nk, h_ns, h_nn, h_code, h_cost, h_amount = unpack('<dddddd', args)
if h_code == 0 then  -- the other strategies leave after two comparisons
  if nargs == 88 and h_nk == 1 then
    local key = keys[1]
    lone = try('GET', key)
    if lone and #lone == 24 then
      local x1, x2, x3 = unpack('<ddd', lone)
      if x1 ~= 0 and (x2 > h_ns or (x2 == h_ns and x3 > h_nn)) then
        local c = x1 + h_cost
        call('SETRANGE', key, '0', pack('<d', c))
        if c <= h_amount then return lone end
        return '\12' .. lone  -- flags: see the loop's reply below
      end
    end
  end
elseif h_code == 3 then
  if nargs == 88 and h_nk == 1 and h_amount > 0 then
    -- As the loop's token-bucket fast path, which explains each step.
    local key = keys[1]
    lone = try('GET', key)
    if lone and #lone == 32 then
      local x1, x2, x3, hs = unpack('<dddd', lone)
      if x2 >= 0 then
        local p2, p3, p4 = unpack('<ddd', args, 49)
        local s, t, af = h_ns, h_nn + p2, p3
        local live = x1 > h_ns or (x1 == h_ns and x2 > h_nn)
        if live then
          s, t, af = x1, x2 + p2, x3 + p3
          if af >= h_amount then t, af = t + 1, af - h_amount end
        end
        local an = (s - h_ns) * E9 + (t - h_nn)
        local ok = an < p4 or h_cost == 0 or
                   (an == p4 and af <= unpack('<d', args, 73))
        if ok and h_cost > 0 then
          if t >= E9 then
            local q = t / E9
            q = q - q % 1
            s, t = s + q, t - q * E9
            if t < 0 then
              s, t = s - 1, t + E9
            elseif t >= E9 then
              s, t = s + 1, t - E9
            end
          end
          -- A TAT at or past the horizon (or a NaN found) renews the TTL:
          -- the loop's.
          if s < hs then
            if af == x3 then
              call('SETRANGE', key, '0', pack('<dd', s, t))
            else
              call('SETRANGE', key, '0', pack('<ddd', s, t, af))
            end
            return lone
          end
        elseif ok then
          return lone
        elseif live then
          return '\20' .. lone
        else
          return '\30'
        end
      end
    end
  end
end
-- The current request's header, read by the helpers below as upvalues.
local now_s, now_ns, slack, test
-- Every EVALSHA runs this body afresh, so the hot paths are written
-- inline: a closure defined up here would be allocated on every call.
-- Helpers that only some strategies need are created on first use.
local moving, mul_lt
-- The values a request with several limits read before its first write,
-- by limit (nil: read by the loop); one table for the whole call. pmv:
-- its moving windows' limit numbers and headers; mst: what `moving` read
-- of their logs, 9 values per limit.
local pre, pmv, mst
-- A value that starts with a moving window's header (its length unknown).
local NOLOG = 'a string that is no moving window\'s log this script wrote'
-- A value of a state's length whose numbers no state has where they would
-- make a write's TTL one Redis refuses (a Lua error for the whole call).
local NOSTATE = 'a string with numbers no state of its strategy has'

-- The reply's pieces; a call for one request with one limit (88 bytes of
-- argument) answers without them in the common case.
local out
if nargs > 88 then out = {} end
local nout = 0
local ki = 0    -- KEYS consumed by earlier requests
local pos = 1   -- this request's block in args
while pos < nargs do
  local nout0 = nout  -- the reply before this request's blocks
  -- The header and what every limit needs of the first limit in one
  -- unpack (most requests have one); each value unpacked costs Redis about
  -- as much as a few lines of Lua, so the rest is read where it is used.
  local nk, c1, k1, a1
  if pos == 1 then  -- unpacked above
    nk, now_s, now_ns, c1, k1, a1 = h_nk, h_ns, h_nn, h_code, h_cost, h_amount
  else
    nk, now_s, now_ns, c1, k1, a1 = unpack('<dddddd', args, pos)
  end
  local first = pos + 24  -- the first limit's 7 values
  -- What a fast path below (or the lone request's block above) read of
  -- the key, for the loop when the fast path leaves the decision to it:
  -- nil if nothing, else GET's reply (a string, false for a missing key,
  -- or an error table). The fast paths take one limit in hit mode (nk is
  -- -n in test mode) and set up no more than they use; a decision they
  -- make sets nk to 0, which skips the loop's set-up.
  local v0
  if lone ~= nil then
    v0 = lone  -- the lone request's block above read the key
    lone = nil
  elseif nk == 1 and c1 == 0 then
    -- A fixed-window hit alone in its request, in the current window, in
    -- a call for several requests (a lone request's is decided above, in
    -- the same steps: a change here is one there): the commonest
    -- decision, in fewer steps than the loop below takes (which handles
    -- the other cases with the value read here).
    local key = keys[ki + 1]
    v0 = try('GET', key)  -- an error table leaves the decision to the loop
    if v0 and #v0 == 24 then
      local x1, x2, x3 = unpack('<ddd', v0)
      if x1 ~= 0 and (x2 > now_s or (x2 == now_s and x3 > now_ns)) then
        local c = x1 + k1
        call('SETRANGE', key, '0', pack('<d', c))
        pos = first + 64
        ki = ki + 1
        nk = 0
        local f = '\12'  -- the flags of the loop's reply below
        if c <= a1 then f = '\13' end
        out[nout + 1] = f
        out[nout + 2] = v0
        nout = nout + 2
      end
    end
  elseif nk == 1 and c1 == 3 and a1 > 0 then
    -- Likewise a token-bucket hit that keeps the key's TTL (the lone
    -- request's block above repeats these steps).
    local key = keys[ki + 1]
    v0 = try('GET', key)
    if v0 and #v0 == 32 then
      local x1, x2, x3, hs = unpack('<dddd', v0)
      -- A TAT's ns below 0 is no bucket's (the script writes 0 .. 1e9 - 1)
      -- and could make the TTL negative (a Lua error for the whole call):
      -- the loop refuses it. One comparison, on a value already unpacked.
      if x2 >= 0 then
        -- p5 (the burst's fraction) only matters at a level exactly p4.
        local p2, p3, p4 = unpack('<ddd', args, first + 24)
        -- The TAT after this hit, (s, t ns, af): the stored one plus the
        -- cost's interval while it is later than now, else now plus it.
        -- Built from the stored pair rather than from now, it needs no
        -- carry into the seconds unless the interval crosses one.
        local s, t, af = now_s, now_ns + p2, p3
        local live = x1 > now_s or (x1 == now_s and x2 > now_ns)
        if live then
          s, t, af = x1, x2 + p2, x3 + p3
          if af >= a1 then t, af = t + 1, af - a1 end
        end
        -- How far ahead of now that TAT lies: the bucket's level with the
        -- cost added, against the burst's.
        local an = (s - now_s) * E9 + (t - now_ns)
        -- A cost of 0 takes nothing: always allowed, nothing written (the
        -- bucket may look more than empty to a clock behind the one that
        -- charged it).
        local ok = an < p4 or k1 == 0 or
                   (an == p4 and af <= unpack('<d', args, first + 48))
        local done = true
        if ok and k1 > 0 then
          if t >= E9 then
            local q = t / E9
            q = q - q % 1  -- floor without a function call
            s, t = s + q, t - q * E9
            -- The quotient rounded in the double's last bit.
            if t < 0 then
              s, t = s - 1, t + E9
            elseif t >= E9 then
              s, t = s + 1, t - E9
            end
          end
          if not (s < hs) then  -- (a NaN found fails it too)
            done = false  -- the loop renews the TTL
          elseif af == x3 then
            -- The fraction stored is already right (always, when the
            -- period divides by the amount): 16 bytes rewritten, not 24.
            call('SETRANGE', key, '0', pack('<dd', s, t))
          else
            call('SETRANGE', key, '0', pack('<ddd', s, t, af))
          end
        end
        if done then
          pos = first + 64
          ki = ki + 1
          nk = 0
          if live then
            local f = '\20'  -- the flags of the loop's reply below
            if ok then f = '\21' end
            out[nout + 1] = f
            out[nout + 2] = v0
            nout = nout + 2
          else
            -- A full bucket (fresh): its TAT means nothing to the caller, so
            -- the flags say no values follow (24), which keeps 32 bytes out
            -- of the batch's reply string.
            local f = '\30'
            if ok then f = '\31' end
            nout = nout + 1
            out[nout] = f
          end
        end
      end
    end
  end
  if nk ~= 0 then  -- not decided above
    floor = math.floor
    test = nk < 0
    if test then nk = -nk end
    pos = first + nk * 56 + 8
    local at_slack = pos - 8
    local k0 = ki
    ki = ki + nk
    if not out then out = {} end
    -- A read Redis refused (an error table) or a value of a length no
    -- state of the limit's strategy has, and the limit's number.
    local bad, bi
    local prefetched = nk > 1 and not test
    local nm = 0  -- moving windows the prefetch found, listed in pmv
    if prefetched then
      -- A test writes nothing, and a request with one limit reads before
      -- it writes: only these need the reads first.
      if not pre then pre, pmv, mst = {}, {}, {} end
      for i = 1, nk do
        local key = keys[k0 + i]
        local code, p1 = c1, a1
        if i > 1 then
          local _
          code, _, p1 = unpack('<ddd', args, first + (i - 1) * 56)
        end
        local v
        if code == 1 then
          v = try('GETRANGE', key, 0, 55)
          if #v ~= 56 and v ~= '' then bad, bi = v, i break end
          -- The header and the entries are read below, once `moving`
          -- exists.
          pmv[2 * nm + 1] = i
          pmv[2 * nm + 2] = v
          nm = nm + 1
        elseif code ~= 3 or p1 > 0 then  -- a bucket of 0 is never read
          v = try('GET', key)
          local n = 32
          if code == 0 or code == 4 then n = 24 end
          if v and #v ~= n then bad, bi = v, i break end
          -- The numbers the loop refuses (see there), before the first
          -- write. A sliding window's key an earlier limit of the request
          -- names too holds that limit's window by then, if later.
          if code == 3 then
            if v and not (unpack('<d', v, 9) >= 0) then
              bad, bi = {err = NOSTATE}, i
              break
            end
          elseif code == 2 then
            local at = first + (i - 1) * 56
            local p2, p3 = unpack('<dd', args, at + 24)
            local w = v and unpack('<d', v)
            for j = 1, i - 1 do
              if keys[k0 + j] == key then
                local cj, _, _, pj = unpack('<dddd', args, at - (i - j) * 56)
                if cj == 2 and not (w and w >= pj) then w = pj end
              end
            end
            if w and w > p2 and not ((w - p2) * p3 < 9e22) then
              bad, bi = {err = NOSTATE}, i
              break
            end
          end
        end
        -- A key an earlier limit of the request names too is read again
        -- by the loop, after that limit's write.
        for j = 1, i - 1 do
          if keys[k0 + j] == key then v = nil break end
        end
        pre[i] = v
      end
    end
    if not moving and (c1 == 1 or nm > 0 or (test and nk > 1)) then
      -- A ring of the newest `amount` admission times in one string: a
      -- 56-byte header pack(base_s, head, size, cap, expiry_s, expiry_ns,
      -- horizon_s) and 8-byte entries pack(s - base_s, ns). The log is
      -- void from its expiry on (last admission + period + 1 ns, as in
      -- memory). Reads touch O(log amount) entries.
      local HDR = 56
      -- Nothing where the string ends before the entry: a value this
      -- script did not write, which must not reach unpack (a Lua error).
      local function entry(k, base, head, cap, idx)
        local off = HDR + ((head + idx) % cap) * 8
        local e = call('GETRANGE', k, off, off + 7)
        if #e ~= 8 then return end
        local rs, rn = unpack('<i4I4', e)
        return base + rs, rn
      end
      -- a > b for (s, ns) pairs.
      local function later(as, an, bs, bn)
        return as > bs or (as == bs and an > bn)
      end
      -- h: the header as read (56 bytes, or none). j: nil to decide; i in
      -- the prefetch of a request's limit i, which only reads (what it
      -- read goes to mst); -i in the loop after it, which only writes.
      -- Every read comes before the first write, so that a value that is
      -- no log (nothing returned) is found before anything is written.
      moving = function(k, cst, amount, ps, h, j)
        local base, head, size, cap, xs, xn, hs = now_s, 0, 0, 0, 0, 0, 0
        local fr = 1
        if #h == HDR then
          base, head, size, cap, xs, xn, hs = unpack('<ddddddd', h)
          -- An application's string of 56 bytes or more under the name has
          -- no ring's header (whole head < cap <= the largest amount, size
          -- <= cap, ns < 1e9, a whole base within 2^40 s, which keeps the
          -- TTLs computed from it integers Redis takes; NaN and infinities
          -- fail every test): refused like a foreign type, or its bytes
          -- would be read and overwritten as a ring.
          if not (cap >= 1 and cap <= 1048576 and cap % 1 == 0 and
                  head >= 0 and head < cap and head % 1 == 0 and
                  size >= 0 and size <= cap and size % 1 == 0 and
                  xn >= 0 and xn < E9 and base % 1 == 0 and
                  base > -1099511627776 and base < 1099511627776) then
            return
          end
          if later(xs, xn, now_s, now_ns) then fr = 0 end
        elseif h ~= '' then
          return
        end
        local ss, sn = now_s - ps, now_ns  -- since = now - period
        local stored = size
        if fr == 1 then size, head = 0, 0 end
        local allowed, bs, bn, inw, os, on, es, en, parts
        if j and j < 0 then
          local m = -9 * j - 9
          allowed, bs, bn, inw = mst[m + 1], mst[m + 2], mst[m + 3], mst[m + 4]
          os, on, es, en, parts = mst[m + 5], mst[m + 6], mst[m + 7],
                                  mst[m + 8], mst[m + 9]
        else
          allowed, bs, bn = cst <= amount, 0, 0
          if allowed and amount - cst < size then
            bs, bn = entry(k, base, head, cap, size - 1 - (amount - cst))
            if not bs then return end
            allowed = later(ss, sn, bs, bn)  -- blocker < since
          end
          es, en = now_s, now_ns  -- the time the new entries record
          local add = 0  -- how many
          if allowed and cst > 0 and not test then
            add = cst
            if size > 0 then
              -- A clock behind the newest entry records at that entry's
              -- time (as the memory store): the log stays in order and its
              -- expiry never moves back. (xs, xn) is the newest entry's
              -- time + period + 1 ns: a clock not behind it needs no
              -- GETRANGE to know.
              local ts, tn = now_s + ps, now_ns + 1
              if tn >= E9 then ts, tn = ts + 1, tn - E9 end
              if later(xs, xn, ts, tn) then
                local ls, ln = entry(k, base, head, cap, size - 1)
                if not ls then return end
                if later(ls, ln, es, en) then es, en = ls, ln end
              end
              if cap ~= amount then
                -- The limit changed for this key: the newest entries are
                -- kept.
                local keep = size
                if keep > amount then keep = amount end
                local t = {}
                for idx = size - keep, size - 1 do
                  local s, n = entry(k, base, head, cap, idx)
                  if not s then return end
                  t[#t + 1] = pack('<i4I4', s - base, n)
                end
                parts = table.concat(t)
              end
            end
          end
          -- Entries strictly inside the window after the write, by the
          -- memory store's search, done on the log as found: the new
          -- entries follow the old ones, and the log keeps the newest
          -- `amount` of all.
          local lo, hi = 0, size
          while lo < hi do
            local mid = lo + floor((hi - lo) / 2)
            local ms, mn = entry(k, base, head, cap, mid)
            if not ms then return end
            if later(ms, mn, ss, sn) then hi = mid else lo = mid + 1 end
          end
          local n = size + add
          if add > 0 then
            if not later(es, en, ss, sn) then lo = n end
            if lo < n - amount then lo = n - amount end  -- dropped
          end
          os, on = now_s, now_ns
          if lo < size then
            os, on = entry(k, base, head, cap, lo)
            if not os then return end
          elseif lo < n then
            os, on = es, en
          end
          inw = n - lo
          if j then
            local m = 9 * j - 9
            mst[m + 1], mst[m + 2], mst[m + 3], mst[m + 4] =
                allowed, bs, bn, inw
            mst[m + 5], mst[m + 6], mst[m + 7], mst[m + 8], mst[m + 9] =
                os, on, es, en, parts
            return true, allowed
          end
        end
        if not test then
          if allowed and cst > 0 then
            if size == 0 then
              base = now_s
            elseif cap ~= amount then
              local keep = size
              if keep > amount then keep = amount end
              call('SET', k, pack('<ddddddd', base, 0, keep, amount, xs, xn,
                                  0) .. parts)
              head, size, hs = 0, keep, 0
            end
            cap = amount
            local e = pack('<i4I4', es - base, en)
            if cst >= cap then
              head, size = 0, cap
              call('SETRANGE', k, HDR, string.rep(e, cap))
            else
              local tail = (head + size) % cap
              local first = cap - tail
              if first > cst then first = cst end
              call('SETRANGE', k, HDR + tail * 8, string.rep(e, first))
              if cst > first then
                call('SETRANGE', k, HDR, string.rep(e, cst - first))
              end
              size = size + cst
              if size > cap then
                head, size = (head + size - cap) % cap, cap
              end
            end
            -- More than once only for an entry's ns past 1e9 (not the
            -- script's), which would make the header refused.
            xs, xn = es + ps, en + 1
            while xn >= E9 do xs, xn = xs + 1, xn - E9 end
            if xs + 1 >= hs then
              -- Room for two periods (at least 4 s): renewed at most about
              -- once per period.
              local room = 2 * ps
              if room < 4 then room = 4 end
              -- From the newest entry (later than now for a clock
              -- behind).
              hs = es + room
              call('PEXPIRE', k, (hs - now_s) * 1000 + 1 + slack)
            end
            call('SETRANGE', k, 0,
                 pack('<ddddddd', base, head, size, cap, xs, xn, hs))
          elseif fr == 1 and stored > 0 then
            call('DEL', k)  -- the memory store clears a stale log
          end
        end
        return allowed, fr, bs, bn, inw, os, on
      end
    end
    -- A log's entries are read before the request's first write too, by
    -- `moving`, which keeps what it read for the loop: a log with entries
    -- missing refuses the request with nothing written. The limits listed
    -- all come before one the loop above refused.
    for m = 1, nm do
      local i, h = pmv[2 * m - 1], pmv[2 * m]
      local key = keys[k0 + i]
      local _, cost, p1, ps = unpack('<dddd', args, first + (i - 1) * 56)
      local found, allowed = moving(key, cost, p1, ps, h, i)
      if not found then
        bad, bi = {err = NOLOG}, i
        break
      end
      if pre[i] ~= nil then
        -- The request stops at this limit: the loop reaches no later one,
        -- whose logs need no reading (as many requests stop at their
        -- first limit as are refused).
        if not allowed then break end
      elseif #h == 56 then
        -- The loop reads this log again after an earlier limit wrote it
        -- (the same key), so maybe at entries not read here: the log's
        -- furthest entry present proves them all there (and the script's
        -- writes keep it so).
        local _, hd, sz, cp = unpack('<dddd', h)
        local top = hd + sz
        if top > cp then top = cp end
        local off = 48 + top * 8
        if top > 0 and #call('GETRANGE', key, off, off + 7) ~= 8 then
          bad, bi = {err = NOLOG}, i
          break
        end
      end
    end
    local todo = nk
    if bad then todo = 0 end
    for i = 1, todo do
      local key = keys[k0 + i]
      local at = first + (i - 1) * 56  -- this limit's values
      local code, cost, p1 = c1, k1, a1
      if i > 1 then code, cost, p1 = unpack('<ddd', args, at) end
      local got = v0  -- what was read of the key, if anything
      if prefetched then got = pre[i] end
      local ok = false
      local fresh, x1, x2, x3, x4, x5 = 1, 0, 0, 0, 0, 0
      local raw  -- the value GET found, when its leading doubles are x1 .. x3
      if code == 0 or code == 4 then
        -- Fixed window (4: limits' incr): pack(count, expiry_s, expiry_ns).
        -- p1 amount, (p2, p3) period as (s, ns).
        local v = got
        if v == nil then v = try('GET', key) end
        if v then
          if #v ~= 24 then bad, bi = v, i break end
          x1, x2, x3 = unpack('<ddd', v)
          raw = v
          if x2 > now_s or (x2 == now_s and x3 > now_ns) then fresh = 0 end
        end
        local c = cost
        if fresh == 0 then c = x1 + cost end
        if test then
          ok = c <= p1
        else
          if c == cost or fresh == 1 then
            -- A new window: the key lives until its end, plus slack.
            local p2, p3 = unpack('<dd', args, at + 24)
            slack = unpack('<d', args, at_slack)
            local xs, xn = now_s + p2, now_ns + p3
            if xn >= E9 then xs, xn = xs + 1, xn - E9 end
            local ms = floor(((xs - now_s) * E9 + (xn - now_ns)) / 1000000) + 1
            call('SET', key, pack('<ddd', c, xs, xn), 'PX', ms + slack)
          else
            -- Same window: only the count changes. SETRANGE rewrites it in
            -- place and keeps the TTL; it answers with an integer where SET
            -- answers with a status that Redis turns into a Lua table.
            call('SETRANGE', key, '0', pack('<d', c))
          end
          ok = code == 4 or c <= p1
        end
      elseif code == 3 then
        -- Token bucket (GCRA): pack(tat_s, tat_ns, tat_frac, horizon_s), the
        -- theoretical arrival time being tat_s * 1e9 + tat_ns + tat_frac /
        -- amount. p1 amount; (p2, p3) = cost * period / amount and (p4, p5) =
        -- burst * period / amount, as ns + fraction in 1/amount ns.
        if p1 > 0 then
          local p2, p3, p4, p5 = unpack('<dddd', args, at + 24)
          local v = got
          if v == nil then v = try('GET', key) end
          local an, af, hs = p2, p3, 0  -- used + cost, with used = 0 if fresh
          if v then
            if #v ~= 32 then bad, bi = v, i break end
            x1, x2, x3, hs = unpack('<dddd', v)
            -- As in the fast path above (and the prefetch).
            if not (x2 >= 0) then bad, bi = {err = NOSTATE}, i break end
            raw = v
            if x1 > now_s or (x1 == now_s and x2 > now_ns) then
              fresh = 0
              an, af = an + (x1 - now_s) * E9 + (x2 - now_ns), af + x3
              if af >= p1 then an, af = an + 1, af - p1 end
            end
          end
          local k_ns = p4
          -- A cost of 0 is always allowed and writes nothing (see above).
          ok = cost == 0 or an < k_ns or (an == k_ns and af <= p5)
          if ok and not test and cost > 0 then
            local t = now_ns + an
            local s = t / E9
            s = s - s % 1  -- floor without a function call
            t = t - s * E9
            if t < 0 then
              s, t = s - 1, t + E9
            elseif t >= E9 then
              s, t = s + 1, t - E9
            end
            s = now_s + s
            if s < hs then
              call('SETRANGE', key, '0', pack('<ddd', s, t, af))  -- hs kept
            else
              -- Room for the bucket to fill twice (at least 2 s): renewed at
              -- most once per capacity.
              local room = 2 * k_ns
              if room < 2 * E9 then room = 2 * E9 end
              local ms = floor((an + room) / 1000000) + 1
              slack = unpack('<d', args, at_slack)
              call('SET', key,
                   pack('<dddd', s, t, af, now_s + floor(ms / 1000)),
                   'PX', ms + slack)
            end
          end
        end
      elseif code == 2 then
        -- Sliding window counter: pack(window, current, previous, horizon_s).
        -- p1 amount, p2 window index, p3 period, p4 period - (now mod period),
        -- p5 period in ms.
        local p2, p3, p4, p5 = unpack('<dddd', args, at + 24)
        local v = got
        if v == nil then v = try('GET', key) end
        local hs = 0
        if v then
          if #v ~= 32 then bad, bi = v, i break end
          x1, x2, x3, hs = unpack('<dddd', v)
          raw = v
          if x1 + 2 > p2 then fresh = 0 end
        end
        -- w: the window counted in, pttl: the previous window's weight
        -- time. A clock behind the newest window the key has counts in
        -- counts in that window, as at its start (nothing is lost).
        local w, pttl = p2, p4
        if fresh == 0 and x1 > p2 then
          -- The TTL below is the lead over now's window plus at most
          -- three periods and the slack: 1e17 ms or more reaches Redis in
          -- exponent form (a Lua number of 17 digits), which it refuses. A
          -- lead below 9e22 ns (2.9 million years; an int64 clock spans
          -- 292) keeps it under. The prefetch checks this before a
          -- request's first write.
          if not ((x1 - p2) * p3 < 9e22) then
            bad, bi = {err = NOSTATE}, i
            break
          end
          w, pttl = x1, p3
        end
        local c, p = x2, x3
        if fresh == 1 or x1 < w - 1 then
          c, p = 0, 0
        elseif x1 == w - 1 then
          c, p = 0, c
        end
        ok = cost <= p1
        if ok then
          local room = p1 - c - cost
          if room < 0 then
            ok = false
          elseif p > 0 then
            -- floor(p * pttl / period) <= room, exactly.
            if not mul_lt then
              mul_lt = function(a, b, cc, d)
                local x, y = a * b, cc * d
                if x < 9007199254740992 and y < 9007199254740992 then
                  return x < y
                end
                local B = 16777216
                local function mul(u, w)
                  local u1 = floor(u / B)
                  local u2 = floor(u1 / B)
                  local w1 = floor(w / B)
                  local w2 = floor(w1 / B)
                  local u0, w0 = u - u1 * B, w - w1 * B
                  u1, w1 = u1 - u2 * B, w1 - w2 * B
                  local r = {u0 * w0, u0 * w1 + u1 * w0,
                             u0 * w2 + u1 * w1 + u2 * w0, u1 * w2 + u2 * w1,
                             u2 * w2}
                  for k = 1, 4 do
                    local carry = floor(r[k] / B)
                    r[k] = r[k] - carry * B
                    r[k + 1] = r[k + 1] + carry
                  end
                  return r
                end
                local pa, pb = mul(a, b), mul(cc, d)
                for k = 5, 1, -1 do
                  if pa[k] ~= pb[k] then return pa[k] < pb[k] end
                end
                return false
              end
            end
            ok = mul_lt(p, pttl, room + 1, p3)
          end
        end
        if not test then
          if ok then c = c + cost end
          -- The state is void from the start of window w + 2, which is
          -- (w - p2) periods + p4 + period from now.
          local end_ms = floor(((w - p2) * p3 + p4) / 1000000) + p5 + 1
          if now_s + floor(end_ms / 1000) + 1 < hs then
            call('SETRANGE', key, '0', pack('<ddd', w, c, p))  -- hs kept
          else
            local spare = p5  -- a window (at least 2 s) to spare
            if spare < 2000 then spare = 2000 end
            local ms = end_ms + spare
            slack = unpack('<d', args, at_slack)
            call('SET', key, pack('<dddd', w, c, p, now_s + floor(ms / 1000)),
                 'PX', ms + slack)
          end
        end
      elseif code == 1 then
        -- Moving window: p1 amount, p2 period in seconds.
        local h, j = got, nil
        if h == nil then
          h = try('GETRANGE', key, 0, 55)
        elseif prefetched then
          j = -i  -- read in the prefetch: the writes are left
        end
        slack = unpack('<d', args, at_slack)
        ok, fresh, x1, x2, x3, x4, x5 =
            moving(key, cost, p1, (unpack('<d', args, at + 24)), h, j)
        if ok == nil then
          if #h == 56 then h = {err = NOLOG} end
          bad, bi = h, i
          break
        end
      end
      -- The reply (see the header): the flag byte is a literal in the
      -- common case, and the found value goes back as the very bytes GET
      -- returned, since struct.pack costs Redis more than the GET itself.
      local n = raw and #raw
      if nk == 1 then
        if n == 24 or n == 32 then
          local f
          if n == 24 then
            if ok then
              if fresh == 1 then f = '\15' else f = '\13' end
              if code == 0 and nout == 0 and pos >= nargs then return raw end
            elseif fresh == 1 then
              f = '\14'
            else
              f = '\12'
            end
          elseif ok then
            if fresh == 1 then f = '\23' else f = '\21' end
            if code == 3 and nout == 0 and pos >= nargs then return raw end
          elseif fresh == 1 then
            f = '\22'
          else
            f = '\20'
          end
          -- A call for one request answers without the table.
          if nout == 0 and pos >= nargs then return f .. raw end
          out[nout + 1] = f
          out[nout + 2] = raw
          nout = nout + 2
        else
          local f = 4 + 2 * fresh
          if ok then f = f + 1 end
          nout = nout + 1
          out[nout] = pack('<Bddddd', f, x1, x2, x3, x4, x5)
        end
      else
        local last = i == nk or (not ok and not test)
        local f = 2 * fresh
        if ok then f = f + 1 end
        if last then f = f + 4 end
        if n == 24 or n == 32 then
          out[nout + 1] = string.char(f + n - 16)  -- 3 or 4 doubles
          out[nout + 2] = raw
          nout = nout + 2
        else
          nout = nout + 1
          out[nout] = pack('<Bddddd', f, x1, x2, x3, x4, x5)
        end
        if last then break end
      end
    end
    if bad then
      -- The error block takes the place of the blocks the request added.
      local msg
      if type(bad) == 'table' then
        msg = tostring(bad.err)
      else
        msg = 'a string of ' .. #bad .. ' bytes, not the state of the ' ..
              'limit\'s strategy'
      end
      if #msg == 7 or #msg == 15 then msg = msg .. ' ' end
      out[nout0 + 1] = pack('<Bdd', 32, bi, #msg)
      out[nout0 + 2] = msg
      nout = nout0 + 2
    end
  end
end
if nout == 2 then return out[1] .. out[2] end
if nout == 1 then return out[1] end
-- A refused request may have left blocks of its own past nout.
return table.concat(out, '', 1, nout)
