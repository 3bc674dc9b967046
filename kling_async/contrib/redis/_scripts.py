"""The Lua scripts behind the shared limiter and ledger.

Every change to shared state is one script, so it is atomic: no other process
sees half of it. Times are the Redis server's (``TIME``), never a host's clock,
so hosts whose clocks disagree still agree on leases and pauses. All keys of an
account share one hash tag (``kling:{account}:...``), so the scripts also run
on a Redis Cluster slot.

Shared keys (``P`` is the account's prefix):

``P members``           zset  member -> lease expiry (ms); a member missing or
                              expired is dead
``P inuse``, ``P running`` hash  member -> units it holds (all / of created tasks)
``P orphan_inuse``, ``P orphan_running``, ``P orphan_deadline``
                              a dead member's units: still counted (Kling still
                              runs its tasks) until a survivor adopts them or
                              the deadline passes
``P limiter``           hash  the adaptive limit and its learning state
``P starving``          zset  "member|waiter" -> since (ms): waiters that waited
                              past the fairness window; nobody younger passes them
``P last``              hash  member -> its last call's sequence number and
                              reply, so a call retried after a lost answer is
                              not applied twice
``P e:<id>``, ``P b:<id>`` the ledger entry (JSON) and its request body
``P k:<key>``           the external_task_id recorded under a batch key
``P unsettled``         zset  external_task_id -> intended_at
``P owner``             hash  external_task_id -> member, for unsettled entries
``P owned:<member>``    set   a member's unsettled external_task_ids
``P owners``            set   members that own unsettled entries
"""

from __future__ import annotations

from typing import Final

__all__ = ["CLAIM", "LIMITER", "RECORD", "RENEW"]

# Shared by every script: the clock, number helpers, and reaping dead members.
# KEYS[1..6] are always members, inuse, running, orphan_inuse, orphan_running,
# orphan_deadline.
_PRELUDE: Final = r"""
local M, U, R, OU, OR, OD = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function n(value)
  return tonumber(value) or 0
end

local function hsum(key)
  local total = 0
  for _, value in ipairs(redis.call('HVALS', key)) do
    total = total + n(value)
  end
  return total
end

local function add(key, field, delta)
  -- HINCRBY that never goes below zero: a release that lost a race with the
  -- reaper must not make a member hold negative units.
  local value = n(redis.call('HGET', key, field)) + delta
  if value > 0 then
    redis.call('HSET', key, field, value)
  else
    redis.call('HDEL', key, field)
  end
end

-- Members whose lease ran out are dead: their units become orphans, still
-- counted (Kling still counts their tasks) until a survivor adopts the tasks
-- or orphan_ttl passes. Returns whether units were freed (orphans expired).
local function reap(orphan_ttl)
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', M, '-inf', '(' .. now)) do
    local inuse, running = n(redis.call('HGET', U, member)), n(redis.call('HGET', R, member))
    if inuse > 0 or running > 0 then
      add(OU, member, inuse)
      add(OR, member, running)
      redis.call('ZADD', OD, now + orphan_ttl, member)
    end
    redis.call('HDEL', U, member)
    redis.call('HDEL', R, member)
    redis.call('ZREM', M, member)
  end
  local expired = redis.call('ZRANGEBYSCORE', OD, '-inf', '(' .. now)
  for _, member in ipairs(expired) do
    redis.call('HDEL', OU, member)
    redis.call('HDEL', OR, member)
    redis.call('ZREM', OD, member)
  end
  return #expired > 0
end

-- This member is alive. If it was taken for dead while stalled (its lease ran
-- out) and nobody adopted its units yet, it takes them back.
local function renew(me, lease)
  if redis.call('ZSCORE', M, me) == false then
    local inuse, running = n(redis.call('HGET', OU, me)), n(redis.call('HGET', OR, me))
    if inuse > 0 or running > 0 then
      add(U, me, inuse)
      add(R, me, running)
    end
    redis.call('HDEL', OU, me)
    redis.call('HDEL', OR, me)
    redis.call('ZREM', OD, me)
  end
  redis.call('ZADD', M, now + lease, me)
end
"""

RENEW: Final = (
    _PRELUDE
    + r"""
-- ARGV: me, lease_ms, orphan_ttl_ms, leave (1: this member is closing)
local me, lease = ARGV[1], tonumber(ARGV[2])
reap(tonumber(ARGV[3]))
if ARGV[4] == '1' then
  -- Closing: expire the lease now, so survivors adopt what is left at once.
  redis.call('ZADD', M, 0, me)
else
  renew(me, lease)
end
return 1
"""
)
"""Renew (or give up) a member's lease, reaping dead members on the way."""

LIMITER: Final = (
    _PRELUDE
    + r"""
-- KEYS[7..9]: limiter state, starving waiters, last replies.
-- ARGV: me, lease_ms, orphan_ttl_ms, fairness_ms, capacity ('' = unknown),
--       seq, ops (JSON), waiters (JSON [[id, units, age_ms], ...]),
--       min_cooldown_ms, channel, max_cooldown_ms, max_spacing_ms,
--       first_spacing_ms, unknown_start
local S, F, LAST = KEYS[7], KEYS[8], KEYS[9]
local me = ARGV[1]
local seq = ARGV[6]

-- A call retried after its answer was lost gets the first answer back.
local last = redis.call('HGET', LAST, me)
if last then
  local cached = cjson.decode(last)
  if cached[1] == seq then
    return cached[2]
  end
end

local lease, orphan_ttl, fairness = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local capacity = tonumber(ARGV[5])
local min_cooldown, channel = tonumber(ARGV[9]), ARGV[10]
local max_cooldown, max_spacing = tonumber(ARGV[11]), tonumber(ARGV[12])
local first_spacing, unknown_start = tonumber(ARGV[13]), tonumber(ARGV[14])

local freed = reap(orphan_ttl)
renew(me, lease)

local state = {}
local flat = redis.call('HGETALL', S)
for i = 1, #flat, 2 do
  state[flat[i]] = tonumber(flat[i + 1])
end
local limit = state.limit or capacity or unknown_start
local ceiling_known = state.ceiling_known or 0
if capacity then
  ceiling_known = 1
  if limit > capacity then
    limit = capacity
  end
end
local successes, rejections = state.successes or 0, state.rejections or 0
local resume_at, spacing = state.resume_at or 0, state.spacing or 0
local next_create = state.next_create or 0
local creates, rejected = state.creates or 0, state.rejected or 0
local limit_before = limit

local function grow()
  local ceiling = capacity or math.huge
  if limit >= ceiling then
    return
  end
  local grown = limit * 2
  if ceiling_known == 1 then
    grown = limit + 1
  end
  limit = math.min(ceiling, grown)
end

for _, op in ipairs(cjson.decode(ARGV[7])) do
  local kind, units = op[1], tonumber(op[2]) or 0
  if kind == 'release' then
    add(U, me, -units)
    if op[3] == 1 then
      add(R, me, -units)
    end
    freed = true
  elseif kind == 'created' then
    add(R, me, units)
    creates = creates + 1
    rejections = 0
    successes = successes + 1
    if successes >= math.max(1, limit) then
      successes = 0
      grow()
    end
    if spacing > 0 then
      if spacing <= first_spacing then
        spacing = 0
      else
        spacing = spacing / 2
      end
    end
  elseif kind == '1303' then
    rejected = rejected + 1
    successes = 0
    ceiling_known = 1
    -- The quota is full with what running tasks hold, everyone's and the
    -- orphans' (Kling still counts those): that is all that may be counted on.
    limit = math.max(1, hsum(R) + hsum(OR))
    -- Creates already in flight when the first 1303 came are one wave: only a
    -- 1303 to a create sent after the pause lengthens the next one.
    if now >= resume_at then
      rejections = rejections + 1
      local cooldown = math.min(max_cooldown, min_cooldown * 2 ^ math.min(rejections - 1, 16))
      resume_at = math.max(resume_at, now + math.floor(cooldown * units / 1000))
    end
  elseif kind == '1302' then
    spacing = math.min(max_spacing, math.max(first_spacing, spacing * 2))
  elseif kind == 'adopt' then
    add(U, me, units)
    add(R, me, units)
  elseif kind == 'adopt_from' then
    -- A survivor takes over a dead member's running task: its units move
    -- from that member's orphans to the survivor, so they are counted once.
    local owner = op[3]
    add(OU, owner, -math.min(units, n(redis.call('HGET', OU, owner))))
    add(OR, owner, -math.min(units, n(redis.call('HGET', OR, owner))))
    add(U, me, units)
    add(R, me, units)
  elseif kind == 'release_orphans' then
    -- The survivor took over every task of the dead member that still runs:
    -- what is left of its units was never Kling's.
    local owner = op[3]
    redis.call('HDEL', OU, owner)
    redis.call('HDEL', OR, owner)
    redis.call('ZREM', OD, owner)
    freed = true
  elseif kind == 'forget' then
    redis.call('ZREM', F, me .. '|' .. op[3])
  end
end

local admitted = {}
local wake = -1
local waiters = cjson.decode(ARGV[8])
local in_use = hsum(U) + hsum(OU)
if #waiters > 0 then
  -- Starving waiters of members that are gone block nobody.
  local blockers = {}
  local starving = redis.call('ZRANGE', F, 0, -1, 'WITHSCORES')
  for i = 1, #starving, 2 do
    local id = starving[i]
    local owner = string.match(id, '^(.*)|[^|]*$')
    if owner == nil or redis.call('ZSCORE', M, owner) == false then
      redis.call('ZREM', F, id)
    else
      table.insert(blockers, {id, tonumber(starving[i + 1])})
    end
  end
  if now < resume_at then
    wake = resume_at - now
  else
    for _, waiter in ipairs(waiters) do
      local id, units, age = waiter[1], tonumber(waiter[2]), tonumber(waiter[3])
      local key = me .. '|' .. id
      local since = now - age
      local blocked = false
      for _, blocker in ipairs(blockers) do
        if blocker[2] >= since then
          break
        end
        if blocker[1] ~= key then
          blocked = true
          break
        end
      end
      if blocked then
        break  -- an older waiter (here or elsewhere) waited too long: nobody passes it
      end
      local fits = in_use + units <= limit
      local alone = in_use == 0 and units > limit
      if fits or alone then
        if now < next_create then
          wake = next_create - now
          break
        end
        in_use = in_use + units
        add(U, me, units)
        redis.call('ZREM', F, key)
        next_create = now + spacing
        table.insert(admitted, id)
      elseif age >= fairness then
        redis.call('ZADD', F, 'NX', since, key)
        break  -- it has waited long enough: nobody passes it now
      end
    end
  end
end

redis.call('HSET', S, 'limit', limit, 'ceiling_known', ceiling_known,
  'successes', successes, 'rejections', rejections, 'resume_at', resume_at,
  'spacing', spacing, 'next_create', next_create, 'creates', creates,
  'rejected', rejected)
if freed or limit > limit_before then
  redis.call('PUBLISH', channel, me)
end

local reply = {limit, in_use, wake, creates, rejected, hsum(R) + hsum(OR)}
for _, id in ipairs(admitted) do
  table.insert(reply, id)
end
redis.call('HSET', LAST, me, cjson.encode({seq, reply}))
return reply
"""
)
"""Apply a member's queued limiter operations in order, then admit what fits of
its waiting creates; reply ``[limit, units in use, wake in ms, creates, 1303s,
running units, admitted waiter ids...]``."""

RECORD: Final = (
    _PRELUDE
    + r"""
-- KEYS[7..9]: unsettled, owner, owners. ARGV: prefix, me, retention_s, records
-- (JSON [[external_task_id, entry, body or '', key or '', settled, intended_at]])
local UNS, OWN, OWNERS = KEYS[7], KEYS[8], KEYS[9]
local prefix, me, retention = ARGV[1], ARGV[2], tonumber(ARGV[3])
for _, record in ipairs(cjson.decode(ARGV[4])) do
  local id, entry, body, key = record[1], record[2], record[3], record[4]
  local e, b = prefix .. 'e:' .. id, prefix .. 'b:' .. id
  local previous = redis.call('HGET', OWN, id)
  if previous then
    redis.call('SREM', prefix .. 'owned:' .. previous, id)
  end
  if record[5] == 1 then
    -- Settled: nobody needs to act on it any more; kept for retention_s.
    redis.call('ZREM', UNS, id)
    redis.call('HDEL', OWN, id)
    redis.call('SET', e, entry, 'EX', retention)
    if body ~= '' then
      redis.call('SET', b, body, 'EX', retention)
    else
      redis.call('EXPIRE', b, retention)
    end
    if key ~= '' then
      redis.call('SET', prefix .. 'k:' .. key, id, 'EX', retention)
    end
  else
    redis.call('ZADD', UNS, record[6], id)
    redis.call('HSET', OWN, id, me)
    redis.call('SADD', prefix .. 'owned:' .. me, id)
    redis.call('SADD', OWNERS, me)
    redis.call('SET', e, entry)
    if body ~= '' then
      redis.call('SET', b, body)
    else
      redis.call('PERSIST', b)
    end
    if key ~= '' then
      redis.call('SET', prefix .. 'k:' .. key, id)
    end
  end
end
return 1
"""
)
"""Write a batch of ledger entries and keep the indexes of unsettled entries
(by owner) current."""

CLAIM: Final = (
    _PRELUDE
    + r"""
-- KEYS[7..8]: owner, owners. ARGV: prefix, me, lease_ms, orphan_ttl_ms, only
-- ('' for every dead member, else one member's id)
local OWN, OWNERS = KEYS[7], KEYS[8]
local prefix, me, only = ARGV[1], ARGV[2], ARGV[5]
reap(tonumber(ARGV[4]))
renew(me, tonumber(ARGV[3]))
local claimed = {}
for _, owner in ipairs(redis.call('SMEMBERS', OWNERS)) do
  local owned = prefix .. 'owned:' .. owner
  if owner ~= me and redis.call('ZSCORE', M, owner) == false
      and (only == '' or only == owner) then
    -- A dead member's unsettled entries become this member's, all at once:
    -- two survivors never adopt the same task.
    for _, id in ipairs(redis.call('SMEMBERS', owned)) do
      redis.call('HSET', OWN, id, me)
      redis.call('SADD', prefix .. 'owned:' .. me, id)
      table.insert(claimed, owner)
      table.insert(claimed, id)
    end
    redis.call('DEL', owned)
    redis.call('SREM', OWNERS, owner)
  elseif redis.call('SCARD', owned) == 0 then
    redis.call('SREM', OWNERS, owner)
  end
end
if #claimed > 0 then
  redis.call('SADD', OWNERS, me)
end
return claimed
"""
)
"""Claim the unsettled entries of dead members; reply ``[owner, id, owner, id, ...]``."""
