//! The server-side scripts, each run atomically by Redis.
//!
//! Called with `EVALSHA`; a server that does not know a script (it restarted,
//! or it is another node of a cluster) gets it once with `EVAL`, which also
//! caches it. Every key a script touches is passed in `KEYS` and shares one
//! hash tag, so each runs unchanged on a Redis Cluster.

use fred::interfaces::LuaInterface;
use fred::prelude::FromValue;
use fred::types::scripts::Script;

/// One Lua script, known by its SHA-1.
pub struct Lua(Script);

impl Lua {
    /// The script `source`.
    pub fn new(source: &'static str) -> Lua {
        Lua(Script::from_lua(source))
    }

    /// Runs the script on `client` (which may carry per-command options).
    pub async fn call<R, C>(
        &self,
        client: &C,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, fred::error::Error>
    where
        R: FromValue,
        C: LuaInterface + Send + Sync,
    {
        match client
            .evalsha(self.0.sha1().clone(), keys.clone(), args.clone())
            .await
        {
            Err(err) if err.details().starts_with("NOSCRIPT") => {
                let source = self.0.lua().expect("made from source").clone();
                client.eval(source, keys, args).await
            }
            result => result,
        }
    }
}

/// The directory's outage rule, shared by every script that could give a
/// nick or a membership away (`calm` in the scripts below).
///
/// Leases are keys that expire on Redis's clock, and that clock runs on while
/// Redis is frozen, restarting, or cut off from every instance: when it comes
/// back, live instances' leases have run out through no fault of theirs (or
/// are gone with Redis's data). Every heartbeat of every instance stamps the
/// tick key with Redis's time. A tick older than the gap (no instance could
/// beat) or missing (Redis lost its data) means an outage everyone saw: the
/// grace key is then set for one lease, and while it exists no free nick is
/// claimed and no instance is reaped, so that every instance has renewed or
/// asserted its users again before anything is judged.
///
/// `calm(tick, grace, gap_ms, lease_ms)` returns whether the grace holds, and
/// Redis's time in ms (`now_ms()`).
macro_rules! calm {
    () => {
        r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function calm(tick_key, grace_key, gap_ms, lease_ms)
  local now = now_ms()
  local tick = redis.call('GET', tick_key)
  if not tick or now - tonumber(tick) > tonumber(gap_ms) then
    redis.call('SET', grace_key, '1', 'PX', lease_ms, 'NX')
  end
  return redis.call('EXISTS', grace_key) == 1, now
end
"#
    };
}

/// How long the tick key outlives the last heartbeat: a cluster none of
/// whose instances has run for a day starts again as a new one.
pub const TICK_TTL_MS: &str = "86400000";

/// Orders one room message: the room's next seq, the message appended to the
/// room's capped stream under id `SEQ-0` and to its partition's persistence
/// stream, and published to the room's channel. Returns the seq.
///
/// KEYS: seq counter, room stream, partition stream, room channel, and for a
/// send with an `Idempotency-Key` the key's receipt.
/// ARGV: room, body (JSON), floor, room stream cap, partition stream cap,
/// whether the floor includes the store's last seq (`1`) or not (`0`), how
/// long an idle room's counter and stream are kept (ms), and for a keyed send
/// the message id and the key's lifetime in seconds.
///
/// A room's counter and stream expire once the room has been idle that
/// long: rooms are made by any client's `/join`, and Redis would otherwise
/// hold up to a stream cap of every room ever used. Nothing is lost by it:
/// the messages are in the store by then, reads fall back to it, and the
/// counter starts again above the store's last seq (`unseeded`).
///
/// `floor` is the highest seq the caller knows of in the room. A counter
/// missing is a new room, or one lost with a Redis that kept no data; the
/// caller's own cursor may then lag what other instances delivered and the
/// persisters stored (its link was cut meanwhile), so the script answers
/// `unseeded` until the caller's floor includes the store's last seq: no seq
/// that reached the store is handed out twice.
///
/// Returns `"SEQ "` for a new message, `"SEQ ID"`, the first send's seq and
/// id, when the key was already used (then nothing is published), or
/// `unseeded`.
pub const PUBLISH: &str = r#"
if KEYS[5] then
  local prior = redis.call('GET', KEYS[5])
  if prior then
    return prior
  end
end
if ARGV[6] == '0' and redis.call('EXISTS', KEYS[1]) == 0 then
  return 'unseeded'
end
local seq = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[3])
if seq <= floor then
  seq = floor + 1
  redis.call('SET', KEYS[1], seq)
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], seq .. '-0', 'm', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'r', ARGV[1], 's', seq, 'm', ARGV[2])
redis.call('SPUBLISH', KEYS[4], 'm' .. seq .. ' ' .. ARGV[2])
if KEYS[5] then
  redis.call('SET', KEYS[5], seq .. ' ' .. ARGV[8], 'EX', ARGV[9])
end
return seq .. ' '
"#;

/// Queues one direct message for an instance: the next number of its inbox,
/// the message appended to the inbox stream under id `N-0`, and published on
/// the instance's channel as `dN GEN JSON`. Both keys expire unless the
/// instance renews them ([`INBOX_BEAT`]), so a dead instance's inbox does
/// not stay.
///
/// `GEN` names this life of the inbox: it is set when the counter is made,
/// from the caller's random token, so a recipient can tell numbers of an
/// inbox that Redis lost (or let expire) and made again from the old one's.
/// A new generation starts with an empty stream: entries left of an older
/// one (a counter evicted alone) are not its numbers.
///
/// KEYS: inbox counter (a hash: `gen`, `n`), inbox stream, instance channel.
/// ARGV: the message (JSON), the inbox's cap, the keys' lifetime in ms, a
/// fresh generation token. Returns the number.
pub const DM: &str = r#"
local gen = redis.call('HGET', KEYS[1], 'gen')
if not gen then
  gen = ARGV[4]
  redis.call('HSET', KEYS[1], 'gen', gen)
  redis.call('DEL', KEYS[2])
end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], n .. '-0', 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SPUBLISH', KEYS[3], 'd' .. n .. ' ' .. gen .. ' ' .. ARGV[1])
return n
"#;

/// An instance's look at its own inbox, once a heartbeat: renews both keys
/// and answers the counter's generation and number (`false`s when no DM was
/// numbered since the inbox was last made).
///
/// KEYS: inbox counter, inbox stream. ARGV: the keys' lifetime in ms.
pub const INBOX_BEAT: &str = r#"
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return redis.call('HMGET', KEYS[1], 'gen', 'n')
"#;

/// Takes a nick for a session, or renews the session's hold on it; a free
/// nick is not taken during an outage's grace (see [`calm!`]).
///
/// Nothing is taken for an instance whose name another life holds (a
/// namesake took it over while it was away; its next heartbeat stops it).
///
/// KEYS: nick key, tick, grace, instance's lease. ARGV: value
/// (`instance\tlife.owner\tnick`), holder prefix (`instance\tlife.owner\t`), lease in
/// ms, outage gap in ms, this life's prefix of the lease's value. Returns 1
/// if held, 0 if another holds it, -1 if the directory is recovering, -2 if
/// another life holds the instance's name.
pub const CLAIM: &str = concat!(
    calm!(),
    r#"
local alive = redis.call('GET', KEYS[4])
if alive and string.sub(alive, 1, #ARGV[5]) ~= ARGV[5] then
  return -2
end
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[2]) ~= ARGV[2] then
  return 0
end
if not cur and calm(KEYS[2], KEYS[3], ARGV[4], ARGV[3]) then
  return -1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"#
);

/// Renews (or takes again, if they expired) many claims at once.
///
/// KEYS: nick keys. ARGV: lease in ms, then per key its value and its holder
/// prefix. Returns the 1-based indexes of the keys another session holds.
pub const RENEW: &str = r#"
local lost = {}
for i, key in ipairs(KEYS) do
  local value, prefix = ARGV[2 * i], ARGV[2 * i + 1]
  local cur = redis.call('GET', key)
  if cur and string.sub(cur, 1, #prefix) ~= prefix then
    table.insert(lost, i)
  else
    redis.call('SET', key, value, 'PX', ARGV[1])
  end
end
return lost
"#;

/// Deletes a key if its value starts with a prefix (a claim given up).
/// KEYS: the key. ARGV: holder prefix. Returns 1 if deleted.
pub const RELEASE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// Records a membership: the room's member hash, the set of rooms with
/// members, and the instance's own index of what it holds (what reaping the
/// instance reads), in one step, so none of the three can miss it.
///
/// Only while this life of the instance is alive and holds the nick: a
/// join sent just before the instance stalled may reach Redis after its
/// lease was reaped and the nick taken, and must then neither claim the room
/// for the old holder nor overwrite the new holder's membership; nor may an
/// instance whose name a namesake took over meanwhile record anything under
/// it.
///
/// KEYS: room's member hash, rooms set, instance's held set, nick key,
/// instance's lease. ARGV: nick key, `instance\tnick`, room, `instance\t`,
/// this life's prefix of the lease's value.
/// Returns 2 if recorded anew, 1 if it was recorded already, 0 if the
/// instance no longer holds the nick (or its name).
pub const JOIN: &str = r#"
local holder = redis.call('GET', KEYS[4])
local alive = redis.call('GET', KEYS[5])
if not holder or string.sub(holder, 1, #ARGV[4]) ~= ARGV[4]
    or not alive or string.sub(alive, 1, #ARGV[5]) ~= ARGV[5] then
  return 0
end
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3] .. '\t' .. ARGV[1])
return 1 + added
"#;

/// Removes a room membership if this instance holds it.
///
/// Not for an instance whose name another life holds: a membership's value
/// names the instance, not its life, so the woken instance would remove
/// its namesake's (whose user may well have the same nick by then).
///
/// KEYS: room's member hash, rooms set, instance's held set, instance's
/// lease. ARGV: nick key, instance, room, this life's prefix of the lease's
/// value. Returns 1 if removed, 2 if another instance holds the membership
/// (the nick is someone else's now), 0 if nobody does.
pub const LEAVE: &str = r#"
local alive = redis.call('GET', KEYS[4])
if alive and string.sub(alive, 1, #ARGV[4]) ~= ARGV[4] then
  return 0
end
redis.call('SREM', KEYS[3], ARGV[3] .. '\t' .. ARGV[1])
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then
  return 0
end
if string.sub(cur, 1, #ARGV[2] + 1) ~= ARGV[2] .. '\t' then
  return 2
end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[3])
end
return 1
"#;

/// A room's members on live instances.
/// KEYS: room's member hash. ARGV: live-instance key prefix.
pub const MEMBERS: &str = r#"
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local inst, nick = string.match(all[i + 1], '^(.-)\t(.*)$')
  if inst and redis.call('EXISTS', ARGV[1] .. inst) == 1 then
    table.insert(out, nick)
  end
end
return out
"#;

/// Rooms with members on live instances, flattened `room, count, ...`.
/// KEYS: rooms set. ARGV: member hash prefix, live-instance key prefix.
pub const ROOMS: &str = r#"
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local all = redis.call('HGETALL', ARGV[1] .. room)
  local n = 0
  for i = 2, #all, 2 do
    local inst = string.match(all[i], '^(.-)\t')
    if inst and redis.call('EXISTS', ARGV[2] .. inst) == 1 then n = n + 1 end
  end
  if n > 0 then
    table.insert(out, room)
    table.insert(out, n)
  end
end
return out
"#;

/// Takes this instance's name for a new life: sets the live-instance key to
/// this life's first value, but only if it still holds what the starting
/// instance watched stand still (a crashed life's last beat), or nothing (a
/// lease that ran out meanwhile is a dead life's too).
/// It also stamps the tick (see [`calm!`]).
/// Returns 0 if a running namesake (or one starting at the same moment)
/// has it. KEYS: live-instance key, tick, grace, instances set. ARGV: the
/// value watched ('' for none), this life's first value, lease in ms, outage
/// gap in ms, this instance's name, the tick's lifetime in ms.
pub const TAKE_NAME: &str = concat!(
    calm!(),
    r#"
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  -- A missing tick is a new cluster (a lost one's instances will find their
  -- own keys gone at their next beat); a stale one is an outage only if
  -- another instance has users to protect.
  local now = now_ms()
  local tick = redis.call('GET', KEYS[2])
  if tick then
    for _, inst in ipairs(redis.call('SMEMBERS', KEYS[4])) do
      if inst ~= ARGV[5] then
        calm(KEYS[2], KEYS[3], ARGV[4], ARGV[3])
        break
      end
    end
  end
  redis.call('SET', KEYS[2], now, 'PX', ARGV[6])
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#
);

/// Says this instance is alive. Returns 1 if it was not registered: it is
/// new, or another instance reaped it while it was stalled or cut off; and
/// -1, changing nothing, if another life holds the name (a namesake took it
/// over while this one was away).
/// The live-instance key holds the life's token and the beat's number, so
/// that an instance starting under the same name can see it change. It
/// stamps the tick, after judging the gap since the last one (see [`calm!`]).
/// KEYS: live-instance key, instances set, tick, grace. ARGV: instance, lease
/// in ms, beat, outage gap in ms, the tick's lifetime in ms, this life's
/// prefix of the beat.
pub const HEARTBEAT: &str = concat!(
    calm!(),
    r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[6]) ~= ARGV[6] then return -1 end
local _, now = calm(KEYS[3], KEYS[4], ARGV[4], ARGV[2])
redis.call('SET', KEYS[3], now, 'PX', ARGV[5])
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
return redis.call('SADD', KEYS[2], ARGV[1])
"#
);

/// Reaps instances whose lease ran out (and `ARGV[3]`, an instance starting
/// again under the name of a previous life): forgets them and removes their
/// memberships, atomically, so exactly one caller announces each departure.
/// It reads each dead instance's own index of what it held, so reaping costs
/// what the dead held, not what the whole cluster holds.
/// Returns the memberships removed, flattened `room, nick, ...`.
/// During an outage's grace only `ARGV[3]` is reaped (see [`calm!`]).
/// KEYS: instances set, rooms set, tick, grace.
/// ARGV: live-instance key prefix, member hash prefix, instance to forget or
/// "", held-set prefix, lease in ms, outage gap in ms.
pub const REAP: &str = concat!(
    calm!(),
    r#"
local out = {}
local grace = calm(KEYS[3], KEYS[4], ARGV[6], ARGV[5])
for _, inst in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if inst == ARGV[3] or (not grace and redis.call('EXISTS', ARGV[1] .. inst) == 0) then
    redis.call('SREM', KEYS[1], inst)
    local held = ARGV[4] .. inst
    for _, entry in ipairs(redis.call('SMEMBERS', held)) do
      local room, nk = string.match(entry, '^(.-)\t(.*)$')
      if room then
        local key = ARGV[2] .. room
        local cur = redis.call('HGET', key, nk)
        local owner, nick
        if cur then owner, nick = string.match(cur, '^(.-)\t(.*)$') end
        if owner == inst then
          redis.call('HDEL', key, nk)
          table.insert(out, room)
          table.insert(out, nick)
          if redis.call('HLEN', key) == 0 then redis.call('SREM', KEYS[2], room) end
        end
      end
    end
    redis.call('DEL', held)
  end
end
return out
"#
);

/// Forgets a persistence stream's consumers that hold nothing and have not
/// read for a while: every instance reads under its own name, and with the
/// default random `--instance` each restart would otherwise add one to every
/// partition's group for good. A consumer with no pending entry owns
/// nothing; one that reads again is made anew by its read.
///
/// KEYS: the stream. ARGV: group, idle time in ms. Returns how many went.
pub const SWEEP_CONSUMERS: &str = r#"
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
local gone = 0
for _, consumer in ipairs(consumers) do
  local f = {}
  for i = 1, #consumer, 2 do f[consumer[i]] = consumer[i + 1] end
  if f['pending'] == 0 and f['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    gone = gone + 1
  end
end
return gone
"#;
