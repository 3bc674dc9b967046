"""The Lua scripts behind the shared account, limiter and ledger.

Every change to shared state is one script, so it is atomic: no other process
sees half of it. Times are the Redis server's (``TIME``), never a host's clock,
so hosts whose clocks disagree still agree on leases and pauses. All keys of an
account share one hash tag (``kling:{account}:...``), so the scripts also run
on a Redis Cluster slot.

Ownership is **fenced**: each member incarnation gets a token (``INCR``) when
it joins; every script acting for a member checks the token first and answers
``fenced`` when the member was reaped meanwhile (it joins again, as a new
incarnation), or ``reset`` when the account's epoch key is gone (Redis lost its
data: the members re-assert what they hold). Quota units are held **per task**
(external_task_id), so a release is idempotent and never erases another task's
units, and a task taken over by a survivor is counted once.

Shared keys (``P`` is the account's prefix):

``P epoch``             string  this incarnation of the account's state
``P members``           zset    member -> lease expiry (ms); missing or expired: dead
``P fence``             hash    member -> token of its live incarnation
``P fence_seq``         string  the last token given
``P heartbeat``         string  when Redis last ran a script of the account (ms)
``P held``              hash    external_task_id -> "holder|units|running"
``P orphan_deadline``   zset    external_task_id -> when a dead holder's task
                                stops being counted (if nobody adopted it)
``P limiter``           hash    the adaptive limit and its learning state
``P starving``          zset    "member|waiter" -> since (ms)
``P last``              hash    member -> its last limiter call's reply
``P account``           string  fingerprint of the Kling credentials bound here
``P e:<id>``, ``P b:<id>`` the ledger entry (JSON) and its request body
``P k:<key>``           "external_task_id digest" reserved under a key
``P unsettled``         zset    external_task_id -> intended_at
``P owner``             hash    external_task_id -> member, for unsettled entries
``P owned:<member>``    set     a member's unsettled external_task_ids
``P owners``            set     members that own unsettled entries
"""

from __future__ import annotations

from typing import Final

__all__ = ["CLAIM", "JOIN", "LIMITER", "RECORD", "RENEW", "RESERVE"]

# Shared by every script. KEYS[1..6]: members, fence, held, orphan_deadline,
# heartbeat, epoch. ARGV[1..5]: me, token, epoch, lease_ms, orphan_ttl_ms.
_PRELUDE: Final = r"""
local M, FENCE, HELD, OD, BEAT, EPOCH = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local me, token, epoch = ARGV[1], ARGV[2], ARGV[3]
local lease, orphan_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function n(value)
  return tonumber(value) or 0
end

local function parse(value)
  local holder, units, running = string.match(value, '^(.*)|(%d+)|(%d)$')
  return holder, n(units), running == '1'
end

local function hold(task, holder, units, running)
  redis.call('HSET', HELD, task, holder .. '|' .. units .. '|' .. (running and '1' or '0'))
end

local function alive(member)
  if member == '' then
    return false
  end
  local expiry = redis.call('ZSCORE', M, member)
  return expiry ~= false and tonumber(expiry) >= now
end

-- Units held by every task (orphans included: Kling still counts them), and
-- by the tasks Kling confirmed it created.
local function sums()
  local in_use, running = 0, 0
  local flat = redis.call('HGETALL', HELD)
  for i = 2, #flat, 2 do
    local _, units, is_running = parse(flat[i])
    in_use = in_use + units
    if is_running then
      running = running + units
    end
  end
  return in_use, running
end

-- Death needs evidence: a gap in which Redis ran no script of the account
-- (it was stopped, failing over, or unreachable) does not count against
-- leases. Members alive when Redis last served get the gap back.
local function credit_gap()
  local beat = tonumber(redis.call('GET', BEAT))
  if beat and now - beat > lease / 2 then
    local gap = now - beat
    local flat = redis.call('ZRANGEBYSCORE', M, beat, '+inf', 'WITHSCORES')
    for i = 1, #flat, 2 do
      redis.call('ZADD', M, tonumber(flat[i + 1]) + gap, flat[i])
    end
  end
  redis.call('SET', BEAT, now)
end

-- A member leaves (closing) or is reaped: its per-member state goes, its
-- tasks stay counted as orphans until a survivor adopts them or orphan_ttl.
local function drop_member(member)
  local prefix_of = KEYS[1]:sub(1, -8)
  redis.call('ZREM', M, member)
  redis.call('HDEL', FENCE, member)
  redis.call('HDEL', prefix_of .. 'last', member)
  if redis.call('SCARD', prefix_of .. 'owned:' .. member) == 0 then
    redis.call('SREM', prefix_of .. 'owners', member)
  end
  local flat = redis.call('HGETALL', HELD)
  for i = 1, #flat, 2 do
    local holder = parse(flat[i + 1])
    if holder == member then
      redis.call('ZADD', OD, 'NX', now + orphan_ttl, flat[i])
    end
  end
end

-- Reap members whose lease expired while Redis was serving; stop counting
-- orphans nobody adopted within orphan_ttl. Returns whether units were freed.
local function reap()
  credit_gap()
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', M, '-inf', '(' .. now)) do
    drop_member(member)
  end
  local freed = false
  for _, task in ipairs(redis.call('ZRANGEBYSCORE', OD, '-inf', '(' .. now)) do
    local value = redis.call('HGET', HELD, task)
    if value and not alive((parse(value))) then
      redis.call('HDEL', HELD, task)
      freed = true
    end
    redis.call('ZREM', OD, task)
  end
  return freed
end

-- 'ok', or why this member may not act: Redis lost the account's state
-- ('reset'), or this incarnation was reaped ('fenced').
local function standing()
  if redis.call('GET', EPOCH) ~= epoch then
    return 'reset'
  end
  if redis.call('HGET', FENCE, me) ~= token then
    return 'fenced'
  end
  return 'ok'
end
"""

JOIN: Final = (
    _PRELUDE
    + r"""
-- KEYS[7]: limiter state. ARGV[6]: a fresh epoch, used if the account has none.
-- A member id is unique among live members; a new incarnation gets a new token.
local S = KEYS[7]
reap()
local reset = 0
local current = redis.call('GET', EPOCH)
if not current then
  current = ARGV[6]
  redis.call('SET', EPOCH, current)
  if epoch ~= '' then
    reset = 1
  end
elseif epoch ~= '' and epoch ~= current then
  reset = 1
end
if reset == 1 then
  -- Redis lost what the members held: admit nothing until every live member
  -- had a lease's time to re-assert its tasks.
  local quiet = n(redis.call('HGET', S, 'quiet_until'))
  if quiet < now then
    redis.call('HSET', S, 'quiet_until', now + lease)
  end
end
local expiry = redis.call('ZSCORE', M, me)
if expiry and tonumber(expiry) >= now and redis.call('HGET', FENCE, me) ~= token then
  return {'taken'}
end
local new_token = tostring(redis.call('INCR', KEYS[1]:sub(1, -8) .. 'fence_seq'))
redis.call('HSET', FENCE, me, new_token)
redis.call('ZADD', M, now + lease, me)
-- Tasks this member still holds are its own again, not orphans.
local flat = redis.call('HGETALL', HELD)
for i = 1, #flat, 2 do
  if parse(flat[i + 1]) == me then
    redis.call('ZREM', OD, flat[i])
  end
end
return {'ok', new_token, current, reset}
"""
)
"""Join (or join again): reply ``['ok', token, epoch, reset]`` or ``['taken']``."""

RENEW: Final = (
    _PRELUDE
    + r"""
-- ARGV[6]: leave (1: this member is closing and hands its tasks over)
reap()
local status = standing()
if status ~= 'ok' then
  return {status}
end
if ARGV[6] == '1' then
  drop_member(me)
else
  redis.call('ZADD', M, now + lease, me)
end
return {'ok'}
"""
)
"""Renew (or give up) a member's lease, reaping dead members on the way."""

LIMITER: Final = (
    _PRELUDE
    + r"""
-- KEYS[7..9]: limiter state, starving waiters, last replies.
-- ARGV: 6 fairness_ms, 7 capacity ('' = unknown), 8 seq, 9 ops (JSON),
--       10 waiters (JSON [[id, task, units, age_ms], ...]), 11 min_cooldown_ms,
--       12 channel, 13 max_cooldown_ms, 14 max_spacing_ms, 15 first_spacing_ms,
--       16 unknown_start
local S, F, LAST = KEYS[7], KEYS[8], KEYS[9]
local seq = ARGV[8]

local freed = reap()
local status = standing()
if status ~= 'ok' then
  return {status}
end
redis.call('ZADD', M, now + lease, me)

-- A call retried after its answer was lost gets the first answer back.
local last = redis.call('HGET', LAST, me)
if last then
  local cached = cjson.decode(last)
  if cached[1] == token .. ':' .. seq then
    return cached[2]
  end
end

local fairness, capacity = tonumber(ARGV[6]), tonumber(ARGV[7])
local min_cooldown, channel = tonumber(ARGV[11]), ARGV[12]
local max_cooldown, max_spacing = tonumber(ARGV[13]), tonumber(ARGV[14])
local first_spacing, unknown_start = tonumber(ARGV[15]), tonumber(ARGV[16])

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
local quiet_until = state.quiet_until or 0
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

local function held_by(task)
  local value = redis.call('HGET', HELD, task)
  if not value then
    return nil
  end
  return parse(value)
end

for _, op in ipairs(cjson.decode(ARGV[9])) do
  local kind, task = op[1], op[2]
  if kind == 'release' then
    -- Only the holder releases, once: a member whose task was adopted
    -- meanwhile releases nothing it no longer owns. A failed create (op[3]
    -- 0) of a task Kling confirmed created frees nothing: it was another try
    -- of the same id (its units are the task's, counted once), and the task
    -- runs on ("external_task_id already exists", then found by lookup).
    local holder, _, running = held_by(task)
    if (holder == me or holder == '') and not (running and op[3] == 0) then
      redis.call('HDEL', HELD, task)
      redis.call('ZREM', OD, task)
      freed = true
    end
  elseif kind == 'created' then
    local holder, units = held_by(task)
    if holder == me then
      hold(task, me, units, true)
    end
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
    local jitter = tonumber(op[3]) or 1000
    rejected = rejected + 1
    successes = 0
    ceiling_known = 1
    -- The quota is full with what running tasks hold (orphans included:
    -- Kling still counts those): that is all that may be counted on.
    local _, running = sums()
    limit = math.max(1, running)
    -- Creates already in flight when the first 1303 came are one wave: only
    -- a 1303 to a create sent after the pause lengthens the next one.
    if now >= resume_at then
      rejections = rejections + 1
      local cooldown = math.min(max_cooldown, min_cooldown * 2 ^ math.min(rejections - 1, 16))
      resume_at = math.max(resume_at, now + math.floor(cooldown * jitter / 1000))
    end
  elseif kind == '1302' then
    spacing = math.min(max_spacing, math.max(first_spacing, spacing * 2))
  elseif kind == 'adopt' or kind == 'hold' or kind == 'assert' then
    -- adopt: a running task taken over; hold: a create taken over (it may
    -- have landed: its units stay counted); assert: re-written after a reset.
    local holder, units, running = held_by(task)
    if holder == nil then
      -- A create taken over whose member held no units for it was still
      -- queued for them: never sent, it cannot have landed. It is sent again
      -- through admission like any create; units held for it here would admit
      -- it past the quota.
      if kind ~= 'hold' then
        hold(task, me, tonumber(op[3]), kind == 'adopt' or op[4] == 1)
      end
    elseif kind ~= 'assert' or holder == me or not alive(holder) then
      hold(task, me, units, running or kind == 'adopt')
    end
    redis.call('ZREM', OD, task)
  elseif kind == 'hand_over' then
    -- The client closes while Kling still runs the task: it stays counted,
    -- held by nobody, for a survivor to adopt (or until orphan_ttl).
    if held_by(task) == me then
      local _, units, running = held_by(task)
      hold(task, '', units, running)
      redis.call('ZADD', OD, 'NX', now + orphan_ttl, task)
    end
  elseif kind == 'release_orphans' then
    -- A survivor took over every task of the dead member ``task`` that it
    -- knew of: what that member still holds ended or never landed, unless
    -- the task's ledger entry is still unsettled (another member's: it may
    -- run), which stays counted until adopted, ended or orphan_ttl.
    if not alive(task) then
      local unsettled = KEYS[1]:sub(1, -8) .. 'unsettled'
      local all = redis.call('HGETALL', HELD)
      for i = 1, #all, 2 do
        if parse(all[i + 1]) == task then
          if redis.call('ZSCORE', unsettled, all[i]) then
            redis.call('ZADD', OD, 'NX', now + orphan_ttl, all[i])
          else
            redis.call('HDEL', HELD, all[i])
            redis.call('ZREM', OD, all[i])
            freed = true
          end
        end
      end
    end
  elseif kind == 'forget' then
    redis.call('ZREM', F, me .. '|' .. task)
  end
end

local admitted = {}
local wake = -1
local waiters = cjson.decode(ARGV[10])
local in_use, running_units = sums()
-- Starving marks of this member's waiters that are no longer queued (admitted,
-- cancelled, re-queued under a new id) block nobody.
local queued = {}
for _, waiter in ipairs(waiters) do
  queued[me .. '|' .. waiter[1]] = true
end
local starving = redis.call('ZRANGE', F, 0, -1, 'WITHSCORES')
local blockers = {}
for i = 1, #starving, 2 do
  local id = starving[i]
  local owner = string.match(id, '^(.*)|[^|]*$')
  if owner == nil or not alive(owner) or (owner == me and not queued[id]) then
    redis.call('ZREM', F, id)
  else
    table.insert(blockers, {id, tonumber(starving[i + 1])})
  end
end
if #waiters > 0 then
  if now < quiet_until then
    wake = quiet_until - now
  elseif now < resume_at then
    wake = resume_at - now
  else
    for _, waiter in ipairs(waiters) do
      local id, task, units, age = waiter[1], waiter[2], tonumber(waiter[3]), tonumber(waiter[4])
      local key = me .. '|' .. id
      local holder = held_by(task)
      if holder ~= nil and (holder == me or not alive(holder)) then
        -- Its units are held already (a create taken over, re-queued): they
        -- become this member's, counted once.
        local _, held_units, is_running = held_by(task)
        hold(task, me, held_units, is_running)
        redis.call('ZREM', OD, task)
        redis.call('ZREM', F, key)
        table.insert(admitted, id)
      elseif holder == nil then
        local blocked = false
        -- A waiter marked starving keeps the time it was marked with: its age,
        -- measured again on this host's clock, drifts by milliseconds, and
        -- waiters marked together must not block each other for it.
        local since = tonumber(redis.call('ZSCORE', F, key)) or (now - age)
        for _, blocker in ipairs(blockers) do
          if blocker[2] >= since then
            break
          end
          if blocker[1] ~= key then
            blocked = true
            break
          end
        end
        -- A waiter younger than one that waited too long (here or elsewhere)
        -- is passed over, but the ones behind it are still looked at: the
        -- starving one may be among them (a re-queued create goes first).
        if not blocked then
          local fits = in_use + units <= limit
          local alone = in_use == 0 and units > limit
          if fits or alone then
            if now < next_create then
              wake = next_create - now
              break
            end
            in_use = in_use + units
            hold(task, me, units, false)
            redis.call('ZREM', F, key)
            next_create = now + spacing
            table.insert(admitted, id)
          elseif age >= fairness then
            redis.call('ZADD', F, 'NX', since, key)
            table.insert(blockers, {key, since})
            table.sort(blockers, function(a, b) return a[2] < b[2] end)
            -- it has waited long enough: nobody younger passes it now
          end
        end
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

local reply = {'ok', limit, in_use, wake, creates, rejected, running_units}
for _, id in ipairs(admitted) do
  table.insert(reply, id)
end
redis.call('HSET', LAST, me, cjson.encode({token .. ':' .. seq, reply}))
return reply
"""
)
"""Apply a member's queued limiter operations in order, then admit what fits of
its waiting creates; reply ``['ok', limit, units in use, wake in ms, creates,
1303s, running units, admitted waiter ids...]``."""

# Writing one ledger record; shared by RECORD and RESERVE. UNS, OWN, OWNERS
# and prefix are set by the script.
_WRITE: Final = r"""
-- Returns false when the entry was claimed from this member (fenced out).
local function write(id, entry, body, key, digest, settled, intended_at, retention, state)
  local e, b = prefix .. 'e:' .. id, prefix .. 'b:' .. id
  local try = redis.call('ZSCORE', UNS, id)
  if try and tonumber(try) ~= tonumber(intended_at) and state ~= 'intended'
      and state ~= 'terminal' and state ~= 'gone' then
    -- Another try of the create is the current one (a survivor's, or this
    -- member's own after it claimed the entry back): an older try's news
    -- ("never sent" as it was cancelled, "sent", "uncertain") is not the
    -- entry's, and would settle or confuse it. An intent starts a try; a
    -- task's end or absence is a fact whoever saw it.
    return false
  end
  local previous = redis.call('HGET', OWN, id)
  if previous and previous ~= me then
    if settled ~= 1 then
      return false  -- a survivor took it over: it is theirs now
    end
    redis.call('SREM', prefix .. 'owned:' .. previous, id)
  end
  if settled ~= 1 and body == '' and not previous
      and redis.call('EXISTS', e) == 1 and not redis.call('ZSCORE', UNS, id) then
    -- Settled by another member (its body dropped, its owner cleared) after
    -- this one was taken for dead: a late record of an older state would
    -- re-open it without the body an adopter needs. Only a fresh intent,
    -- which carries its body, re-opens a settled entry.
    return false
  end
  if key ~= '' then
    -- The key is reserved once; it is never moved to another id.
    redis.call('SET', prefix .. 'k:' .. key, id .. ' ' .. digest, 'NX')
  end
  if settled == 1 then
    -- Settled: nobody needs to act on it any more; the body (megabytes of
    -- images, maybe) goes now, the entry after retention_s.
    redis.call('ZREM', UNS, id)
    redis.call('HDEL', OWN, id)
    redis.call('SREM', prefix .. 'owned:' .. me, id)
    redis.call('SET', e, entry, 'EX', retention)
    redis.call('DEL', b)
    if key ~= '' then
      local reserved = redis.call('GET', prefix .. 'k:' .. key)
      if reserved and string.sub(reserved, 1, #id) == id then
        redis.call('EXPIRE', prefix .. 'k:' .. key, retention)
      end
    end
  else
    redis.call('ZADD', UNS, intended_at, id)
    redis.call('HSET', OWN, id, me)
    redis.call('SADD', prefix .. 'owned:' .. me, id)
    redis.call('SADD', OWNERS, me)
    redis.call('SET', e, entry)
    if body ~= '' then
      redis.call('SET', b, body)
    end
  end
  return true
end
"""

# What RECORD and RESERVE do first: the ledger's keys, the member's standing
# (reaped, fenced out or not), then the one-record writer.
_LEDGER_STEP: Final = (
    r"""
local UNS, OWN, OWNERS = KEYS[7], KEYS[8], KEYS[9]
local prefix = ARGV[6]
reap()
local status = standing()
if status ~= 'ok' then
  return {status}
end
"""
    + _WRITE
)

RECORD: Final = (
    _PRELUDE
    + r"""
-- KEYS[7..9]: unsettled, owner, owners. ARGV: 6 prefix, 7 retention_s, 8 records
-- (JSON [[external_task_id, entry, body or '', key or '', digest, settled, intended_at,
-- state]])
"""
    + _LEDGER_STEP
    + r"""
local retention = tonumber(ARGV[7])
local refused = {'ok'}
for _, r in ipairs(cjson.decode(ARGV[8])) do
  if not write(r[1], r[2], r[3], r[4], r[5], r[6], r[7], retention, r[8]) then
    table.insert(refused, r[1])
  end
end
return refused
"""
)
"""Write a batch of ledger entries, keeping the indexes of unsettled entries
current; reply ``['ok', ids claimed by others...]``."""

RESERVE: Final = (
    _PRELUDE
    + r"""
-- KEYS[7..9]: unsettled, owner, owners. ARGV: 6 prefix, 7 key, 8 id, 9 digest,
-- 10 entry, 11 body, 12 intended_at. Reserves the key and writes the intent in
-- one step: of two members racing for a key, one creates, the other follows.
"""
    + _LEDGER_STEP
    + r"""
local reserved = redis.call('GET', prefix .. 'k:' .. ARGV[7])
if reserved then
  return {'ok', reserved}
end
write(ARGV[8], ARGV[10], ARGV[11], ARGV[7], ARGV[9], 0, ARGV[12], 0, 'intended')
return {'ok'}
"""
)
"""Reserve a key with its intent: ``['ok']``, or ``['ok', "id digest"]`` when
another request reserved it first."""

CLAIM: Final = (
    _PRELUDE
    + r"""
-- KEYS[7..8]: owner, owners. ARGV: 6 prefix, 7 only ('' for every dead
-- member, else one member's id)
local OWN, OWNERS = KEYS[7], KEYS[8]
local prefix, only = ARGV[6], ARGV[7]
reap()
local status = standing()
if status ~= 'ok' then
  return {status}
end
redis.call('ZADD', M, now + lease, me)
local claimed = {'ok'}
for _, owner in ipairs(redis.call('SMEMBERS', OWNERS)) do
  local owned = prefix .. 'owned:' .. owner
  if owner ~= me and not alive(owner) and (only == '' or only == owner) then
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
if #claimed > 1 then
  redis.call('SADD', OWNERS, me)
end
return claimed
"""
)
"""Claim the unsettled entries of dead members; reply ``['ok', owner, id, ...]``."""
