-- KEYS: nodes, alive.  ARGV: node, token, ttl (ms), channel, key prefix.
-- Returns {-1} if this node is no longer registered, else {nodes, {dead...}}.
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return {-1} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local dead = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node ~= ARGV[1] and redis.call('EXISTS', ARGV[5] .. 'node:' .. node .. ':alive') == 0 then
    -- Its heartbeat stopped.  Removing it here, in one script, means one
    -- node alone announces it: every node then says its clients left.
    redis.call('SREM', KEYS[1], node)
    redis.call('DEL', ARGV[5] .. 'node:' .. node .. ':members')
    local state = {t = 'state', node = node, alive = false, members = {}}
    redis.call('PUBLISH', ARGV[4], '0 - ' .. cjson.encode(state))
    table.insert(dead, node)
  end
end
return {redis.call('SCARD', KEYS[1]), dead}
