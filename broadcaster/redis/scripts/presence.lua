-- KEYS: alive, members.  ARGV: token, channel, member id, entry ('' once
-- it is in no room), event.  Refused (0) unless this node is registered, so
-- a node declared dead cannot leave members behind.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[2], ARGV[3])
else
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
redis.call('PUBLISH', ARGV[2], ARGV[5])
return 1
