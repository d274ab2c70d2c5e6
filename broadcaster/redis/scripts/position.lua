-- KEYS: seq, epoch, history.  ARGV: candidate epoch, room TTL (ms).
local epoch = current_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
keep_room(KEYS[1], KEYS[2], KEYS[3], ARGV[2])
return {epoch, tonumber(redis.call('GET', KEYS[1]) or '0')}
