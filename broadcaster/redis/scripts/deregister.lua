-- KEYS: nodes, alive, members.  ARGV: node, token, channel, empty state event.
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
