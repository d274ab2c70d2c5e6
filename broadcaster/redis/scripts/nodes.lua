-- KEYS: nodes.  ARGV: key prefix.
-- Read only: for every registered node, its id, the PTTL of its alive key
-- (ms; -2 once it has expired) and how many members its hash holds.
local nodes = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(nodes, node)
  table.insert(nodes, redis.call('PTTL', ARGV[1] .. 'node:' .. node .. ':alive'))
  table.insert(nodes, redis.call('HLEN', ARGV[1] .. 'node:' .. node .. ':members'))
end
return nodes
