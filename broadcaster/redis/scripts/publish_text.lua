-- KEYS: seq, epoch, history.  ARGV: the room's (sharded) channel, candidate epoch, history size,
-- room TTL (ms), then the bodies of one or more text messages, numbered here in that order.
-- One message is published as its entry; several as one batch:
-- '*' <length of each entry, space-separated> LF <the entries, back to back>.
local epoch = current_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[2])
local count = #ARGV - 4
local first = redis.call('INCRBY', KEYS[1], count) - count + 1
local entries, lengths = {}, {}
for i = 1, count do
  local entry = string.format('%d %s ', first + i - 1, epoch) .. ARGV[4 + i]
  entries[i] = entry
  lengths[i] = #entry
end
local size = tonumber(ARGV[3])
if size > 0 then
  redis.call('RPUSH', KEYS[3], unpack(entries))
  redis.call('LTRIM', KEYS[3], -size, -1)
end
keep_room(KEYS[1], KEYS[2], KEYS[3], ARGV[4])
if count == 1 then
  redis.call('SPUBLISH', ARGV[1], entries[1])
else
  redis.call('SPUBLISH', ARGV[1], '*' .. table.concat(lengths, ' ') .. '\n' .. table.concat(entries))
end
return {first, epoch}
