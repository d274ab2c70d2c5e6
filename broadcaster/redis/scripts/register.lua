-- KEYS: nodes, alive, members.  ARGV: node, token, ttl (ms), channel, state
-- event, private channel, key prefix, then member id and entry pairs.
-- Returns {0} if another live server holds this node id, else {1, nodes}.
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return {0} end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[3])
for i = 8, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
-- Everybody else's members, for this node alone, at this point of the
-- event stream: it applies what follows on top.
local nodes = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[1] and redis.call('EXISTS', ARGV[7] .. 'node:' .. node .. ':alive') == 1 then
    nodes[node] = redis.call('HGETALL', ARGV[7] .. 'node:' .. node .. ':members')
  end
end
redis.call('PUBLISH', ARGV[6], '0 - ' .. cjson.encode({t = 'snapshot', nodes = nodes}))
return {1, redis.call('SCARD', KEYS[1])}
