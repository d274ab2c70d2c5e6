-- Shared by the scripts that read or advance a room's sequence: the room's
-- current epoch, a new one (and an empty history) if it has none.
local function current_epoch(seq_key, epoch_key, history_key, candidate)
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    -- A new run of the room's sequence: nothing of an older one may linger.
    epoch = candidate
    redis.call('SET', epoch_key, epoch)
    redis.call('SET', seq_key, 0)
    redis.call('DEL', history_key)
  end
  return epoch
end

-- Keep a room's keys for ttl more milliseconds (--room-ttl; 0: for ever):
-- each use of a room renews them, so only rooms nobody joins or writes to
-- are forgotten.
local function keep_room(seq_key, epoch_key, history_key, ttl)
  ttl = tonumber(ttl)
  if ttl > 0 then
    redis.call('PEXPIRE', seq_key, ttl)
    redis.call('PEXPIRE', epoch_key, ttl)
    redis.call('PEXPIRE', history_key, ttl)
  end
end
