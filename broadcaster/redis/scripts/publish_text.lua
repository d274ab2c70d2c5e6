-- KEYS: seq, epoch, history.  ARGV: the room's (sharded) channel, body, candidate epoch, history size,
-- room TTL (ms).
local epoch = current_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[3])
local seq = redis.call('INCR', KEYS[1])
local entry = string.format('%d %s ', seq, epoch) .. ARGV[2]
local size = tonumber(ARGV[4])
if size > 0 then
  redis.call('RPUSH', KEYS[3], entry)
  redis.call('LTRIM', KEYS[3], -size, -1)
end
keep_room(KEYS[1], KEYS[2], KEYS[3], ARGV[5])
redis.call('SPUBLISH', ARGV[1], entry)
return {seq, epoch}
